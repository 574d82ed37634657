"""Captioning many files: streamed results files, resuming, decoding workers, torchrun shards, the Python API.

On a tiny untrained run: what is checked is the plumbing (order, what reaches the file, what is skipped),
so the tests compare against the same model captioning the same inputs another way.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from captioner.api import Captioner, DecodeSettings
from captioner.cli import app
from captioner.data.files import DRAFT_MARGIN
from captioner.data.images import Preprocess, load_image
from captioner.decoding import beam_search, search_options
from captioner.errors import ConfigError, ImageError
from captioner.results import ResultWriter, read_results

from .test_reliability import save_tiny_run

runner = CliRunner()
FAST = ["--device", "cpu", "--precision", "fp32", "--max-len", "3"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("stream") / "run")


@pytest.fixture(scope="module")
def captioner(tiny: Path) -> Captioner:
    return Captioner.load(tiny, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve small JPEGs of different content (so a mix-up of order shows in the model's inputs)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        path = folder / ("sub" if i >= 9 else "") / f"p{i:02d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- results files


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_interrupted_run_keeps_every_finished_batch_and_skip_done_captions_the_rest(
        suffix: str, tiny: Path, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / f"results{suffix}"
    folder = photos[0].parent
    seen: list[int] = []
    real = Captioner.caption_tensor

    def stop_at_third(self: Captioner, batch: torch.Tensor, *args: object, **kwargs: object):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(len(batch))
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption_tensor", stop_at_third)
    stopped = run("caption", folder, "-r", "--model", tiny, "--out", out, "--batch-size", "4", "--workers", "0", *FAST)
    assert stopped.exit_code == 130, stopped.output
    if suffix == ".json":
        assert json.loads(out.read_text())  # the array was closed on the way out
    first = read_results(out)
    assert [r["image"] for r in first] == [str(p) for p in photos[:8]]  # two whole batches, in input order

    seen.clear()
    monkeypatch.setattr(Captioner, "caption_tensor", real)
    refused = run("caption", folder, "-r", "--model", tiny, "--out", out, *FAST)
    assert refused.exit_code == 1 and "--skip-done" in refused.stderr
    assert read_results(out) == first  # refusing touched nothing

    counted: list[int] = []
    monkeypatch.setattr(Captioner, "caption_tensor",
                        lambda self, batch, *a, **k: counted.append(len(batch)) or real(self, batch, *a, **k))
    resumed = run("caption", folder, "-r", "--model", tiny, "--out", out, "--skip-done", "--batch-size", "4",
                  "--workers", "0", *FAST)
    assert resumed.exit_code == 0, resumed.output
    assert sum(counted) == 4  # only the rest
    final = read_results(out)
    assert [r["image"] for r in final] == [str(p) for p in photos]
    assert final[:8] == first


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_a_file_torn_by_a_hard_kill_is_read_to_its_last_whole_record(suffix: str, tmp_path: Path) -> None:
    out = tmp_path / f"r{suffix}"
    records = [{"image": f"a{i}.jpg", "caption": "a cat", "score": -1.0, "logprob": -1.0} for i in range(3)]
    with ResultWriter(out) as writer:
        writer.write(records[:1])
        assert read_results(out) == records[:1]  # flushed as written: a hard kill now keeps it
        writer.write(records[1:])
    text = out.read_text()
    cut = text.rstrip().rfind("a2.jpg")  # inside the last record, as a kill mid-write leaves it
    out.write_text(text[:cut])
    assert read_results(out) == records[:2]
    with ResultWriter(out, carried=read_results(out)) as writer:  # resuming rewrites it whole
        writer.write(records[2:])
    assert read_results(out) == records
    if suffix == ".json":
        assert json.loads(out.read_text()) == records


def test_csv_quotes_captions_with_commas_quotes_and_odd_file_names(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    tricky = [{"image": 'x, "y".jpg', "caption": 'a "red", round circle', "score": -1.5, "logprob": -2.0,
               "n_best": [{"caption": 'a "red", round circle', "score": -1.5, "logprob": -2.0}]},
              {"image": "plain.jpg", "caption": "line\nbreak, too", "score": -1.0, "logprob": -1.0}]
    with ResultWriter(out, n_best=True) as writer:
        writer.write(tricky)
    rows = list(csv.DictReader(io.StringIO(out.read_text(), newline="")))
    assert [r["caption"] for r in rows] == [t["caption"] for t in tricky]
    assert rows[0]["image"] == 'x, "y".jpg'
    assert json.loads(rows[0]["n_best"])[0]["caption"] == 'a "red", round circle'
    back = read_results(out)
    assert back[0] == tricky[0] and back[1]["caption"] == tricky[1]["caption"]


def test_results_options_refused_before_any_work(tiny: Path, photos: list[Path], tmp_path: Path) -> None:
    result = run("caption", photos[0], "--model", tiny, "--out", tmp_path / "r.txt", *FAST)
    assert result.exit_code == 1 and "r.txt: results are written as .jsonl, .csv or .json" in result.stderr
    result = run("caption", photos[0], "--model", tiny, "--resume-from", tmp_path / "none.jsonl",
                 "--out", tmp_path / "r.jsonl", *FAST)
    assert result.exit_code == 1 and "none.jsonl: results file not found" in result.stderr
    assert not (tmp_path / "r.jsonl").exists()
    result = run("caption", photos[0], "--model", tiny, "--beam", "2", "--n-best", "3", *FAST)
    assert result.exit_code == 1 and "--n-best must be between 1 and --beam (2)" in result.stderr


def test_resume_from_another_file_carries_its_results(tiny: Path, photos: list[Path], tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    assert run("caption", *photos[:5], "--model", tiny, "--out", old, *FAST).exit_code == 0
    new = tmp_path / "new.csv"
    result = run("caption", *photos, "--model", tiny, "--resume-from", old, "--out", new, *FAST)
    assert result.exit_code == 0, result.output
    assert "5 of 12 images already captioned" in result.stderr
    assert [r["image"] for r in read_results(new)] == [str(p) for p in photos]
    assert read_results(new)[:5] == read_results(old)


# ----------------------------------------------------------------------------- decoding files


def test_a_bad_file_among_good_ones_is_named_once_and_listed_at_the_end(tiny: Path, photos: list[Path],
                                                                        tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(photos[0].read_bytes()[:200])  # a truncated JPEG
    files = [*photos[:5], bad, *photos[5:]]
    out = tmp_path / "r.jsonl"
    result = run("caption", *files, "--model", tiny, "--out", out, "--batch-size", "4", "--workers", "2", *FAST)
    assert result.exit_code == 1
    assert [r["image"] for r in read_results(out)] == [str(p) for p in photos]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: ")
    assert "1 could not be captioned" in result.stderr and result.stderr.count(str(bad)) == 2


def test_workers_keep_the_input_order(captioner: Captioner, photos: list[Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    files = [*photos[:3], bad, *photos[3:]]
    real = Captioner.caption_tensor

    def record(inputs: list[torch.Tensor]):
        def caption_tensor(self: Captioner, batch: torch.Tensor, *args: object, **kwargs: object):
            inputs.append(batch.clone())
            return real(self, batch, *args, **kwargs)
        return caption_tensor

    runs = {}
    for workers in (0, 2):
        inputs: list[torch.Tensor] = []
        monkeypatch.setattr(Captioner, "caption_tensor", record(inputs))
        batches: list = []
        _, failures = captioner.caption_files(files, DecodeSettings(max_len=2), batch_size=5, workers=workers,
                                              on_batch=batches.append)
        assert [str(f) for f in failures] == [f"{bad}: empty file (0 bytes)"]
        assert [p for b in batches for p, _ in b] == files
        runs[workers] = torch.cat(inputs)
    assert len(runs[0]) == len(photos)
    assert torch.equal(runs[0], runs[2])  # the model saw the same images in the same order


def test_large_jpegs_decode_in_draft_mode_close_to_a_full_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).resize((1600, 1200))
    path = tmp_path / "big.jpg"
    photo.save(path, quality=90)
    pre = Preprocess(48)
    draft = load_image(path, min_side=DRAFT_MARGIN * 48)
    assert min(draft.size) >= DRAFT_MARGIN * 48 and draft.size[0] < 1600 // 2  # decoded at 1/4 or 1/8
    full = load_image(path)
    assert full.size == (1600, 1200)
    diff = (pre(draft) - pre(full)).abs().mean().item()  # normalised units (one grey level is ~0.017)
    assert diff < 0.03, diff


# ----------------------------------------------------------------------------- the Python API


def test_generators_arrays_tensors_and_paths_caption_alike(captioner: Captioner, photos: list[Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of input reaches the model as the same batch, in input order (the tiny model's captions
    barely depend on the image, so the model's inputs are what is compared)."""
    settings = DecodeSettings(max_len=3)
    seen: list[torch.Tensor] = []
    real = Captioner.caption_tensor

    def caption_tensor(self: Captioner, batch: torch.Tensor, *args: object, **kwargs: object):
        seen.append(batch.clone())
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption_tensor", caption_tensor)
    reference = captioner.caption(photos[:5], settings, batch_size=2)
    expected = torch.cat(seen)
    assert not torch.allclose(expected[0], expected[1])  # different photos: an order mix-up would show
    arrays = [np.array(load_image(p)) for p in photos[:5]]
    by_kind = {
        "generator of paths": (p for p in photos[:5]),
        "generator of arrays": (a for a in arrays),
        "PIL images": [Image.fromarray(a) for a in arrays],
        "uint8 tensors": [torch.from_numpy(a).permute(2, 0, 1) for a in arrays],
        "a preprocessed batch": torch.stack([captioner.preprocess(a) for a in arrays]),
    }
    for kind, images in by_kind.items():
        seen.clear()
        got = captioner.caption(images, settings, batch_size=2)
        assert [c.text for c in got] == [c.text for c in reference], kind
        assert torch.allclose(torch.cat(seen), expected, atol=1e-6), kind
    seen.clear()
    assert captioner.caption(arrays[3], settings)[0].text == reference[3].text  # one array is one image
    assert torch.allclose(seen[0], expected[3:4], atol=1e-6)
    streamed = captioner.caption_iter(iter(photos * 50), settings, batch_size=4)  # consumed lazily
    seen.clear()
    assert [next(streamed).text for _ in range(3)] == [c.text for c in reference[:3]]
    assert len(seen) == 1 and len(seen[0]) == 4  # one batch decoded, not the 600 images


def test_bad_items_raise_naming_the_item_or_are_collected(captioner: Captioner, photos: list[Path],
                                                          tmp_path: Path) -> None:
    settings = DecodeSettings(max_len=2)
    missing = tmp_path / "missing.jpg"
    items = [photos[0], np.zeros((4, 4, 3), dtype=np.complex64), photos[1], missing, torch.zeros(3, 5, 5)]
    with pytest.raises(ImageError, match=r"item 1 \(array complex64 \(4, 4, 3\)\): cannot be read as an image"):
        captioner.caption(items, settings)
    got = list(captioner.caption_iter(iter(items), settings, errors="collect"))
    assert len(got) == len(items)
    assert [type(g).__name__ for g in got] == ["Caption", "ImageError", "Caption", "ImageError", "ImageError"]
    assert str(got[3]) == f"{missing}: file not found"
    assert "item 4 (tensor float32 (3, 5, 5))" in str(got[4]) and "(3, 48, 48)" in str(got[4])
    with pytest.raises(ConfigError, match="errors must be"):
        captioner.caption(photos[0], errors="ignore")  # type: ignore[arg-type]


def test_n_best_ranks_distinct_beams_and_keeps_the_best(captioner: Captioner, photos: list[Path]) -> None:
    images = captioner.to_tensor(photos[:3])
    opts = search_options(captioner.vocab, 4)
    best = beam_search(captioner.model, images, opts, beam=4)
    ranked = beam_search(captioner.model, images, opts, beam=4, n_best=3)
    for one, many in zip(best, ranked, strict=True):
        assert (one.tokens, one.score) == (many.tokens, many.score)
        scores = [many.score] + [r.score for r in many.runners_up]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert len({tuple(many.tokens), *(tuple(r.tokens) for r in many.runners_up)}) == 3


def test_n_best_in_the_results_file(tiny: Path, photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = run("caption", *photos[:2], "--model", tiny, "--beam", "3", "--n-best", "2", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    for record in json.loads(out.read_text()):
        assert len(record["n_best"]) == 2 and record["n_best"][0]["caption"] == record["caption"]
        assert record["n_best"][0]["score"] >= record["n_best"][1]["score"]


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed beside this Python")
def test_torchrun_shards_the_files_and_writes_one_merged_file_in_order(tiny: Path, photos: list[Path],
                                                                       tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    files = [*photos[:7], bad, *photos[7:]]
    single = tmp_path / "single.jsonl"
    assert run("caption", *files, "--model", tiny, "--out", single, "--batch-size", "2", *FAST).exit_code == 1
    merged = tmp_path / "merged.jsonl"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "captioner", "caption",
                           *map(str, files), "--model", str(tiny), "--out", str(merged), "--batch-size", "2",
                           "--workers", "0", *FAST], capture_output=True, text=True, env=env, timeout=240)
    assert f"error: {bad}: not an image" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(f"error: {bad}") == 1  # reported once, by rank 0
    assert read_results(merged) == read_results(single)  # every file once, in input order, the same captions
