"""Training curves: a run's metrics.jsonl drawn as one picture, `curves.png` in the run directory.

Five panels against the training step: the training loss (as logged, and smoothed), the learning rate, and the
validation BLEU-4, CIDEr-D and share of distinct captions. Collapsed validations are crossed out in red and the
best validation (highest CIDEr-D) is a dashed green line through every panel. Drawn with Pillow alone, so the
picture costs no plotting dependency; training redraws it after every validation, so it is cheap and a torn or
foreign metrics file only means less (or nothing) to draw, never an exception.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from captioner.checkpoint import METRICS, atomic_write
from captioner.overlay import _font

CURVES = "curves.png"
WIDTH, HEIGHT = 1200, 800  # the picture's size in pixels
SCALE = 2  # drawn at twice the size and halved: Pillow draws lines without antialiasing
SMOOTHING = 0.9  # the smoothed loss is an exponential moving average with this decay per logged record

Colour = tuple[int, int, int]
INK, FAINT_INK, GRID, FRAME = (30, 30, 30), (110, 110, 110), (228, 228, 228), (150, 150, 150)
BLUE, LIGHT_BLUE, ORANGE, PURPLE = (31, 119, 180), (165, 200, 228), (230, 120, 20), (120, 70, 160)
TEAL, GOLD = (20, 140, 130), (190, 150, 0)
RED, GREEN = (210, 30, 30), (40, 150, 60)  # collapsed validations, the best checkpoint


@dataclass
class Metrics:
    """A run's metrics.jsonl split into training records and validation records, each sorted by step."""

    train: list[dict[str, Any]]
    validations: list[dict[str, Any]]

    def best(self) -> dict[str, Any] | None:
        """The validation with the highest CIDEr-D (the earliest of equals), or None when none has one."""
        scored = [r for r in self.validations if _number(r, "CIDEr-D") is not None]
        return max(scored, key=lambda r: r["CIDEr-D"], default=None)


def read_metrics(path: Path) -> Metrics:
    """Read metrics.jsonl: lines with "phase": "train" are the loss curve, the others with a step validations.

    A line that is not a JSON object with an integer step (a torn last line, foreign text) is skipped, as is an
    unreadable file. A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps the
    later record.
    """
    train: dict[int, dict[str, Any]] = {}
    validations: dict[int, dict[str, Any]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            continue
        (train if record.get("phase") == "train" else validations)[step] = record
    return Metrics([train[s] for s in sorted(train)], [validations[s] for s in sorted(validations)])


def draw_curves(run_dir: Path, *, best_step: int | None = None) -> Path | None:
    """Draw `run_dir/metrics.jsonl` into `run_dir/curves.png` (written atomically) and return its path.

    Returns None, writing nothing, when the file is missing or holds no record with a number to draw.
    best_step: the step to mark as the best checkpoint; None marks the validation with the highest CIDEr-D.
    A picture that cannot be written raises a one-line CheckpointError, like every other run-directory write.
    """
    run_dir = Path(run_dir)
    image = render_curves(read_metrics(run_dir / METRICS), title=run_dir.name, best_step=best_step)
    if image is None:
        return None
    path = run_dir / CURVES
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


# ----------------------------------------------------------------------------- what each panel shows


@dataclass
class Series:
    """One line of a panel: (step, value) points, drawn in `colour`; dots at the points when `dots`."""

    label: str
    points: list[tuple[float, float]]
    colour: Colour
    width: float = 2.0
    dots: bool = False


@dataclass
class Panel:
    """One plot: its lines, the y range they need, and the steps to cross out as collapsed."""

    title: str
    series: list[Series]
    crosses: list[tuple[float, float]] = field(default_factory=list)
    floor: float | None = None  # the y axis starts here whatever the values (scores start at 0)
    ceiling: float | None = None  # ... and ends here (shares end at 1)
    percent: bool = False  # tick labels as percentages
    empty: str = "nothing logged yet"

    def has_points(self) -> bool:
        """Whether any line has a point to draw."""
        return any(s.points for s in self.series)


def _number(record: dict[str, Any], key: str) -> float | None:
    """record[key] as a finite float, or None (missing, a bool, text, NaN or infinite)."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _points(records: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), v) for r in records if (v := _number(r, key)) is not None]


def _smoothed(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing is)."""
    out, average = [], 0.0
    for i, (x, y) in enumerate(points, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * y
        out.append((x, average / (1 - SMOOTHING ** i)))
    return out


def panels(metrics: Metrics) -> list[Panel]:
    """The five panels of the picture, in reading order."""
    loss = _points(metrics.train, "loss")
    vals = metrics.validations
    collapsed = [r for r in vals if r.get("collapsed") is True]

    def crosses(key: str) -> list[tuple[float, float]]:
        return _points(collapsed, key)

    share = Panel("distinct captions", [Series("distinct share", _points(vals, "distinct_share"), TEAL, dots=True)],
                  crosses("distinct_share"), floor=0.0, ceiling=1.0, percent=True, empty="no validation yet")
    if any(_number(r, "accuracy") is not None for r in vals):  # the built-in world's checker: also a share
        share.title = "distinct captions and accuracy"
        share.series.append(Series("accuracy", _points(vals, "accuracy"), GOLD, dots=True))
    return [
        Panel("training loss", [Series("logged", loss, LIGHT_BLUE, width=1.5),
                                Series("smoothed", _smoothed(loss), BLUE, width=2.5)]),
        Panel("learning rate", [Series("lr", _points(metrics.train, "lr"), ORANGE)], floor=0.0),
        Panel("validation BLEU-4", [Series("BLEU-4", _points(vals, "BLEU-4"), PURPLE, dots=True)],
              crosses("BLEU-4"), floor=0.0, empty="no validation yet"),
        Panel("validation CIDEr-D", [Series("CIDEr-D", _points(vals, "CIDEr-D"), BLUE, dots=True)],
              crosses("CIDEr-D"), floor=0.0, empty="no validation yet"),
        share,
    ]


# ----------------------------------------------------------------------------- drawing


def render_curves(metrics: Metrics, *, title: str = "", best_step: int | None = None) -> Image.Image | None:
    """The picture of `metrics` (WIDTH x HEIGHT RGB), or None when no panel has a point to draw."""
    shown = panels(metrics)
    if not any(p.has_points() for p in shown):
        return None
    best = metrics.best()
    if best_step is None and best is not None:
        best_step = best["step"]
    steps = [x for p in shown for s in p.series for x, _ in s.points]
    x_range = _padded(0.0, max(steps), floor=0.0)

    s = SCALE
    canvas = Image.new("RGB", (WIDTH * s, HEIGHT * s), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    fonts = _Fonts(title=_font(20 * s), text=_font(14 * s), small=_font(12 * s))
    margin, header = 16 * s, 44 * s
    draw.text((margin, 12 * s), _headline(title, metrics, best, best_step), fill=INK, font=fonts.title)

    # Two rows: the training panels side by side above the three validation panels.
    row_h = (HEIGHT * s - header - margin) // 2
    rows = [shown[:2], shown[2:]]
    for r, row in enumerate(rows):
        top = header + r * row_h
        width = (WIDTH * s - margin) // len(row)
        for c, panel in enumerate(row):
            box = (margin + c * width, top, margin + (c + 1) * width - margin, top + row_h - margin // 2)
            _draw_panel(draw, box, panel, x_range, best_step, fonts)
    return canvas.reduce(s)


@dataclass
class _Fonts:
    title: Any
    text: Any
    small: Any


def _headline(title: str, metrics: Metrics, best: dict[str, Any] | None, best_step: int | None) -> str:
    parts = [title] if title else []
    last = max([r["step"] for r in metrics.train + metrics.validations], default=0)
    total = next((r["total"] for r in reversed(metrics.train) if isinstance(r.get("total"), int)), None)
    parts.append(f"step {last:,} of {total:,}" if total else f"step {last:,}")
    if best is not None and best["step"] == best_step:
        parts.append(f"best CIDEr-D {best['CIDEr-D']:.3f} at step {best_step:,}")
    elif best_step is not None:
        parts.append(f"best checkpoint at step {best_step:,}")
    collapsed = sum(r.get("collapsed") is True for r in metrics.validations)
    if collapsed:
        parts.append(f"{collapsed} collapsed validation{'s' * (collapsed > 1)}")
    return "   ·   ".join(parts)


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel,
                x_range: tuple[float, float], best_step: int | None, fonts: _Fonts) -> None:
    """One panel in `box` (left, top, right, bottom): title and legend above, axes with numbered ticks, lines."""
    s = SCALE
    left, top, right, bottom = box
    draw.text((left, top), panel.title, fill=INK, font=fonts.text)
    values = [y for series in panel.series for _, y in series.points]
    y_range = _padded(min(values, default=0.0), max(values, default=1.0), floor=panel.floor, ceiling=panel.ceiling)
    y_ticks = nice_ticks(*y_range, count=5)
    y_range = (min(y_range[0], y_ticks[0]), max(y_range[1], y_ticks[-1]))  # the axis ends on a tick
    if not values:  # an empty panel keeps its frame and steps but claims no values and no legend
        y_ticks = []
    else:
        _legend(draw, panel, right, top, fonts, best_step is not None)
    y_labels = tick_labels(y_ticks, percent=panel.percent) if y_ticks else []
    label_w = max((fonts.small.getlength(t) for t in y_labels), default=0.0)
    line_h = _text_height(fonts.small)
    plot = (left + int(label_w) + 8 * s, top + _text_height(fonts.text) + 10 * s, right - 4 * s,
            bottom - 2 * line_h - 10 * s)
    pl, pt, pr, pb = plot

    def to_x(x: float) -> float:
        return pl + (x - x_range[0]) / (x_range[1] - x_range[0]) * (pr - pl)

    def to_y(y: float) -> float:
        return pb - (y - y_range[0]) / (y_range[1] - y_range[0]) * (pb - pt)

    for tick, text in zip(y_ticks, y_labels, strict=True):
        y = to_y(tick)
        draw.line([(pl, y), (pr, y)], fill=GRID, width=s)
        draw.text((pl - 6 * s - fonts.small.getlength(text), y - line_h / 2), text, fill=FAINT_INK, font=fonts.small)
    x_ticks = [t for t in nice_ticks(*x_range, count=6) if x_range[0] <= t <= x_range[1]]
    for tick, text in zip(x_ticks, tick_labels(x_ticks, compact=True), strict=True):
        x = to_x(tick)
        draw.line([(x, pt), (x, pb)], fill=GRID, width=s)
        draw.line([(x, pb), (x, pb + 4 * s)], fill=FRAME, width=s)
        draw.text((x - fonts.small.getlength(text) / 2, pb + 6 * s), text, fill=FAINT_INK, font=fonts.small)
    draw.text(((pl + pr) / 2 - fonts.small.getlength("step") / 2, pb + 8 * s + line_h), "step", fill=FAINT_INK,
              font=fonts.small)
    draw.rectangle(plot, outline=FRAME, width=s)

    if not panel.has_points():
        message = panel.empty
        draw.text(((pl + pr - fonts.text.getlength(message)) / 2, (pt + pb - _text_height(fonts.text)) / 2),
                  message, fill=FAINT_INK, font=fonts.text)
        return
    if best_step is not None and x_range[0] <= best_step <= x_range[1]:
        _dashed_vertical(draw, to_x(best_step), pt, pb, GREEN, width=2 * s, dash=7 * s)
    for series in panel.series:
        xy = [(to_x(x), to_y(y)) for x, y in series.points]
        if len(xy) > 1:
            draw.line(xy, fill=series.colour, width=round(series.width * s), joint="curve")
        if series.dots or len(xy) == 1:
            r = 3.5 * s
            for x, y in xy:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=series.colour)
    for x, y in panel.crosses:
        _cross(draw, to_x(x), to_y(y), 6 * s, RED, width=3 * s)


def _legend(draw: ImageDraw.ImageDraw, panel: Panel, right: float, top: float, fonts: _Fonts, best: bool) -> None:
    """The panel's legend in its title row, right-aligned: a swatch and a name per entry."""
    s = SCALE
    entries: list[tuple[str, Callable[[float, float], None]]] = []
    for series in panel.series:
        if len(panel.series) > 1 or series.dots:  # a lone plain line needs no legend: the title names it

            def swatch(x: float, y: float, colour: Colour = series.colour, dots: bool = series.dots) -> None:
                draw.line([(x, y), (x + 18 * s, y)], fill=colour, width=3 * s)
                if dots:
                    draw.ellipse((x + 9 * s - 3.5 * s, y - 3.5 * s, x + 9 * s + 3.5 * s, y + 3.5 * s), fill=colour)

            entries.append((series.label, swatch))
    if panel.crosses:
        entries.append(("collapsed", lambda x, y: _cross(draw, x + 9 * s, y, 6 * s, RED, width=3 * s)))
    if best:
        entries.append(("best", lambda x, y: _dashed_vertical(draw, x + 9 * s, y - 8 * s, y + 8 * s, GREEN,
                                                              width=2 * s, dash=4 * s)))
    x = right
    y = top + _text_height(fonts.small) / 2 + 2 * s
    for label, swatch in reversed(entries):
        x -= fonts.small.getlength(label)
        draw.text((x, top + 2 * s), label, fill=INK, font=fonts.small)
        x -= 24 * s
        swatch(x, y)
        x -= 14 * s


def _cross(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, colour: Colour, *, width: int) -> None:
    draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=width)
    draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=width)


def _dashed_vertical(draw: ImageDraw.ImageDraw, x: float, top: float, bottom: float, colour: Colour, *,
                     width: int, dash: int) -> None:
    y = top
    while y < bottom:
        draw.line([(x, y), (x, min(y + dash, bottom))], fill=colour, width=width)
        y += 2 * dash


def _text_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Ag0")
    return int(bottom - min(top, 0))


# ----------------------------------------------------------------------------- axes


def _padded(low: float, high: float, *, floor: float | None = None,
            ceiling: float | None = None) -> tuple[float, float]:
    """An axis range that holds [low, high] with a little room, pinned to `floor`/`ceiling`, never empty."""
    if floor is not None:
        low = min(low, floor)
    if ceiling is not None:
        high = max(high, ceiling)
    if high - low <= 1e-12 * max(abs(high), abs(low), 1.0):  # one value: room on both sides
        room = abs(high) * 0.1 or 1.0
        return (low if floor is not None else low - room, high + room)
    room = (high - low) * 0.05
    return (low if floor is not None else low - room, high if ceiling is not None else high + room)


def nice_ticks(low: float, high: float, *, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    span = high - low
    if not (math.isfinite(span) and span > 0):
        return [low]
    raw = span / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_labels(ticks: Sequence[float], *, percent: bool = False, compact: bool = False) -> list[str]:
    """Tick values as short text, with as many decimals as their spacing needs and no more.

    percent: 0.25 -> "25%". compact: 12000 -> "12k", 1500000 -> "1.5M" (steps). Values below 0.01 (learning
    rates) in scientific notation: 0.0003 -> "3e-4".
    """
    if percent:
        return [f"{text}%" for text in tick_labels([t * 100 for t in ticks])]
    step = min((abs(b - a) for a, b in zip(ticks, ticks[1:], strict=False) if b != a), default=abs(ticks[0]) or 1.0)
    biggest = max(abs(t) for t in ticks)
    if compact and biggest >= 10_000:
        unit, name = (1e6, "M") if biggest >= 1e7 else (1e3, "k")
        return [f"{text}{name}" if t else "0" for t, text in zip(ticks, tick_labels([t / unit for t in ticks]),
                                                                 strict=True)]
    if 0 < biggest < 0.01:
        digits = max(0, -math.floor(math.log10(step)) + math.floor(math.log10(biggest)))
        return [_scientific(t, digits) for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
    decimals += any(round(t, decimals) != round(t, decimals + 1) for t in ticks)  # 2.5 steps need one more
    return [f"{t:.{decimals}f}" for t in ticks]


def _scientific(value: float, digits: int) -> str:
    """0.0003 -> "3e-4", 0.00025 -> "2.5e-4", 0 -> "0"."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    return f"{mantissa}e{int(exponent)}"
