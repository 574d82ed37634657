"""curves.png: drawn from metrics.jsonl, replaced atomically, and never an exception for a torn or foreign file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.checkpoint import METRICS
from captioner.curves import CURVES, HEIGHT, RED, WIDTH, draw_curves, nice_ticks, read_metrics, tick_labels


def _records(steps: int = 2000, every: int = 50, validate_every: int = 500) -> list[dict]:
    """A run's metrics as training writes them: loss curves every `every` steps, validations without a phase."""
    out: list[dict] = []
    for step in range(every, steps + 1, every):
        out.append({"phase": "train", "step": step, "total": steps, "epoch": 0, "lr": 3e-4 * min(1, step / 500),
                    "images_per_s": 50.0, "loss": 2.0 + 6.0 * math.exp(-step / 400), "grad_norm": 1.0})
        if step % validate_every == 0:
            cider = step / steps
            out.append({"step": step, "epoch": 0, "BLEU-4": cider / 4, "CIDEr-D": cider, "distinct_share": 0.5,
                        "collapsed": step == validate_every, "images": 100})
    return out


def _write(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_draws_a_readable_picture(tmp_path: Path) -> None:
    _write(tmp_path, _records())
    path = draw_curves(tmp_path)
    assert path == tmp_path / CURVES
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines, text and grid, not a blank canvas
    assert (pixels == 255).all(axis=-1).mean() > 0.5  # ... on a white background
    assert (np.abs(pixels.astype(int) - RED).sum(axis=-1) < 30).any()  # the collapsed validation is crossed out


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    _write(tmp_path, _records(), tail='{"phase": "train", "step": 2050, "lo')
    assert draw_curves(tmp_path) == tmp_path / CURVES
    assert read_metrics(tmp_path / METRICS).train[-1]["step"] == 2000


@pytest.mark.parametrize("text", [
    "",  # training has not logged yet
    '{"phase": "train", "st',  # killed while writing the first line
    '[1, 2]\n"text"\n{"step": "ten", "loss": 1}\n{"loss": 2}\n',  # no object with an integer step
    '{"phase": "train", "step": 10, "loss": NaN, "lr": "high"}\n{"step": 20, "CIDEr-D": Infinity}\n',  # no number
    "\xff\xfe not text\n",
])
def test_nothing_to_draw_returns_none(tmp_path: Path, text: str) -> None:
    (tmp_path / METRICS).write_text(text, encoding="latin-1")
    assert draw_curves(tmp_path) is None
    assert not (tmp_path / CURVES).exists()


def test_a_missing_file_or_folder_returns_none(tmp_path: Path) -> None:
    assert draw_curves(tmp_path) is None
    assert draw_curves(tmp_path / "not-a-run") is None


def test_redraw_replaces_the_picture_and_leaves_no_temporary(tmp_path: Path) -> None:
    records = _records()
    _write(tmp_path, records[: len(records) // 2])
    first = draw_curves(tmp_path).read_bytes()
    _write(tmp_path, records)
    second = draw_curves(tmp_path).read_bytes()
    assert first != second
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CURVES, METRICS])


def test_only_training_records_or_only_validations_still_draw(tmp_path: Path) -> None:
    records = _records()
    _write(tmp_path / "train", [r for r in records if r.get("phase") == "train"])
    _write(tmp_path / "val", [r for r in records if "phase" not in r])
    assert draw_curves(tmp_path / "train") is not None
    assert draw_curves(tmp_path / "val") is not None


def test_read_metrics_splits_by_phase_and_keeps_the_later_of_a_repeated_step(tmp_path: Path) -> None:
    records = [
        {"phase": "train", "step": 100, "loss": 5.0},
        {"step": 100, "CIDEr-D": 0.1},
        {"phase": "train", "step": 150, "loss": 4.0},  # written before a kill, then logged again after the resume
        {"phase": "train", "step": 150, "loss": 3.9},
        {"phase": "scst", "step": 200, "CIDEr-D": 0.3},  # SCST's validations carry their phase
        {"phase": "scst", "step": 300, "CIDEr-D": 0.2},
    ]
    metrics = read_metrics(_write(tmp_path, records))
    assert [(r["step"], r["loss"]) for r in metrics.train] == [(100, 5.0), (150, 3.9)]
    assert [r["step"] for r in metrics.validations] == [100, 200, 300]
    assert metrics.best()["step"] == 200  # the highest CIDEr-D, not the latest


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.0, 20000.0), (6.5, 8.5), (0.0, 3e-4), (-1.0, 1.0)])
def test_nice_ticks_cover_the_range_in_round_steps(low: float, high: float) -> None:
    ticks = nice_ticks(low, high, count=5)
    assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 7
    steps = {round(b - a, 15) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1


def test_tick_labels_are_short() -> None:
    assert tick_labels([0, 5000, 10000, 15000], compact=True) == ["0", "5k", "10k", "15k"]
    assert tick_labels([0, 1e-4, 2e-4, 3e-4]) == ["0", "1e-4", "2e-4", "3e-4"]
    assert tick_labels([0, 0.25, 0.5], percent=True) == ["0%", "25%", "50%"]
    assert tick_labels([0, 2.5, 5.0]) == ["0.0", "2.5", "5.0"]
    assert tick_labels([6.5, 7.0, 7.5]) == ["6.5", "7.0", "7.5"]
