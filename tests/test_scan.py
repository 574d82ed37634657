"""The dataset scan's cache: a second scan opens nothing unchanged, a changed file is checked again,
bad files stay bad, a broken cache is never trusted, and the verdicts are those of check_image alone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from captioner.data import scan
from captioner.data.images import check_image
from captioner.data.scan import CHECKER, cache_path, scan_images
from captioner.data.sources import Sample, check_images

HOUR_AGO = time.time() - 3600


def write_image(path: Path, colour: int = 0, *, fmt: str = "PNG") -> Path:
    """A small image, dated an hour ago: files modified just before a scan are never remembered."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (colour, 40, 80)).save(path, format=fmt)
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


def dated(path: Path, when: float = HOUR_AGO) -> Path:
    os.utime(path, (when, when))
    return path


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files check_image opens during the test, in order."""
    opened: list[str] = []

    def counting(path: str) -> str | None:
        opened.append(Path(path).name)
        return check_image(path)

    monkeypatch.setattr(scan, "check_image", counting)
    return opened


def mixed_folder(folder: Path) -> list[Path]:
    """Usable and unusable files of every kind the checker tells apart."""
    good = [write_image(folder / "a.png", 10), write_image(folder / "sub" / "b.jpg", 20, fmt="JPEG")]
    jpeg = (folder / "sub" / "b.jpg").read_bytes()
    cut = folder / "cut.jpg"
    cut.write_bytes(jpeg[: len(jpeg) // 2])
    garbage = folder / "garbage.png"
    garbage.write_text("not an image")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    (folder / "dir.png").mkdir()
    for p in (cut, garbage, empty):
        dated(p)
    return [*good, cut, garbage, empty, folder / "dir.png", folder / "gone.png"]


def test_second_scan_opens_no_unchanged_file(tmp_path: Path, counted: list[str]) -> None:
    files = [write_image(tmp_path / "images" / f"{i}.png", i) for i in range(5)]
    cache = tmp_path / "cache"
    assert scan_images(files, cache=cache) == [None] * 5
    assert len(counted) == 5
    counted.clear()
    assert scan_images(files, cache=cache) == [None] * 5
    assert counted == []
    assert len(list(cache.iterdir())) == 1  # one file per image folder, and no temporary left behind


def test_scan_of_a_subset_uses_the_same_cache(tmp_path: Path, counted: list[str]) -> None:
    files = [write_image(tmp_path / "images" / f"{i}.png", i) for i in range(4)]
    scan_images(files, cache=tmp_path / "cache")
    counted.clear()
    assert scan_images(files[:2], cache=tmp_path / "cache") == [None, None]
    assert counted == []


@pytest.mark.parametrize("change", ["size", "mtime"])
def test_a_changed_file_is_checked_again(tmp_path: Path, counted: list[str], change: str) -> None:
    files = [write_image(tmp_path / "a.jpg", 1, fmt="JPEG"), write_image(tmp_path / "b.jpg", 2, fmt="JPEG")]
    cache = tmp_path / "cache"
    scan_images(files, cache=cache)
    counted.clear()
    data = files[0].read_bytes()
    if change == "size":  # cut short, the date kept as it was: only the size tells
        files[0].write_bytes(data[: len(data) // 2])
        dated(files[0])
    else:  # the same number of bytes, broken, and only the date tells
        files[0].write_bytes(b"\0" * len(data))
        dated(files[0], HOUR_AGO + 1)
    reasons = scan_images(files, cache=cache)
    assert counted == ["a.jpg"]
    assert reasons[0] is not None and reasons[1] is None
    assert reasons[0] == check_image(files[0])


def test_bad_files_are_never_remembered(tmp_path: Path, counted: list[str]) -> None:
    files = mixed_folder(tmp_path / "images")
    first = scan_images(files, cache=tmp_path / "cache")
    counted.clear()
    second = scan_images(files, cache=tmp_path / "cache")
    assert second == first
    assert sorted(counted) == sorted(p.name for p, r in zip(files, first, strict=True) if r is not None)


def test_verdicts_are_the_same_with_and_without_the_cache(tmp_path: Path) -> None:
    files = mixed_folder(tmp_path / "images")
    expected = [check_image(p) for p in files]
    assert expected[:2] == [None, None] and all(r is not None for r in expected[2:])
    assert scan_images(files, cache=False) == expected
    assert scan_images(files, cache=tmp_path / "cache") == expected  # cold
    assert scan_images(files, cache=tmp_path / "cache") == expected  # warm
    samples = [Sample(p.stem, ["a caption"], "train", path=p) for p in files]
    bad = [(p, r) for p, r in zip(files, expected, strict=True) if r is not None]
    assert check_images(samples, cache=False) == (2, bad)
    assert check_images(samples, cache=tmp_path / "cache") == (2, bad)


@pytest.mark.parametrize("content", [
    b"{not json",
    b"\xff\xfe\x00garbage",
    b"[]",
    json.dumps({"checker": CHECKER, "folder": "FOLDER", "ok": []}).encode(),
    json.dumps({"checker": CHECKER, "folder": "FOLDER", "ok": {"a.png": "yes", "b.png": [1]}}).encode(),
    json.dumps({"checker": "an older checker", "folder": "FOLDER", "ok": "STATS"}).encode(),
    json.dumps({"checker": CHECKER, "folder": "/elsewhere", "ok": "STATS"}).encode(),
], ids=["not JSON", "not UTF-8", "a list", "ok not a dict", "malformed entries", "another checker",
        "another folder"])
def test_a_broken_or_foreign_cache_is_ignored_and_rewritten(tmp_path: Path, counted: list[str],
                                                            content: bytes) -> None:
    folder = tmp_path / "images"
    files = [write_image(folder / "a.png", 1), write_image(folder / "b.png", 2)]
    garbage = folder / "c.png"
    garbage.write_text("not an image")
    files.append(dated(garbage))
    # Stats that match the files: a cache from another checker or folder must not be trusted even so.
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    text = content.replace(b"FOLDER", str(folder).encode()).replace(b'"STATS"', json.dumps(stats).encode())
    file = cache_path(str(folder), tmp_path / "cache")
    file.parent.mkdir()
    file.write_bytes(text)
    assert scan_images(files, cache=tmp_path / "cache") == [None, None, check_image(garbage)]
    assert sorted(counted) == ["a.png", "b.png", "c.png"]
    rewritten = json.loads(file.read_text())
    assert rewritten["checker"] == CHECKER and sorted(rewritten["ok"]) == ["a.png", "b.png"]


def test_a_broken_cache_is_rewritten_even_with_nothing_to_remember(tmp_path: Path) -> None:
    garbage = tmp_path / "images" / "c.png"
    garbage.parent.mkdir()
    garbage.write_text("not an image")
    file = cache_path(str(garbage.parent), tmp_path / "cache")
    file.parent.mkdir()
    file.write_text("{not json")
    assert scan_images([garbage], cache=tmp_path / "cache") == [check_image(garbage)]
    assert json.loads(file.read_text()) == {"checker": CHECKER, "folder": str(garbage.parent), "ok": {}}


def test_a_file_modified_just_now_is_not_remembered(tmp_path: Path, counted: list[str]) -> None:
    fresh = tmp_path / "fresh.png"
    Image.new("RGB", (4, 4)).save(fresh)  # its mtime tick may not be over: the same size could follow
    scan_images([fresh], cache=tmp_path / "cache")
    scan_images([fresh], cache=tmp_path / "cache")
    assert counted == ["fresh.png", "fresh.png"]


def test_the_cache_lives_under_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "images"
    files = [write_image(folder / "a.png")]
    scan_images(files, cache=False)
    assert not (tmp_path / "xdg").exists()
    scan_images(files)
    assert cache_path(str(folder), tmp_path / "xdg" / "captioner" / "scan").is_file()


def test_an_unwritable_cache_only_costs_the_next_scan(tmp_path: Path, counted: list[str]) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    files = [write_image(tmp_path / "images" / "a.png")]
    assert scan_images(files, cache=blocker) == [None]
    assert scan_images(files, cache=blocker) == [None]
    assert counted == ["a.png", "a.png"]


@pytest.mark.parametrize("warm", [False, True])
def test_progress_counts_up_to_every_file(tmp_path: Path, warm: bool) -> None:
    files = [write_image(tmp_path / "images" / f"{i:03d}.png", i) for i in range(scan.CHUNK + 5)]
    if warm:
        scan_images(files, cache=tmp_path / "cache")
    calls: list[tuple[int, int]] = []
    scan_images(files, cache=tmp_path / "cache", on_progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(files), len(files))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# ----------------------------------------------------------------------------- the warm check's fast routes


def test_a_file_gone_or_unreadable_is_checked_whatever_its_entry_says(tmp_path: Path, counted: list[str]) -> None:
    """A file that cannot be stat-ed takes the per-file route, even where a malformed entry holds null."""
    folder = tmp_path / "images"
    files = [write_image(folder / f"{i}.png", i) for i in range(4)]
    cache = tmp_path / "cache"
    scan_images(files, cache=cache)
    file = cache_path(str(folder), cache)
    data = json.loads(file.read_text())
    data["ok"]["1.png"] = None  # what a missing file's stat was once written as
    file.write_text(json.dumps(data))
    files[1].unlink()
    counted.clear()
    reasons = scan_images(files, cache=cache)
    assert counted == ["1.png"] and reasons[1] == "file not found" and reasons.count(None) == 3


def test_every_changed_file_of_a_large_folder_is_found(tmp_path: Path, counted: list[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The stats compared in bulk, over several stat tasks: the changed files, and only they, are checked."""
    monkeypatch.setattr(scan, "STAT_CHUNK", 4)
    folder = tmp_path / "images"
    files = [write_image(folder / f"{i:02d}.png", i) for i in range(11)]
    cache = tmp_path / "cache"
    scan_images(files, cache=cache)
    for i in (2, 7, 10):  # in the first, second and last task
        Image.new("RGB", (5, 5)).save(files[i])
        dated(files[i], HOUR_AGO + i)
    counted.clear()
    assert scan_images(files, cache=cache) == [None] * 11
    assert counted == ["02.png", "07.png", "10.png"]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_scan_leaves_the_collector_as_it_found_it(tmp_path: Path, enabled: bool) -> None:
    import gc

    files = [write_image(tmp_path / "images" / "a.png")]
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        scan_images(files, cache=tmp_path / "cache")
        scan_images(files, cache=tmp_path / "cache")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_check_images_reports_each_file_once_by_its_first_path(tmp_path: Path) -> None:
    """Repeated paths (equal Paths, other objects) are scanned once; the first one is the Path reported."""
    folder = tmp_path / "images"
    good = write_image(folder / "a.png")
    garbage = folder / "b.png"
    garbage.write_text("not an image")
    dated(garbage)
    first, again = Path(str(garbage)), Path(str(garbage))
    samples = [Sample("1", ["x"], "train", path=first), Sample("2", ["x"], "train", path=good),
               Sample("3", ["x"], "val", path=again), Sample("4", ["x"], "test", path=Path(str(good)))]
    count, bad = check_images(samples, cache=tmp_path / "cache")
    assert count == 1 and bad == [(garbage, check_image(garbage))] and bad[0][0] is first
    # Paths of other types (here str) take the general route, with the same answer
    samples = [Sample(s.image_id, s.captions, s.split, path=str(s.path)) for s in samples]
    assert check_images(samples, cache=tmp_path / "cache") == (1, [(str(garbage), check_image(garbage))])
