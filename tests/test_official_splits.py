"""Official validation and test files: COCO's captions_val2017.json names no splits, so it is one whole set.

Before: a file without splits was cut into hash buckets everywhere, so `evaluate --data captions_val2017.json`
scored 5 % of it, and there was no way to validate on a separate file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from captioner import checkpoint
from captioner.cli import app
from captioner.data.sources import load_samples, split_or_whole
from captioner.data.synthetic import write_synthetic
from captioner.training import train

from .conftest import tiny_train_config


def _without_splits(folder: Path, n: int, seed: int) -> Path:
    """A COCO-format file of n images whose entries name no split, like captions_train2017.json."""
    path = write_synthetic(folder, n, seed=seed, image_size=48)
    data = json.loads(path.read_text())
    for image in data["images"]:
        image.pop("split")
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("coco")
    return _without_splits(root / "train2017", 40, seed=1), _without_splits(root / "val2017", 12, seed=2)


def test_a_file_without_splits_is_used_whole_and_says_so(coco_like: tuple[Path, Path]) -> None:
    _, val = coco_like
    samples = load_samples(str(val))
    assert not samples.has_splits
    chosen, note = split_or_whole(samples, "test")
    assert len(chosen) == 12 and "names no splits" in note
    karpathy_like = load_samples(str(write_synthetic(val.parent.parent / "with_splits", 6, image_size=48)))
    assert karpathy_like.has_splits and split_or_whole(karpathy_like, "test") == ([], None)


def test_train_on_one_file_and_validate_on_another(coco_like: tuple[Path, Path], tmp_path: Path) -> None:
    train_file, val_file = coco_like
    events: list[tuple[str, dict]] = []
    cfg = tiny_train_config(data=str(train_file), val_data=str(val_file), max_steps=2, val_every=2)
    train(cfg, tmp_path / "run", on_event=lambda kind, data: events.append((kind, data)))
    start = next(data for kind, data in events if kind == "start")
    assert start["train_images"] == 40 and start["val_images"] == 12  # all of each file, no hash buckets
    assert checkpoint.read_jsonl(tmp_path / "run" / checkpoint.METRICS)[-1]["images"] == 12
    saved = json.loads((tmp_path / "run" / checkpoint.CONFIG).read_text())
    assert saved["data"]["val_source"] == str(val_file)


def test_evaluate_scores_a_file_without_splits_whole(coco_like: tuple[Path, Path], tmp_path: Path) -> None:
    train_file, val_file = coco_like
    run = tmp_path / "run"
    train(tiny_train_config(data=str(train_file), max_steps=2, val_every=2), run)
    result = CliRunner().invoke(app, ["evaluate", "--model", str(run), "--data", str(val_file), "--no-java",
                                      "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["images"] == 12, scored
    own = CliRunner().invoke(app, ["evaluate", "--model", str(run), "--no-java", "--json"])
    assert own.exit_code == 0, own.output
    assert json.loads(own.stdout)["images"] < 40  # its own file: the held-out hash bucket, not the training images
