"""A contact sheet for the README: photos of one split, each with the model's caption and a human one under it.

The photos are drawn from the split at random (the same ones for the same seed and data set), captioned
through the public API as `captioner caption` would caption them, and laid out in a grid; under each photo
"ours:" is the model's caption and "human:" the first reference caption of the data set.

    python benchmarks/contact_sheet.py --model runs/flickr8k --data Flickr8k.token.txt --images images \\
        --split val --n 8 --seed 0 --out contact_sheet.png
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from captioner import Captioner
from captioner.config import SPLITS
from captioner.data.sources import Sample, load_samples, sample_image
from captioner.errors import CaptionerError, DataError
from captioner.overlay import _fit, _font, _wrap

BACKGROUND, PHOTO_BACKGROUND = (255, 255, 255), (242, 242, 242)
INK = (25, 25, 25)
OURS, HUMAN = (31, 100, 180), (120, 120, 120)  # the colours of the "ours:" and "human:" labels


@dataclass
class Cell:
    """One photo of the sheet with the two captions written under it."""

    image: Image.Image
    ours: str
    human: str


def pick_samples(samples: Sequence[Sample], split: str, n: int, seed: int) -> list[Sample]:
    """`n` samples of `split` at random, the same ones for the same seed and samples (in any order).

    The split is each sample's own (the file's split lists, or the hash buckets of a file without them), as
    training reads it.
    """
    pool = sorted((s for s in samples if s.split == split), key=lambda s: s.image_id)
    if not pool:
        found = sorted({s.split for s in samples})
        raise DataError(f"the data set has no {split} split (it has: {', '.join(found) or 'no images'})")
    return random.Random(seed).sample(pool, min(n, len(pool)))


def contact_sheet(cells: Sequence[Cell], *, cols: int = 4, photo: int = 300, title: str | None = None) -> Image.Image:
    """Lay `cells` out in rows of `cols`, each photo fitted into a `photo`-pixel square with its captions under it."""
    if not cells:
        raise ValueError("a contact sheet needs at least one photo")
    if cols < 1 or photo < 32:
        raise ValueError(f"cols must be >= 1 and photo >= 32 pixels, got cols={cols}, photo={photo}")
    cols = min(cols, len(cells))
    pad = max(8, photo // 20)
    font, title_font = _font(max(11, photo // 20)), _font(max(14, photo // 14))
    line_h = _text_height(font) + max(3, photo // 80)
    width = pad + cols * (photo + pad)

    # Each cell's text: the "ours:" lines, a small gap, then the "human:" lines.
    texts = [(_wrap(f"ours: {c.ours.strip() or '(empty caption)'}", font, photo),
              _wrap(f"human: {c.human.strip()}", font, photo)) for c in cells]
    rows = [list(range(i, min(i + cols, len(cells)))) for i in range(0, len(cells), cols)]
    text_hs = [max((len(texts[i][0]) + len(texts[i][1])) * line_h + pad // 2 for i in row) for row in rows]
    title_lines = _wrap(title, title_font, width - 2 * pad) if title else []
    title_h = len(title_lines) * (_text_height(title_font) + pad // 2) + (pad if title_lines else 0)
    height = pad + title_h + sum(photo + pad // 2 + h + pad for h in text_hs)

    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = pad
    for line in title_lines:
        draw.text((pad, y), line, fill=INK, font=title_font)
        y += _text_height(title_font) + pad // 2
    y += pad if title_lines else 0
    for row, text_h in zip(rows, text_hs, strict=True):
        for c, index in enumerate(row):
            x = pad + c * (photo + pad)
            shown = _fit(cells[index].image.convert("RGB"), photo)
            draw.rectangle((x, y, x + photo - 1, y + photo - 1), fill=PHOTO_BACKGROUND)
            sheet.paste(shown, (x + (photo - shown.width) // 2, y + (photo - shown.height) // 2))
            ty = y + photo + pad // 2
            ours, human = texts[index]
            ty = _labelled(draw, (x, ty), ours, "ours:", OURS, font, line_h)
            _labelled(draw, (x, ty + pad // 2), human, "human:", HUMAN, font, line_h)
        y += photo + pad // 2 + text_h + pad
    return sheet


def _labelled(draw: ImageDraw.ImageDraw, at: tuple[int, int], lines: list[str], label: str, colour: tuple[int, ...],
              font: Any, line_h: int) -> int:
    """Draw wrapped `lines` whose first word is `label`, the label in `colour`; returns the y under them."""
    x, y = at
    for i, line in enumerate(lines):
        if i == 0 and line.startswith(label):
            draw.text((x, y), label, fill=colour, font=font)
            draw.text((x + font.getlength(label + " "), y), line[len(label):].lstrip(), fill=INK, font=font)
        else:
            draw.text((x, y), line, fill=INK, font=font)
        y += line_h
    return y


def _text_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Ag")
    return int(bottom - min(top, 0))


def caption_samples(captioner: Captioner, samples: Sequence[Sample]) -> list[Cell]:
    """Caption each sample's file (or scene) through the public API; the human caption is its first reference."""
    inputs = [s.path if s.path is not None else sample_image(s) for s in samples]
    captions = captioner.caption(inputs)
    return [Cell(sample_image(s), c.text, s.captions[0] if s.captions else "")
            for s, c in zip(samples, captions, strict=True)]


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse the options, caption the chosen photos and write the sheet; returns its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="run directory of the model to show")
    parser.add_argument("--data", type=Path, required=True, help="annotations file (any format `train --data` reads)")
    parser.add_argument("--images", type=Path, default=None, help="image folder of the annotations' relative paths")
    parser.add_argument("--split", choices=SPLITS, default="val", help="the split the photos are drawn from")
    parser.add_argument("--n", type=int, default=8, help="number of photos")
    parser.add_argument("--seed", type=int, default=0, help="which photos: the same seed picks the same ones")
    parser.add_argument("--cols", type=int, default=4, help="photos per row")
    parser.add_argument("--photo", type=int, default=300, help="side of each photo's square, in pixels")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps ...")
    parser.add_argument("--out", type=Path, default=Path("contact_sheet.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")

    try:
        samples = load_samples(args.data, image_dir=args.images)
        picked = pick_samples(samples, args.split, args.n, args.seed)
        captioner = Captioner.load(args.model, device=args.device)
        cells = caption_samples(captioner, picked)
    except CaptionerError as err:
        sys.exit(f"error: {err}")
    title = f"{args.model.name}: {len(cells)} photos of the {args.split} split (seed {args.seed})"
    sheet = contact_sheet(cells, cols=args.cols, photo=args.photo, title=title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
