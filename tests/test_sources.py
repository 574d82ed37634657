"""Dataset readers (each format on small files written here), cleaning, splits, image checks, the report."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.sources import (
    MAX_CAPTION_TOKENS,
    Sample,
    check_images,
    dataset_report,
    detect_format,
    hash_split,
    load_samples,
    sample_image,
)
from captioner.data.synthetic import SyntheticWorld, check_caption, write_synthetic
from captioner.errors import DataError, ImageError


def make_images(folder: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (i * 20, 0, 0)).save(folder / name)


def by_id(samples) -> dict[str, Sample]:
    return {s.image_id: s for s in samples}


# ----------------------------------------------------------------------------- readers


def test_coco_with_sibling_images_folder(tmp_path: Path) -> None:
    make_images(tmp_path / "images", ["a.jpg", "b.jpg"])
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg", "split": "test"},
                       {"id": 1, "file_name": "a.jpg"}],  # listed twice: merged
            "annotations": [{"id": 1, "image_id": 1, "caption": "A dog."},
                            {"id": 2, "image_id": 2, "caption": "x y"},
                            {"id": 3, "image_id": 1, "caption": "  "},
                            {"id": 4, "image_id": 1, "caption": "a cat"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    samples = load_samples(tmp_path / "captions.json")
    assert samples.format == "coco"
    got = by_id(samples)
    assert got["1"].captions == ["A dog.", "a cat"] and got["1"].path == tmp_path / "images" / "a.jpg"
    assert got["1"].split == hash_split("1")
    assert got["2"].split == "test"
    assert any("empty captions dropped" in n for n in samples.notes)
    assert any("merged" in n for n in samples.notes)
    assert load_samples(tmp_path).source == str(tmp_path / "captions.json")  # a folder finds its annotations


def test_coco_official_layout(tmp_path: Path) -> None:
    make_images(tmp_path / "val2017", ["000000000139.jpg"])
    ann = tmp_path / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": [{"id": 139, "file_name": "000000000139.jpg"}],
                               "annotations": [{"id": 1, "image_id": 139, "caption": "a room"}]}))
    (s,) = load_samples(ann)
    assert s.path == tmp_path / "val2017" / "000000000139.jpg" and s.image_id == "139"


def test_karpathy(tmp_path: Path) -> None:
    make_images(tmp_path, ["val2014/x.jpg", "train2014/y.jpg", "z.jpg"])
    images = [
        {"filepath": "val2014", "filename": "x.jpg", "cocoid": 7, "split": "test",
         "sentences": [{"raw": "A man.", "tokens": ["a", "man"]}, {"raw": "a person"}]},
        {"filepath": "train2014", "filename": "y.jpg", "cocoid": 8, "split": "restval",
         "sentences": [{"raw": "a tree"}]},
        {"filename": "z.jpg", "split": "val", "sentences": [{"tokens": ["two", "birds"]}]},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    samples = load_samples(tmp_path / "dataset_coco.json")
    assert samples.format == "karpathy"
    got = by_id(samples)
    assert got["7"].split == "test" and got["7"].captions == ["A man.", "a person"]
    assert got["7"].path == tmp_path / "val2014" / "x.jpg"
    assert got["8"].split == "train"  # restval joins train
    assert got["z"].split == "val" and got["z"].captions == ["two birds"]


def test_flickr8k_with_split_lists(tmp_path: Path) -> None:
    names = ["1000_a.jpg", "2000_b.jpg", "3000_c.jpg", "4000_d.jpg"]
    make_images(tmp_path / "Flicker8k_Dataset", names)
    lines = [f"{n}#{k}\t{n[:4]} caption number {k} ." for n in names for k in range(5)]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("1000_a.jpg\n2000_b.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("3000_c.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("")
    samples = load_samples(tmp_path / "Flickr8k.token.txt")
    assert samples.format == "flickr8k"
    got = by_id(samples)
    assert set(got) == {"1000_a", "2000_b", "3000_c"}  # 4000_d is in no split list
    assert got["1000_a"].split == "train" and got["3000_c"].split == "val"
    assert len(got["2000_b"].captions) == 5 and got["2000_b"].captions[0] == "2000 caption number 0 ."
    assert got["1000_a"].path == tmp_path / "Flicker8k_Dataset" / "1000_a.jpg"
    assert any("no Flickr_8k" in n for n in samples.notes)


def test_flickr8k_malformed_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tfine\nbroken line without tab\n")
    with pytest.raises(DataError, match=r"Flickr8k.token.txt:2"):
        load_samples(tmp_path / "Flickr8k.token.txt")


def test_csv_several_rows_per_image_and_split_column(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", ["a.png", "b.png"])
    (tmp_path / "captions.csv").write_text(
        'image,caption,split\na.png,"a red, round thing",train\na.png,another one,train\nb.png,b thing,val\n')
    samples = load_samples(tmp_path / "captions.csv", image_dir=tmp_path / "pics")
    got = by_id(samples)
    assert got["a.png"].captions == ["a red, round thing", "another one"] and got["a.png"].split == "train"
    assert got["b.png"].split == "val" and got["b.png"].path == tmp_path / "pics" / "b.png"


def test_csv_other_delimiters_and_no_split(tmp_path: Path) -> None:
    make_images(tmp_path / "images", ["a.png"])
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\na.png| 0| a thing\n")
    (s,) = load_samples(tmp_path / "results.csv")
    assert s.captions == ["a thing"] and s.split == hash_split("a.png")
    (tmp_path / "captions.txt").write_text("image,caption\na.png,kaggle style\na.png,a dog , running\n")
    assert detect_format(tmp_path / "captions.txt") == "csv"  # Kaggle's Flickr8k captions.txt
    kaggle = load_samples(tmp_path / "captions.txt")
    assert kaggle[0].captions == ["kaggle style", "a dog , running"]  # unquoted comma in the last column
    assert any("joined back" in n for n in kaggle.notes)


@pytest.mark.parametrize("content, message", [
    ("image,caption,split\na.png,fine,train\na.png,too,many,train\n", r"results.csv:3: expected 3 fields"),
    ("image,caption\na.png,fine\nb.png\n", r"results.csv:3: expected 2 fields"),
    ("picture,words\na.png,x\n", "no image column"),
    ("image,caption,split\na.png,x,holdout\n", r"results.csv:2: unknown split 'holdout'"),
])
def test_csv_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    make_images(tmp_path / "images", ["a.png"])
    (tmp_path / "results.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_samples(tmp_path / "results.csv")


def test_jsonl_caption_or_captions(tmp_path: Path) -> None:
    make_images(tmp_path / "images", ["a.png", "b.png"])
    lines = [{"image": "a.png", "caption": "one", "split": "test"},
             {"image": "b.png", "captions": ["two", "deux"]}, {"image": "a.png", "caption": "one"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    samples = load_samples(tmp_path / "data.jsonl")
    assert samples.format == "jsonl"
    got = by_id(samples)
    assert got["a.png"].captions == ["one"] and got["a.png"].split == "test"  # duplicate caption dropped
    assert got["b.png"].captions == ["two", "deux"]
    assert any("duplicate captions" in n for n in samples.notes)
    (tmp_path / "list.json").write_text(json.dumps(lines))
    assert [s.captions for s in load_samples(tmp_path / "list.json")] == [s.captions for s in samples]


def test_jsonl_bad_line_is_named(tmp_path: Path) -> None:
    make_images(tmp_path / "images", ["a.png"])
    (tmp_path / "data.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{"image": "a.png", caption}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        load_samples(tmp_path / "data.jsonl")
    (tmp_path / "data.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:1: needs \"caption\""):
        load_samples(tmp_path / "data.jsonl")


def test_malformed_json_names_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "captions.json").write_text('{"images": [\n{"id": 1,}\n]}')
    with pytest.raises(DataError, match=r"captions.json: not valid JSON at line 2"):
        load_samples(tmp_path / "captions.json", format="coco")
    (tmp_path / "captions.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(DataError, match=r"images\[0\] needs"):
        load_samples(tmp_path / "captions.json")


def test_images_folder_missing(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(DataError, match="cannot find the image folder"):
        load_samples(tmp_path / "data.jsonl")
    with pytest.raises(DataError, match="images folder not found"):
        load_samples(tmp_path / "data.jsonl", image_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match="dataset file not found"):
        load_samples(tmp_path / "nothing.json")


def test_long_and_empty_captions_dropped_with_counts(tmp_path: Path) -> None:
    make_images(tmp_path / "images", ["a.png", "b.png"])
    long = " ".join(["word"] * (MAX_CAPTION_TOKENS + 1))
    lines = [{"image": "a.png", "captions": ["fine", long, "...", ""]},
             {"image": "b.png", "captions": [long]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    samples = load_samples(tmp_path / "d.jsonl")
    assert [s.image_id for s in samples] == ["a.png"] and samples[0].captions == ["fine"]
    notes = " | ".join(samples.notes)
    assert "2 empty captions dropped" in notes
    assert f"2 captions longer than {MAX_CAPTION_TOKENS} words dropped" in notes
    assert "1 images without any usable caption dropped" in notes


def test_hash_split_is_deterministic_and_roughly_90_5_5() -> None:
    ids = [f"img{i}" for i in range(4000)]
    splits = Counter(hash_split(i) for i in ids)
    assert splits["train"] / 4000 == pytest.approx(0.90, abs=0.02)
    assert splits["val"] / 4000 == pytest.approx(0.05, abs=0.015)
    assert splits["test"] / 4000 == pytest.approx(0.05, abs=0.015)
    assert [hash_split(i) for i in ids[:50]] == [hash_split(i) for i in ids[:50]]


# ----------------------------------------------------------------------------- synthetic, checks, report


def test_synthetic_samples() -> None:
    samples = load_samples(None, synth_train=30, synth_val=5, synth_test=7, seed=2, synth_image_size=64)
    assert Counter(s.split for s in samples) == {"train": 30, "val": 5, "test": 7}
    world = SyntheticWorld(image_size=64, seed=2)
    s = samples[31]
    assert s.scene == world.scene("val", 1) and s.captions == s.scene.captions and s.path is None
    assert np.array_equal(np.asarray(sample_image(s)), np.asarray(s.scene.render()))


def test_write_synthetic_round_trip(tmp_path: Path) -> None:
    write_synthetic(tmp_path / "synth", 8, split="test", seed=4, image_size=64)
    samples = load_samples(tmp_path / "synth" / "captions.json", format="coco")
    world = SyntheticWorld(image_size=64, seed=4)
    assert [s.image_id for s in samples] == [f"test_{i:06d}" for i in range(8)]
    for i, s in enumerate(samples):
        scene = world.scene("test", i)
        assert s.split == "test" and s.captions == scene.captions
        assert s.scene == scene  # re-attached, so the checker and pointing game work on files too
        assert check_caption(s.scene, s.captions[0]).accurate
        assert np.array_equal(np.asarray(sample_image(s)), np.asarray(scene.render()))
    assert samples.notes == []


def test_check_images_and_report(tmp_path: Path) -> None:
    make_images(tmp_path / "images", ["a.png", "b.png"])
    (tmp_path / "images" / "c.jpg").write_text("not an image")
    lines = [{"image": n, "captions": ["a small thing", "another small thing here"], "split": sp}
             for n, sp in (("a.png", "train"), ("b.png", "train"), ("c.jpg", "val"), ("gone.png", "test"))]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    samples = load_samples(tmp_path / "d.jsonl")
    ok, bad = check_images(samples)
    assert ok == 2
    assert {p.name: r for p, r in bad} == {"c.jpg": "not an image (or a format Pillow cannot read)",
                                            "gone.png": "file not found"}
    report = dataset_report(samples, vocab_min_count=3)
    assert report["images"] == 4 and report["images_found"] == 2
    assert report["images_missing"] == 1 and report["images_unreadable"] == 1
    assert report["splits"] == {"train": 2, "val": 1, "test": 1}
    assert report["captions"] == 8
    assert report["captions_per_image"]["mean"] == 2
    assert report["caption_length"]["min"] == 3 and report["caption_length"]["max"] == 4
    assert report["vocab_size"] == 4 + 2  # specials + the train words seen 3+ times: "small", "thing"
    json.dumps(report)


def test_report_on_synthetic() -> None:
    report = dataset_report(load_samples(None, synth_train=20, synth_val=2, synth_test=2))
    assert report["images_found"] == 24 and report["images_missing"] == 0
    assert report["vocab_size"] > 20


def test_unknown_format_and_layout(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(DataError, match="JSON layout not recognised"):
        load_samples(tmp_path / "x.json")
    with pytest.raises(DataError, match="format must be one of"):
        load_samples(tmp_path / "x.json", format="parquet")


# ----------------------------------------------------------------------------- paths stay in the image folder


def _jsonl(path: Path, *images: str) -> Path:
    path.write_text("\n".join(json.dumps({"image": i, "caption": f"thing {n}"}) for n, i in enumerate(images)))
    return path


def _refusal(annotations: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_samples(annotations, **kwargs)
    message = str(info.value)
    assert str(annotations) in message and "\n" not in message
    return message


@pytest.mark.parametrize("entry", ["../secret.png", "../../secret.png", "sub/../../secret.png"])
def test_relative_paths_may_not_climb_out_of_the_image_folder(tmp_path: Path, entry: str) -> None:
    make_images(tmp_path / "data" / "images", ["a.png"])
    make_images(tmp_path, ["secret.png"])
    make_images(tmp_path / "data", ["secret.png"])
    ann = _jsonl(tmp_path / "data" / "d.jsonl", "a.png", entry)
    assert entry in _refusal(ann, image_dir=tmp_path / "data" / "images")
    assert entry in _refusal(ann)  # the folder found beside the annotations fences them in just the same


def test_a_refused_path_reads_the_same_whether_or_not_it_exists(tmp_path: Path) -> None:
    """The message must not tell a probing annotations file which files exist outside the folder."""
    make_images(tmp_path / "images", ["a.png"])
    make_images(tmp_path, ["there.png"])
    (tmp_path / "images" / "there.png").symlink_to(tmp_path / "there.png")
    (tmp_path / "images" / "gone.png").symlink_to(tmp_path / "gone.png")
    for image_dir in (tmp_path / "images", None):
        messages = [_refusal(_jsonl(tmp_path / "d.jsonl", "a.png", e), image_dir=image_dir).replace(e, "X")
                    for e in ("../there.png", "../gone.png", "/etc/passwd", "/no/such/file.png")
                    if image_dir is not None or not e.startswith("/")]
        assert len(set(messages)) == 1, messages


def _linked_folder(tmp_path: Path, names: list[str]) -> Path:
    """An image folder of symlinks (git-annex, DVC's cache, `cp -s`) into a store folder beside it."""
    make_images(tmp_path / "store", names)
    (tmp_path / "images").mkdir()
    for name in names:
        os.symlink(tmp_path / "store" / name, tmp_path / "images" / name)
    return tmp_path / "images"


def test_a_folder_of_symlinks_out_of_it_loads_and_opens(tmp_path: Path) -> None:
    """A user's own links are their data, wherever they point: only the annotations' text is judged."""
    images = _linked_folder(tmp_path, ["a.png", "b.jpg"])
    (tmp_path / "images" / "sub").symlink_to(tmp_path / "store", target_is_directory=True)  # a linked folder too
    ann = _jsonl(tmp_path / "d.jsonl", "a.png", "b.jpg", "sub/a.png")
    for image_dir in (images, None):
        samples = load_samples(ann, image_dir=image_dir, cache=False)
        assert [s.path for s in samples] == [images / "a.png", images / "b.jpg", images / "sub" / "a.png"]
        assert check_images(samples, cache=False) == (3, [])
        assert [sample_image(s).size for s in samples] == [(8, 6)] * 3


def test_a_folder_of_symlinks_trains(tmp_path: Path) -> None:
    from captioner.training import train

    from .conftest import tiny_train_config

    names = [f"{i}.png" for i in range(4)]
    images = _linked_folder(tmp_path, names)
    lines = [{"image": n, "caption": f"a {c} square", "split": "train" if i < 3 else "val"}
             for i, (n, c) in enumerate(zip(names, ["red", "blue", "red", "blue"], strict=True))]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = tiny_train_config(data=str(tmp_path / "d.jsonl"), image_dir=str(images), max_steps=1, batch_size=2,
                            val_every=1, workers=0)
    train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").is_file()


@pytest.mark.parametrize("fenced", [True, False])
def test_climbing_and_outside_absolute_paths_are_still_refused_beside_links(tmp_path: Path, fenced: bool) -> None:
    images = _linked_folder(tmp_path, ["a.png", "x.jpg"])
    entries = ["../x.jpg", "a.png/../../x.jpg"] + ([str(tmp_path / "store" / "x.jpg")] if fenced else [])
    for entry in entries:
        ann = _jsonl(tmp_path / "d.jsonl", "a.png", entry)
        message = _refusal(ann, image_dir=images if fenced else None, cache=False)
        assert f"image path {entry!r} leads outside the image folder" in message


def test_paths_are_used_as_judged(tmp_path: Path) -> None:
    """`link/../x.png` is judged as the folder's x.png, so that is the file opened, not one beside the target."""
    make_images(tmp_path / "images", ["x.png"])
    make_images(tmp_path / "elsewhere" / "deep", ["y.png"])
    Image.new("RGB", (5, 5)).save(tmp_path / "elsewhere" / "x.png")  # what the OS would open for link/../x.png
    (tmp_path / "images" / "link").symlink_to(tmp_path / "elsewhere" / "deep", target_is_directory=True)
    (sample,) = load_samples(_jsonl(tmp_path / "d.jsonl", "link/../x.png"), image_dir=tmp_path / "images")
    assert sample.path == tmp_path / "images" / "x.png" and sample_image(sample).size == (8, 6)


def test_a_dangling_symlink_is_a_missing_file(tmp_path: Path) -> None:
    images = _linked_folder(tmp_path, ["a.png", "b.png"])
    (tmp_path / "store" / "b.png").unlink()  # the link stays, its target is gone (an unfetched annex file)
    ann = _jsonl(tmp_path / "d.jsonl", "b.png", "a.png")
    for image_dir in (images, None):  # a folder of links is found even when the first ones dangle
        samples = load_samples(ann, image_dir=image_dir, cache=False)
        assert check_images(samples, cache=False) == (1, [(images / "b.png", "file not found")])
        with pytest.raises(ImageError, match=r"b\.png: file not found$"):
            sample_image(samples[0])


def test_paths_inside_the_folder_and_a_linked_folder_are_accepted(tmp_path: Path) -> None:
    make_images(tmp_path / "store", ["a.png", "sub/b.png"])
    (tmp_path / "images").symlink_to(tmp_path / "store", target_is_directory=True)  # the whole folder linked
    (tmp_path / "store" / "c.png").symlink_to(tmp_path / "store" / "a.png")  # a link that stays inside
    ann = _jsonl(tmp_path / "d.jsonl", "a.png", "sub/../sub/b.png", "c.png")
    for image_dir in (tmp_path / "images", None):
        samples = load_samples(ann, image_dir=image_dir)
        assert {s.path for s in samples} == {tmp_path / "images" / n for n in ("a.png", "sub/b.png", "c.png")}


def test_absolute_paths_are_the_users_own_only_without_an_image_folder(tmp_path: Path) -> None:
    """Absolute paths are followed when no --images is given; with it, they too must lie inside it."""
    make_images(tmp_path / "images", ["a.png"])
    make_images(tmp_path / "elsewhere", ["b.png"])
    outside, inside = str(tmp_path / "elsewhere" / "b.png"), str(tmp_path / "images" / "a.png")
    ann = _jsonl(tmp_path / "d.jsonl", inside, outside)
    assert {str(s.path) for s in load_samples(ann)} == {inside, outside}
    assert outside in _refusal(ann, image_dir=tmp_path / "images")
    assert [str(s.path) for s in load_samples(_jsonl(ann, inside), image_dir=tmp_path / "images")] == [inside]
