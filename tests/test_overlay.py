"""Overlays: sizes follow the image, heat sits where the weight is, files round-trip, rollout by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageSequence

from captioner.errors import ConfigError
from captioner.overlay import (
    INFERNO,
    attention_rollout,
    heatmap_overlay,
    parse_layer,
    rollout_map,
    sanitize,
    select_maps,
    upsample_map,
    word_grid,
    write_attention,
)


def opened(path: Path) -> tuple[tuple[int, int], int]:
    """(size, number of frames) of an image file, closing it."""
    with Image.open(path) as im:
        return im.size, getattr(im, "n_frames", 1)


def peaked(h: int, w: int, row: float, col: float, sigma: float = 0.7) -> np.ndarray:
    """A softmax-like map over an (h, w) grid with a Gaussian bump at (row, col); sums to 1."""
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * sigma**2)) + 1e-3
    return (m / m.sum()).astype(np.float32)


def scene(size: tuple[int, int] = (320, 240)) -> Image.Image:
    """Grey image with a red circle in the upper right and a blue square lower left."""
    img = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.ellipse((int(0.6 * w), int(0.15 * h), int(0.85 * w), int(0.5 * h)), fill=(220, 30, 30))
    draw.rectangle((int(0.1 * w), int(0.6 * h), int(0.3 * w), int(0.9 * h)), fill=(30, 60, 220))
    return img


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (1, 1), (97, 13)])
def test_overlay_keeps_image_size(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (100, 150, 200))
    out = heatmap_overlay(image, peaked(7, 7, 2, 5))
    assert out.size == size and out.mode == "RGB"
    heat = upsample_map(peaked(7, 7, 2, 5), size)
    assert heat.shape == (size[1], size[0]) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0


def test_upsample_normalises_and_keeps_the_peak() -> None:
    heat = upsample_map(peaked(4, 8, 1, 6), (800, 400))  # cells 100x100 px
    assert heat.min() == 0.0 and heat.max() == pytest.approx(1.0)
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert 100 <= row < 200 and 600 <= col < 700
    assert not upsample_map(np.full((3, 3), 1 / 9), (30, 30)).any()  # nothing stands out in a constant map
    with pytest.raises(ValueError):
        upsample_map(np.ones(5), (10, 10))


def test_heat_is_strongest_where_the_weight_peaks() -> None:
    image = Image.new("RGB", (320, 240), (128, 128, 128))
    out = heatmap_overlay(image, peaked(6, 8, 4, 1))  # cell (4, 1) spans x 40..80, y 160..200
    change = np.abs(np.asarray(out, np.float32) - np.asarray(image, np.float32)).sum(axis=2)  # (240, 320)
    row, col = np.unravel_index(np.argmax(change), change.shape)
    assert 160 <= row < 200 and 40 <= col < 80
    # Far from the peak the image shows through: only the spotlight dimming, no heat colour.
    corner = np.asarray(out)[10, 310].astype(int)
    assert abs(corner[0] - corner[1]) <= 2 and abs(corner[1] - corner[2]) <= 2 and corner[0] > 80


def test_colormap_brightens_monotonically() -> None:
    luminance = INFERNO.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert INFERNO.shape == (256, 3) and INFERNO.dtype == np.uint8
    assert np.all(np.diff(luminance) >= -0.5)  # from black to pale yellow, never darker on the way
    assert luminance[0] < 10 and luminance[-1] > 220


def test_word_grid_grows_with_the_caption() -> None:
    image = scene()
    short_words = ["a", "red", "circle"]
    long_words = str.split("a man in a red jacket and a small dog with a blue collar walk along the beach next to "
                           "the water while two birds fly overhead at dusk")
    assert len(long_words) >= 25
    rng = np.random.default_rng(0)
    short = word_grid(image, short_words, np.stack([peaked(7, 7, 2, 5)] * 3))
    long = word_grid(image, long_words, rng.dirichlet(np.ones(49), len(long_words)).reshape(-1, 7, 7),
                     title="a long caption")
    assert long.width > short.width and long.height > 2 * short.height
    # Per-head maps: one row per word under the image row, each H + 1 panels wide.
    heads = word_grid(image, short_words, rng.dirichlet(np.ones(49), (3, 4)).reshape(3, 4, 7, 7))
    assert heads.width > short.width and heads.height > short.height
    with pytest.raises(ValueError, match="one per word"):
        word_grid(image, short_words, np.stack([peaked(7, 7, 2, 5)] * 2))


def test_write_attention_files_round_trip(tmp_path: Path) -> None:
    out = Path(os.environ.get("CAPTIONER_OVERLAY_DEMO", tmp_path))  # set it to look at the pictures
    image = scene((640, 480))
    # Grid cells are 80x80 px on this 6x8 grid: the circle is near cell (2, 5), the square near (4, 1).
    words = ["a", "red", "circle", "circle", "<unk>", "don't", "blue/square"]
    maps = np.stack([peaked(6, 8, 2.5, 4), peaked(6, 8, 2, 5), peaked(6, 8, 2, 5), peaked(6, 8, 2, 5),
                     peaked(6, 8, 3, 3, 3.0), peaked(6, 8, 3, 3, 3.0), peaked(6, 8, 4, 1)])
    rollout = peaked(6, 8, 2, 5, 1.5)
    files = write_attention(out, "scene", image, words, maps, extra_panels={"encoder rollout": rollout},
                            meta={"model": "test", "beam": 1})
    assert files["grid"] == out / "scene_grid.png" and opened(files["grid"])[0][0] > 0
    word_files = sorted(out.glob("scene_[0-9][0-9]_*.png"))
    assert [p.name for p in word_files] == [
        "scene_00_a.png", "scene_01_red.png", "scene_02_circle.png", "scene_03_circle.png", "scene_04_unk.png",
        "scene_05_don_t.png", "scene_06_blue_square.png"]
    assert all(opened(p)[0] == image.size for p in word_files)
    with Image.open(files["gif"]) as gif:
        # Words 2 and 3 repeat with identical maps; each still gets its own frame (Pillow merges equal frames).
        assert gif.n_frames == len(words) == len(list(ImageSequence.Iterator(gif)))
        assert gif.info["duration"] >= 300 and gif.info.get("loop") == 0
    np.testing.assert_array_equal(np.load(files["weights"]), maps.astype(np.float32))
    record = json.loads(files["json"].read_text())
    assert record["words"] == words and record["grid"] == [6, 8] and record["maps_shape"] == [7, 6, 8]
    assert record["image_size"] == [640, 480] and record["heads"] is None and record["meta"]["beam"] == 1
    np.testing.assert_allclose(record["extra_panels"]["encoder rollout"]["weights"], rollout, atol=1e-6)
    assert (out / record["files"]["extra_encoder_rollout"]).exists()


def test_write_attention_per_head_maps_and_big_images(tmp_path: Path) -> None:
    image = Image.new("RGB", (3000, 1000), (90, 90, 90))
    rng = np.random.default_rng(1)
    maps = rng.dirichlet(np.ones(12), (2, 4)).reshape(2, 4, 3, 4).astype(np.float32)  # (T, H, h, w)
    files = write_attention(tmp_path, "wide", image, ["two", "words"], maps, max_side=600)
    assert opened(files["word_00"])[0] == (600, 200)  # capped, aspect ratio kept
    assert opened(files["gif"])[1] == 2
    assert np.load(files["weights"]).shape == (2, 4, 3, 4)
    record = json.loads(files["json"].read_text())
    assert record["heads"] == 4 and record["grid"] == [3, 4]


def test_write_attention_empty_caption(tmp_path: Path) -> None:
    files = write_attention(tmp_path, "empty", scene(), [], np.zeros((0, 3, 3), np.float32))
    assert "gif" not in files and files["grid"].exists() and files["json"].exists()


def test_sanitize() -> None:
    assert sanitize("Dog") == "dog" and sanitize("<eos>") == "eos" and sanitize("...") == "word"
    assert sanitize("x" * 100) == "x" * 40


# ----------------------------------------------------------------------------- rollout


def test_rollout_by_hand() -> None:
    # Layer 1: two heads, mean [[.5, .5], [.2, .8]]; with the residual 0.5 A + 0.5 I = [[.75, .25], [.1, .9]].
    layer1 = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.4, 0.6]]])
    # Layer 2: one head [[0, 1], [1, 0]]; with the residual [[.5, .5], [.5, .5]].
    layer2 = np.array([[[0.0, 1.0], [1.0, 0.0]]])
    # Rollout = A2 A1: every row is .5 * [.75, .25] + .5 * [.1, .9] = [.425, .575].
    np.testing.assert_allclose(attention_rollout([layer1, layer2]), [[0.425, 0.575], [0.425, 0.575]])
    # Without the residual: [[0, 1], [1, 0]] @ [[.5, .5], [.2, .8]] = [[.2, .8], [.5, .5]].
    np.testing.assert_allclose(attention_rollout([layer1, layer2], residual=False), [[0.2, 0.8], [0.5, 0.5]])
    # Max fusion of layer 1 alone: [[1, 1], [.4, 1]], rows renormalised -> [[.5, .5], [.4/1.4, 1/1.4]].
    np.testing.assert_allclose(attention_rollout([layer1], head_fusion="max", residual=False),
                               [[0.5, 0.5], [0.4 / 1.4, 1 / 1.4]])


def test_rollout_rows_sum_to_one_and_discard_keeps_the_diagonal() -> None:
    rng = np.random.default_rng(0)
    layers = [rng.dirichlet(np.ones(5), (3, 5)) for _ in range(4)]  # (H=3, N=5, N=5), rows on the simplex
    for fusion in ("mean", "max", "min"):
        r = attention_rollout(layers, head_fusion=fusion, discard_ratio=0.4)
        assert r.shape == (5, 5)
        np.testing.assert_allclose(r.sum(axis=1), 1.0)
    one = attention_rollout(layers[:1], discard_ratio=0.6, residual=False)  # 3 of 5 zeroed per row
    assert np.all((one > 0).sum(axis=1) == 2) and np.all(np.diag(one) > 0)
    with pytest.raises(ValueError):
        attention_rollout([])


def test_rollout_map_with_and_without_cls() -> None:
    rollout = np.array([[0.2, 0.1, 0.3, 0.2, 0.2],
                        [0.0, 1.0, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 1.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 1.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 1.0]])
    # CLS first: its row over the four patches, renormalised: [.1, .3, .2, .2] / .8.
    np.testing.assert_allclose(rollout_map(rollout, (2, 2)), [[0.125, 0.375], [0.25, 0.25]])
    # No CLS: the mean over query rows.
    patches = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    np.testing.assert_allclose(rollout_map(patches, (2, 2)), [[0.125, 0.375], [0.375, 0.125]])
    with pytest.raises(ValueError):
        rollout_map(patches, (3, 3))


# ----------------------------------------------------------------------------- choosing maps


def test_select_maps_and_parse_layer() -> None:
    T, L, H, h, w = 3, 2, 4, 2, 3
    cross = np.random.default_rng(0).random((T, L, H, h * w)).astype(np.float32)
    mean_last = select_maps(cross, (h, w))
    np.testing.assert_allclose(mean_last, cross[:, -1].mean(axis=1).reshape(T, h, w), rtol=1e-6)
    per_head = select_maps(cross, (h, w), layer=0, heads="all")
    assert per_head.shape == (T, H, h, w)
    np.testing.assert_array_equal(per_head[1, 2].reshape(-1), cross[1, 0, 2])
    np.testing.assert_allclose(select_maps(cross, (h, w), layer="mean"),
                               cross.mean(axis=(1, 2)).reshape(T, h, w), rtol=1e-5)
    assert parse_layer("last") == -1 and parse_layer("all") == "mean" and parse_layer("0") == 0
    with pytest.raises(ConfigError):
        parse_layer("first")
    with pytest.raises(ConfigError):
        select_maps(cross, (h, w), layer=5)
    with pytest.raises(ValueError):
        select_maps(cross, (3, 3))
