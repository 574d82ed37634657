"""benchmarks/contact_sheet.py: the photos it picks and the grid it draws, on synthetic images (no data set, no model).

The script is run by hand for the README, so nothing else would notice a refactor breaking it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.sources import Sample
from captioner.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from contact_sheet import Cell, contact_sheet, pick_samples  # noqa: E402

COLOURS = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 180, 30), (120, 40, 140)]


def _cells(n: int, caption: str = "a dog runs on the grass") -> list[Cell]:
    sizes = [(640, 480), (300, 600), (64, 64), (1000, 200), (500, 375)]  # wide, tall, tiny, a strip, Flickr's own
    return [Cell(Image.new("RGB", sizes[i % 5], COLOURS[i % 5]), caption, "A dog is running across a lawn .")
            for i in range(n)]


def test_the_grid_has_a_square_per_photo_and_the_photos_in_them() -> None:
    photo, cells = 200, _cells(5)
    sheet = contact_sheet(cells, cols=3, photo=photo)
    pixels = np.asarray(sheet)
    pad = photo // 20
    assert sheet.width == pad + 3 * (photo + pad)
    for i in range(3):  # the first row: each photo centred in its square
        x = pad + i * (photo + pad) + photo // 2
        assert tuple(pixels[pad + photo // 2, x]) == COLOURS[i]
    assert (np.abs(pixels.astype(int) - (31, 100, 180)).sum(axis=-1) < 60).any()  # the "ours:" label's colour


def test_longer_captions_make_a_taller_sheet_and_fewer_photos_a_narrower_one() -> None:
    short = contact_sheet(_cells(4), cols=4, photo=160)
    long = contact_sheet(_cells(4, "a dog " * 40 + "unbrokenwordlongerthanthewholephotoisstillcutintopieces"),
                         cols=4, photo=160)
    assert long.width == short.width and long.height > short.height
    assert contact_sheet(_cells(2), cols=4, photo=160).width < short.width  # two photos: two columns


def test_an_empty_sheet_or_bad_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one photo"):
        contact_sheet([])
    with pytest.raises(ValueError, match="cols"):
        contact_sheet(_cells(1), cols=0)


def _samples() -> list[Sample]:
    return [Sample(f"img{i:03d}", [f"caption {i}"], "val" if i % 3 else "train") for i in range(60)]


def test_picks_are_deterministic_in_the_seed_and_stay_in_the_split() -> None:
    samples = _samples()
    picked = pick_samples(samples, "val", 8, seed=0)
    assert len(picked) == 8 and all(s.split == "val" for s in picked)
    assert [s.image_id for s in pick_samples(list(reversed(samples)), "val", 8, seed=0)] == \
        [s.image_id for s in picked]  # the order the file lists them in does not matter
    assert [s.image_id for s in pick_samples(samples, "val", 8, seed=1)] != [s.image_id for s in picked]
    assert len(pick_samples(samples, "train", 100, seed=0)) == 20  # no more than the split holds


def test_a_missing_split_is_a_one_line_error() -> None:
    with pytest.raises(DataError, match="no test split .*train, val"):
        pick_samples(_samples(), "test", 8, seed=0)
