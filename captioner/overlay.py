"""Attention overlays: where the model looked for each word, drawn over the original image.

Pure functions of (PIL image, words, attention weights) -> PIL images and files; no model code and no
matplotlib. Maps are (T, h, w) (one per word) or (T, H, h, w) (one per word and head) over the encoder grid,
which covers the whole image; they are stretched over the image's own size and aspect ratio, so pass the
original EXIF-upright image rather than the squashed square the model saw. Also Abnar & Zuidema's attention
rollout for the ViT encoder's self-attention.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captioner.errors import ConfigError

# ----------------------------------------------------------------------------- colours

# Anchor colours sampled along the 'inferno' colormap (black -> purple -> orange -> pale yellow): perceptually
# uniform and readable in greyscale, so the brightest colour is also the most attended place.
_INFERNO_ANCHORS = np.array([
    (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
    (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164),
], dtype=np.float64)


def _colormap_lut(anchors: np.ndarray, size: int = 256) -> np.ndarray:
    # Linear interpolation of each channel between equally spaced anchors -> (size, 3) uint8.
    at = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, size)
    return np.stack([np.interp(t, at, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


INFERNO = _colormap_lut(_INFERNO_ANCHORS)  # (256, 3) uint8, read-only by convention


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB uint8 (..., 3) through the inferno lookup table."""
    index = np.clip(np.nan_to_num(values) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return INFERNO[index]


# ----------------------------------------------------------------------------- single maps


def upsample_map(weights_hw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stretch an (h, w) attention map smoothly to `size` = (width, height); returns (height, width) in [0, 1].

    Bicubic (PIL, float mode), then min-max normalised for display: the least attended place is 0, the
    most attended 1. A constant map has no place that stands out and comes back all zeros.
    """
    grid = np.nan_to_num(np.asarray(weights_hw, dtype=np.float32))
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"attention map must be a non-empty (h, w) array, got shape {grid.shape}")
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"size must be at least 1x1, got {size}")
    big = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    # Bicubic overshoots a little around sharp peaks; clip back to the range of the weights themselves.
    big = np.clip(big, grid.min(), grid.max())
    low, high = float(big.min()), float(big.max())
    if high - low <= 1e-12 * max(abs(high), 1.0):
        return np.zeros((height, width), dtype=np.float32)
    return ((big - low) / (high - low)).astype(np.float32)  # (height, width)


def heatmap_overlay(image: Image.Image, weights_hw: np.ndarray, *, alpha: float = 0.55,
                    dim: float = 0.3) -> Image.Image:
    """Blend the colour-mapped attention map over the image; same size as `image`.

    Each pixel is mixed with its heat colour in proportion to alpha * weight, so weakly attended places show
    the image itself and the peak is painted at full `alpha`; unattended places are also darkened by up to
    `dim`, a spotlight that keeps the attended place readable on bright images.
    """
    if not (0.0 <= alpha <= 1.0 and 0.0 <= dim <= 1.0):
        raise ValueError(f"alpha and dim must be in [0, 1], got alpha={alpha}, dim={dim}")
    rgb = image.convert("RGB")
    heat = upsample_map(weights_hw, rgb.size)[..., None]  # (height, width, 1) in [0, 1]
    base = np.asarray(rgb, dtype=np.float32)  # (height, width, 3)
    colour = colorize(heat[..., 0]).astype(np.float32)  # (height, width, 3)
    mix = alpha * heat
    out = base * (1.0 - dim * (1.0 - heat)) * (1.0 - mix) + colour * mix
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------- text


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # old Pillow or no FreeType: small bitmap font


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line is cut into pieces."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines or [""]


def _line_height(font: Any) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom - min(top, 0)) + 4


# ----------------------------------------------------------------------------- grids


def _fit(image: Image.Image, box: int) -> Image.Image:
    # Scale so the longer side is `box` pixels (up or down), keeping the aspect ratio.
    w, h = image.size
    scale = box / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def _check_maps(words: Sequence[str], maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim not in (3, 4):
        raise ValueError(f"maps must be (T, h, w) or (T, H, h, w), got shape {maps.shape}")
    if maps.shape[0] != len(words):
        raise ValueError(f"{len(words)} words but {maps.shape[0]} attention maps; need one per word")
    return maps


def word_grid(image: Image.Image, words: Sequence[str], maps: np.ndarray, *, title: str | None = None,
              cols: int | None = None, panel: int = 224, extra_panels: Mapping[str, np.ndarray] | None = None,
              alpha: float = 0.55) -> Image.Image:
    """One panel per word with the word under it, after a first panel of the image and its caption.

    maps (T, h, w): panels flow left to right in rows of `cols`. maps (T, H, h, w): the first row holds the
    image (and extra panels), then one row per word: the head average, then each head. `extra_panels` adds
    labelled maps (e.g. the encoder's attention rollout) after the image. The image is scaled so its longer
    side is `panel` pixels.
    """
    maps = _check_maps(words, maps)
    rgb = image.convert("RGB")
    small = _fit(rgb, panel)  # every panel shows the image at this size
    pad = max(4, panel // 28)
    word_font, text_font = _font(max(10, panel // 10)), _font(max(9, panel // 15))
    caption = " ".join(words) if words else "(empty caption)"

    # Each cell: (image or None for an empty slot, label, font, label colour).
    first = [(small, caption, text_font, (0, 0, 0))]
    first += [(heatmap_overlay(small, m, alpha=alpha), name, text_font, (90, 30, 120))
              for name, m in (extra_panels or {}).items()]
    if maps.ndim == 3:
        cells = first + [(heatmap_overlay(small, m, alpha=alpha), w, word_font, (0, 0, 0))
                         for w, m in zip(words, maps, strict=True)]
        cols = cols or min(len(cells), max(4, math.ceil(math.sqrt(len(cells)))))
        rows = [cells[i:i + cols] for i in range(0, len(cells), cols)]
    else:
        heads = maps.shape[1]
        cols = cols or heads + 1
        rows = [first[i:i + cols] for i in range(0, len(first), cols)]
        for w, m in zip(words, maps, strict=True):  # m (H, h, w)
            row = [(heatmap_overlay(small, m.mean(axis=0), alpha=alpha), w, word_font, (0, 0, 0))]
            row += [(heatmap_overlay(small, m[k], alpha=alpha), f"head {k}", text_font, (60, 60, 60))
                    for k in range(heads)]
            rows.extend(row[i:i + cols] for i in range(0, len(row), cols))
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")

    # Cells are as wide as the fitted image, but not so narrow (tall images) that labels cannot fit.
    cell_w, cell_h = max(small.width, 2 * panel // 3), small.height
    width = pad + cols * (cell_w + pad)
    title_font = _font(max(12, panel // 9))
    title_lines = _wrap(title, title_font, width - 2 * pad) if title else []
    title_h = len(title_lines) * _line_height(title_font) + (pad if title_lines else 0)
    row_labels = [[_wrap(label, font, cell_w) for _, label, font, _ in row] for row in rows]
    label_hs = [max(len(lines) * _line_height(font) for lines, (_, _, font, _) in zip(labels, row, strict=True))
                for labels, row in zip(row_labels, rows, strict=True)]
    height = pad + title_h + sum(cell_h + lh + pad for lh in label_hs)

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for line in title_lines:
        draw.text((pad, y), line, fill=(0, 0, 0), font=title_font)
        y += _line_height(title_font)
    y += pad if title_lines else 0
    for row, labels, label_h in zip(rows, row_labels, label_hs, strict=True):
        for c, ((img, _, font, colour), lines) in enumerate(zip(row, labels, strict=True)):
            x = pad + c * (cell_w + pad)
            canvas.paste(img, (x + (cell_w - img.width) // 2, y))
            ty = y + cell_h + 2
            for line in lines:
                draw.text((x + (cell_w - font.getlength(line)) / 2, ty), line, fill=colour, font=font)
                ty += _line_height(font)
        y += cell_h + label_h + pad
    return canvas


def _gif_frame(overlay: Image.Image, word: str, index: int, total: int, font: Any, small_font: Any) -> Image.Image:
    band = _line_height(font) + 12
    frame = Image.new("RGB", (overlay.width, overlay.height + band), (255, 255, 255))
    frame.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(frame)
    counter = f"{index + 1}/{total}"
    draw.text((overlay.width - small_font.getlength(counter) - 6, overlay.height + 8), counter, fill=(120, 120, 120),
              font=small_font)
    shown = _wrap(word, font, max(overlay.width - 60, 10))[0]
    draw.text(((overlay.width - font.getlength(shown)) / 2, overlay.height + 6), shown, fill=(0, 0, 0), font=font)
    return frame


# ----------------------------------------------------------------------------- files


def sanitize(word: str, max_len: int = 40) -> str:
    """A word as a safe file name part: lowercase letters, digits, '-' and '_' only."""
    safe = re.sub(r"[^a-z0-9_-]+", "_", word.lower()).strip("_")[:max_len]
    return safe or "word"


def write_attention(out_dir: str | Path, stem: str, image: Image.Image, words: Sequence[str], maps: np.ndarray, *,
                    extra_panels: Mapping[str, np.ndarray] | None = None, meta: Mapping[str, Any] | None = None,
                    max_side: int = 1024, gif_side: int = 480, duration_ms: int = 900) -> dict[str, Path]:
    """Write every view of one caption's attention into `out_dir`; returns {kind: path}.

    Files: `{stem}_grid.png` (word_grid), `{stem}_{i:02d}_{word}.png` (overlay per word at the image's
    aspect ratio, longer side at most `max_side`), `{stem}.gif` (one frame per word, word written under
    it), `{stem}_weights.npy` (the maps as given, float32 (T, h, w) or (T, H, h, w)),
    `{stem}_attention.json` (words, grid, shapes, image size, extra panels, meta) and
    `{stem}_extra_{name}.png` per extra panel. Per-head maps are averaged for the per-word files and GIF.
    Keys: grid, gif, weights, json, word_00.., extra_{name}. An empty caption writes no GIF or word files.
    """
    maps = _check_maps(words, maps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rgb = image.convert("RGB")
    per_word = maps if maps.ndim == 3 else maps.mean(axis=1)  # (T, h, w)
    shown = _fit(rgb, max_side) if max(rgb.size) > max_side else rgb
    paths: dict[str, Path] = {}

    grid_path = out / f"{stem}_grid.png"
    word_grid(rgb, words, maps, title=stem, extra_panels=extra_panels).save(grid_path)
    paths["grid"] = grid_path

    frames: list[Image.Image] = []
    gif_image = _fit(rgb, gif_side)
    font, small_font = _font(max(14, gif_side // 16)), _font(max(10, gif_side // 30))
    for i, (word, m) in enumerate(zip(words, per_word, strict=True)):
        path = out / f"{stem}_{i:02d}_{sanitize(word)}.png"
        heatmap_overlay(shown, m).save(path)
        paths[f"word_{i:02d}"] = path
        frames.append(_gif_frame(heatmap_overlay(gif_image, m), word, i, len(words), font, small_font))
    if frames:
        gif_path = out / f"{stem}.gif"
        # Every frame differs (its counter), so Pillow never merges two and there is one frame per word.
        frames[0].save(gif_path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
        paths["gif"] = gif_path

    extras: dict[str, Any] = {}
    for name, m in (extra_panels or {}).items():
        m = np.asarray(m, dtype=np.float32)
        path = out / f"{stem}_extra_{sanitize(name)}.png"
        heatmap_overlay(shown, m).save(path)
        paths[f"extra_{sanitize(name)}"] = path
        extras[name] = {"shape": list(m.shape), "weights": m.round(6).tolist(), "file": path.name}

    weights_path = out / f"{stem}_weights.npy"
    np.save(weights_path, maps.astype(np.float32))
    paths["weights"] = weights_path

    json_path = out / f"{stem}_attention.json"
    record = {
        "words": list(words),
        "grid": list(maps.shape[-2:]),  # (h, w) of the encoder grid
        "maps_shape": list(maps.shape),  # (T, h, w) or (T, H, h, w), as in the .npy file
        "heads": int(maps.shape[1]) if maps.ndim == 4 else None,
        "image_size": list(rgb.size),  # (width, height) of the image the overlays are drawn on
        "files": {k: p.name for k, p in paths.items()},
        "extra_panels": extras,
        "meta": dict(meta or {}),
    }
    json_path.write_text(json.dumps(record, indent=2, default=str))
    paths["json"] = json_path
    return paths


# ----------------------------------------------------------------------------- choosing maps


def parse_layer(text: str) -> int | str:
    """`--layer` value -> a layer index (negative counts from the end) or "mean" (average of all layers)."""
    value = text.strip().lower()
    if value == "last":
        return -1
    if value in ("all", "mean"):
        return "mean"
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--layer must be last, all or a layer index, got {text!r}") from None


def check_layer(layer: int | str, n_layers: int) -> None:
    """Refuse a layer choice the decoder does not have (an index counts from the end when negative)."""
    if layer != "mean" and not (isinstance(layer, int) and -n_layers <= layer < n_layers):
        raise ConfigError(f"layer {layer!r} does not exist: the decoder has {n_layers} layers")


def select_maps(cross: np.ndarray, grid: tuple[int, int], *, layer: int | str = -1, heads: str = "mean") -> np.ndarray:
    """Decoder cross-attention (T, L, H, N) -> maps (T, h, w) (heads averaged) or (T, H, h, w) (heads="all")."""
    cross = np.asarray(cross, dtype=np.float32)
    if cross.ndim != 4:
        raise ValueError(f"cross-attention must be (T, L, H, N), got shape {cross.shape}")
    T, L, H, N = cross.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"grid {grid} has {h * w} cells but the attention covers N={N} regions")
    check_layer(layer, L)
    chosen = cross.mean(axis=1) if layer == "mean" else cross[:, layer]  # (T, H, N)
    if heads == "mean":
        return chosen.mean(axis=1).reshape(T, h, w)
    if heads == "all":
        return chosen.reshape(T, H, h, w)
    raise ConfigError(f"heads must be mean or all, got {heads!r}")


# ----------------------------------------------------------------------------- attention rollout


def attention_rollout(layer_weights: Sequence[np.ndarray], *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      residual: bool = True) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020) of self-attention weights, one (H, N, N) array per layer.

    Per layer: fuse the heads (mean, max or min), optionally zero the `discard_ratio` smallest weights of
    each row (never the diagonal), account for the residual stream as 0.5 * A + 0.5 * I, renormalise the
    rows, and multiply through the layers: R = A_L ... A_2 A_1. Row i of R says how much each input token
    contributes to token i's output. Returns (N, N), rows summing to 1.
    """
    if not layer_weights:
        raise ValueError("attention_rollout needs at least one layer of weights")
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion must be mean, max or min, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    rollout: np.ndarray | None = None
    for weights in layer_weights:
        a = np.asarray(weights, dtype=np.float64)  # (H, N, N)
        if a.ndim != 3 or a.shape[1] != a.shape[2]:
            raise ValueError(f"each layer's weights must be (H, N, N), got shape {a.shape}")
        fused = getattr(a, head_fusion)(axis=0)  # (N, N)
        N = fused.shape[0]
        drop = int(discard_ratio * N)
        if drop:
            fused = fused.copy()
            masked = np.where(np.eye(N, dtype=bool), np.inf, fused)  # the diagonal is never among the smallest
            smallest = np.argsort(masked, axis=1, kind="stable")[:, :drop]  # (N, drop)
            np.put_along_axis(fused, smallest, 0.0, axis=1)
        if residual:
            fused = 0.5 * fused + 0.5 * np.eye(N)
        fused = fused / np.maximum(fused.sum(axis=1, keepdims=True), 1e-12)
        if rollout is not None and rollout.shape != fused.shape:
            raise ValueError(f"layers disagree on the number of tokens: {rollout.shape} vs {fused.shape}")
        rollout = fused if rollout is None else fused @ rollout
    assert rollout is not None
    return rollout


def rollout_map(rollout: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Rollout (N', N') -> (h, w) map over the patches, summing to 1.

    N' - h*w leading tokens (a CLS token, perhaps registers) are not patches: when there are any, the map
    is the first (CLS) token's row over the patch columns; otherwise the mean of all rows.
    """
    rollout = np.asarray(rollout, dtype=np.float64)
    h, w = grid
    n_prefix = rollout.shape[0] - h * w
    if rollout.ndim != 2 or rollout.shape[0] != rollout.shape[1] or n_prefix < 0:
        raise ValueError(f"rollout of shape {rollout.shape} does not fit a {h}x{w} grid")
    row = rollout[0, n_prefix:] if n_prefix else rollout.mean(axis=0)  # (h*w,)
    total = row.sum()
    row = row / total if total > 0 else np.full_like(row, 1.0 / row.size)
    return row.reshape(h, w)
