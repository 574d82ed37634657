"""The built-in shapes world: scenes of 1-3 objects, five reference captions each, and a strict checker.

It is the project's proving ground: a small model trained for minutes on a CPU should describe these
images accurately, and `check_caption` says exactly which claim of a caption is false. The language:

    NP       = "a" SIZE COLOUR SHAPE                       e.g. "a small red circle"
    caption  = [prefix] NP { LINK NP } [" on a noisy background"]
    LINK     = "to the left of" | "to the right of" | "above" | "below" | "and" | ","
    prefix   = "there is" | "a picture of" | "two shapes :" | "three shapes :"   ("a single" replaces "a")

A relation word links the noun phrase before it to the one after it ("a X above a Y": X is higher).
Scenes are laid out so every relation is clear: every pair of objects is far apart along one axis,
that axis clearly dominates the other, and three objects have a clear ordering axis.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioner.config import SPLITS
from captioner.data.vocab import tokenize
from captioner.errors import DataError

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Saturated, well-separated hues; the background is low-saturation grey so every colour stands out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 85, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 50, 195),
    "orange": (250, 130, 15),
}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.32}  # object side as a fraction of the image side

# Relation phrase -> (axis, sign): "X to the left of Y" holds when Y's centre x exceeds X's.
RELATIONS: dict[str, tuple[int, int]] = {
    "to the left of": (0, +1),
    "to the right of": (0, -1),
    "above": (1, +1),
    "below": (1, -1),
}
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
           "below": "above"}

# Layout rules, as fractions of the image side S.
MIN_SEPARATION = 0.12  # every pair: centres at least this far apart along their dominant axis
AXIS_MARGIN = 0.05  # every pair: |dx| and |dy| differ by this much, so the dominant axis is unambiguous
ORDER_MARGIN = 0.05  # three objects: the ordering axis and the order along it are unambiguous
BOX_GAP = 0.03  # boxes never touch
RELATION_TOLERANCE = 0.03  # the checker accepts a relation when the centres differ by more than this
SIDE_JITTER = 0.08  # object sides vary by up to +-8% around their size class

_SIZE_WORDS, _COLOUR_WORDS, _SHAPE_WORDS = set(SIZES), set(COLOURS), set(SHAPES)
_ATTRIBUTE_WORDS = _SIZE_WORDS | _COLOUR_WORDS | _SHAPE_WORDS
_KINDS = [(size, colour, shape) for size in SIZES for colour in COLOURS for shape in SHAPES]
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels; x1, y1 exclusive, so width = x1 - x0


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; its box is (x0, y0, x1, y1) in pixels with x1, y1 exclusive."""

    shape: str
    colour: str
    size: str
    box: Box

    @property
    def center(self) -> tuple[float, float]:
        """Centre (x, y) of the box in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    @property
    def name(self) -> str:
        """The words of its noun phrase without the article: "small red circle"."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Claim:
    """One checkable statement a caption makes, and whether the scene bears it out."""

    text: str
    kind: str  # "object", "relation", "count", "mention" (an object left out) or "parse"
    ok: bool
    detail: str = ""


@dataclass
class CaptionCheck:
    """The verdict on one caption: accurate only if every claim holds and every object is mentioned."""

    accurate: bool
    claims: list[Claim]

    @property
    def failures(self) -> list[Claim]:
        """The claims that do not hold."""
        return [c for c in self.claims if not c.ok]


def relation(first: SceneObject, second: SceneObject) -> str:
    """The relation phrase for "a {first} REL a {second}" along the pair's dominant axis."""
    (ax, ay), (bx, by) = first.center, second.center
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def relation_holds(first: SceneObject, second: SceneObject, phrase: str, image_size: int) -> bool:
    """True when "first PHRASE second" is true by more than the checker's tolerance."""
    axis, sign = RELATIONS[phrase]
    diff = second.center[axis] - first.center[axis]
    return sign * diff > RELATION_TOLERANCE * image_size


def _order(objects: tuple[SceneObject, ...]) -> list[SceneObject]:
    """Objects in caption order: along the axis of the larger spread (x on ties), first to last."""
    if len(objects) == 1:
        return list(objects)
    xs = [o.center[0] for o in objects]
    ys = [o.center[1] for o in objects]
    axis = 0 if max(xs) - min(xs) >= max(ys) - min(ys) else 1
    return sorted(objects, key=lambda o: o.center[axis])


def _np(o: SceneObject) -> str:
    return f"a {o.name}"


def make_captions(objects: tuple[SceneObject, ...]) -> list[str]:
    """The five distinct reference captions of a scene; the first is the canonical one."""
    ordered = _order(objects)
    if len(ordered) == 1:
        (a,) = ordered
        caps = [_np(a), f"there is {_np(a)}", f"a single {a.name}", f"a picture of {_np(a)}",
                f"{_np(a)} on a noisy background"]
    elif len(ordered) == 2:
        a, b = ordered
        r = relation(a, b)
        caps = [f"{_np(a)} {r} {_np(b)}", f"{_np(b)} {INVERSE[r]} {_np(a)}",
                f"there is {_np(a)} {r} {_np(b)}", f"two shapes : {_np(a)} and {_np(b)}",
                f"{_np(a)} and {_np(b)}"]
    elif len(ordered) == 3:
        a, b, c = ordered
        r1, r2 = relation(a, b), relation(b, c)
        caps = [f"{_np(a)} {r1} {_np(b)} {r2} {_np(c)}", f"three shapes : {_np(a)} , {_np(b)} and {_np(c)}",
                f"{_np(a)} , {_np(b)} and {_np(c)}", f"there is {_np(a)} {r1} {_np(b)} and {_np(c)}",
                f"{_np(c)} {INVERSE[r2]} {_np(b)} {INVERSE[r1]} {_np(a)}"]
    else:
        raise DataError(f"the synthetic world describes 1 to 3 objects, got {len(ordered)}")
    assert len(set(caps)) == 5, caps
    return caps


# ----------------------------------------------------------------------------- the checker


@dataclass
class _Parse:
    # (token index where the noun phrase starts, (size, colour, shape))
    nps: list[tuple[int, tuple[str, str, str]]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # between nps[i] and nps[i+1]
    count: int | None = None
    count_text: str = ""
    error: str | None = None


_PREFIXES: list[tuple[tuple[str, ...], int | None]] = [
    (("there", "is"), None), (("a", "picture", "of"), None),
    (("two", "shapes", ":"), 2), (("three", "shapes", ":"), 3),
]
_LINKS: list[tuple[tuple[str, ...], str]] = [
    *((tuple(p.split()), p) for p in RELATIONS), (("and",), "and"), ((",",), ","),
]
_SUFFIX = ("on", "a", "noisy", "background")


def _parse(tokens: list[str]) -> _Parse:
    """Recursive-descent parse of the caption grammar; stops at the first token it cannot consume."""
    out = _Parse()
    pos, n = 0, len(tokens)

    def at(seq: tuple[str, ...]) -> bool:
        return tuple(tokens[pos:pos + len(seq)]) == seq

    for seq, count in _PREFIXES:
        if at(seq):
            pos += len(seq)
            if count is not None:
                out.count, out.count_text = count, " ".join(seq[:2])
            break
    while True:
        start = pos
        if pos >= n or tokens[pos] != "a":
            out.error = f"expected \"a\" at word {pos + 1}, got {tokens[pos]!r}" if pos < n else \
                "caption ends where a noun phrase should start"
            return out
        pos += 1
        if not out.nps and pos < n and tokens[pos] == "single" and out.count is None:
            out.count, out.count_text = 1, "a single"
            pos += 1
        words = tokens[pos:pos + 3]
        if len(words) < 3 or words[0] not in _SIZE_WORDS or words[1] not in _COLOUR_WORDS \
                or words[2] not in _SHAPE_WORDS:
            out.error = f"expected SIZE COLOUR SHAPE at word {pos + 1}, got {' '.join(words)!r}"
            return out
        out.nps.append((start, (words[0], words[1], words[2])))
        pos += 3
        if pos == n:
            return out
        if at(_SUFFIX) and pos + len(_SUFFIX) == n:
            return out
        for seq, link in _LINKS:
            if at(seq):
                out.links.append(link)
                pos += len(seq)
                break
        else:
            out.error = f"unexpected word {tokens[pos]!r} at word {pos + 1}"
            return out


def _describe_mismatch(words: tuple[str, str, str], objects: tuple[SceneObject, ...]) -> str:
    """For a noun phrase matching no object: the nearest object and which attributes are wrong."""
    size, colour, shape = words
    best, best_wrong = None, None
    for o in objects:
        wrong = [name for name, said, real in (("size", size, o.size), ("colour", colour, o.colour),
                                               ("shape", shape, o.shape)) if said != real]
        if best_wrong is None or len(wrong) < len(best_wrong):
            best, best_wrong = o, wrong
    if best is None or best_wrong is None or len(best_wrong) == 3:
        return "no such object"
    return f"wrong {' and '.join(best_wrong)} (the scene has a {best.name})"


def check_caption(scene: Scene, caption: str) -> CaptionCheck:
    """Check every claim of a caption against the scene: objects, relations, counts, and completeness."""
    tokens = tokenize(caption)
    parsed = _parse(tokens)
    by_kind = {(o.size, o.colour, o.shape): o for o in scene.objects}
    claims: list[Claim] = []
    matched: list[SceneObject | None] = []
    seen: set[tuple[str, str, str]] = set()
    for _, words in parsed.nps:
        obj = by_kind.get(words)
        text = "a " + " ".join(words)
        if obj is None:
            claims.append(Claim(text, "object", False, _describe_mismatch(words, scene.objects)))
        elif words in seen:
            claims.append(Claim(text, "object", False, "mentioned twice, implying a second one"))
            obj = None
        else:
            claims.append(Claim(text, "object", True))
            seen.add(words)
        matched.append(obj)
    for i, link in enumerate(parsed.links):
        if link not in RELATIONS or i + 1 >= len(parsed.nps):
            continue
        first, second = matched[i], matched[i + 1]
        text = f"a {' '.join(parsed.nps[i][1])} {link} a {' '.join(parsed.nps[i + 1][1])}"
        if first is None or second is None:
            claims.append(Claim(text, "relation", False, "relates an object the scene does not have"))
        else:
            ok = relation_holds(first, second, link, scene.image_size)
            claims.append(Claim(text, "relation", ok, "" if ok else f"false: {relation(first, second)}"))
    if parsed.count is not None:
        ok = parsed.count == len(scene.objects)
        detail = "" if ok else f"the scene has {len(scene.objects)}"
        claims.append(Claim(parsed.count_text, "count", ok, detail))
    if parsed.error is not None:
        claims.append(Claim(" ".join(tokens), "parse", False, parsed.error))
    for o in scene.objects:
        if (o.size, o.colour, o.shape) not in seen:
            claims.append(Claim(f"a {o.name}", "mention", False, "in the scene but not mentioned"))
    return CaptionCheck(all(c.ok for c in claims) and bool(claims), claims)


# ----------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """One image of the world: its objects, its five reference captions, and how to render it."""

    image_id: str
    image_size: int
    objects: tuple[SceneObject, ...]
    render_seed: int  # background, texture and colour jitter; rendering is a pure function of the scene
    captions: list[str] = field(default_factory=list)

    @property
    def boxes(self) -> list[Box]:
        """Object boxes (x0, y0, x1, y1), in the order of `objects`."""
        return [o.box for o in self.objects]

    def signature(self) -> tuple:
        """What makes two scenes the same picture: the set of (shape, colour, size, box)."""
        return scene_signature(self.objects)

    def render(self) -> Image.Image:
        """The scene as an RGB image (S x S)."""
        return render_scene(self)

    def word_boxes(self, caption: str) -> list[Box | None]:
        """Per token of tokenize(caption): the box of the object a size/colour/shape word names, else None.

        A run of attribute words ("small red circle", or a partial "red circle") points at an object
        when exactly one object of the scene fits every word of the run.
        """
        tokens = tokenize(caption)
        out: list[Box | None] = [None] * len(tokens)
        i = 0
        while i < len(tokens):
            if tokens[i] not in _ATTRIBUTE_WORDS:
                i += 1
                continue
            j = i
            while j < len(tokens) and tokens[j] in _ATTRIBUTE_WORDS:
                j += 1
            run = tokens[i:j]
            sizes = [w for w in run if w in _SIZE_WORDS]
            colours = [w for w in run if w in _COLOUR_WORDS]
            shapes = [w for w in run if w in _SHAPE_WORDS]
            if max(len(sizes), len(colours), len(shapes)) <= 1:
                fits = [o for o in self.objects if (not sizes or o.size == sizes[0])
                        and (not colours or o.colour == colours[0]) and (not shapes or o.shape == shapes[0])]
                if len(fits) == 1:
                    out[i:j] = [fits[0].box] * (j - i)
            i = j
        return out


def scene_signature(objects: tuple[SceneObject, ...] | list[SceneObject]) -> tuple:
    """Order-free identity of a layout; two scenes with equal signatures show the same objects in place."""
    return tuple(sorted((o.shape, o.colour, o.size, tuple(o.box)) for o in objects))


def split_of(signature: tuple) -> str:
    """The one split a layout may belong to (a hash of its signature), so splits can never share a scene."""
    digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
    return SPLITS[int.from_bytes(digest, "little") % len(SPLITS)]


class SyntheticWorld:
    """Deterministic scenes: scene (split, index) is a pure function of (seed, split, index, image_size)."""

    def __init__(self, image_size: int = 96, seed: int = 0, min_objects: int = 1,
                 max_objects: int = 3) -> None:
        if image_size < 32:
            raise DataError(f"the synthetic world needs image_size >= 32, got {image_size}")
        if not 1 <= min_objects <= max_objects <= 3:
            raise DataError(f"objects per scene need 1 <= min <= max <= 3, got {min_objects}, {max_objects}")
        self.image_size, self.seed = image_size, seed
        self.min_objects, self.max_objects = min_objects, max_objects

    def scene(self, split: str, index: int) -> Scene:
        """Scene number `index` of a split."""
        if split not in _SPLIT_CODE:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[split], index, self.image_size])
        while True:  # rejection: only layouts whose signature hashes to this split (about 1 in 3)
            objects = self._sample_objects(rng)
            if split_of(scene_signature(objects)) == split:
                break
        return Scene(f"{split}_{index:06d}", self.image_size, objects, int(rng.integers(2**62)),
                     make_captions(objects))

    def scenes(self, split: str, n: int, start: int = 0) -> list[Scene]:
        """Scenes start .. start+n-1 of a split."""
        return [self.scene(split, i) for i in range(start, start + n)]

    def _sample_objects(self, rng: np.random.Generator) -> tuple[SceneObject, ...]:
        S = self.image_size
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        while True:
            kinds = [_KINDS[k] for k in rng.choice(len(_KINDS), size=n, replace=False)]
            sides = [max(4, round(SIZES[size] * S * rng.uniform(1 - SIDE_JITTER, 1 + SIDE_JITTER)))
                     for size, _, _ in kinds]
            boxes = _place(rng, sides, S)
            if boxes is not None:
                return tuple(SceneObject(shape, colour, size, box)
                             for (size, colour, shape), box in zip(kinds, boxes, strict=True))


def _pair_ok(a: Box, b: Box, S: int) -> bool:
    gap = BOX_GAP * S
    apart = a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    if not apart:
        return False
    dx = abs((a[0] + a[2]) - (b[0] + b[2])) / 2
    dy = abs((a[1] + a[3]) - (b[1] + b[3])) / 2
    return max(dx, dy) >= MIN_SEPARATION * S and abs(dx - dy) >= AXIS_MARGIN * S


def _triple_ok(boxes: list[Box], S: int) -> bool:
    xs = sorted((b[0] + b[2]) / 2 for b in boxes)
    ys = sorted((b[1] + b[3]) / 2 for b in boxes)
    sx, sy = xs[-1] - xs[0], ys[-1] - ys[0]
    if abs(sx - sy) < ORDER_MARGIN * S:
        return False
    along = xs if sx > sy else ys
    return all(q - p >= ORDER_MARGIN * S for p, q in zip(along, along[1:], strict=False))


def _place(rng: np.random.Generator, sides: list[int], S: int, tries: int = 40) -> list[Box] | None:
    """Random non-overlapping boxes satisfying the layout rules, or None to draw new objects."""
    for _ in range(tries):
        boxes: list[Box] = []
        for side in sides:
            candidates = rng.integers(1, S - side, size=(tries, 2))  # 1 px margin to the border
            for x0, y0 in candidates.tolist():
                box = (x0, y0, x0 + side, y0 + side)
                if all(_pair_ok(box, other, S) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sides) and (len(boxes) < 3 or _triple_ok(boxes, S)):
            return boxes
    return None


# ----------------------------------------------------------------------------- rendering


@lru_cache(maxsize=8)
def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:S, 0:S].astype(np.float32)
    return xs / S - 0.5, ys / S - 0.5


def _shape_outline(shape: str, box: Box, k: int) -> list[tuple[float, float]] | None:
    """Polygon of a shape in a canvas k times larger; None for shapes drawn as ellipses or rectangles."""
    x0, y0, x1, y1 = (v * k for v in box)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(x0, y1), (x1, y1), (cx, y0)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.42 * r
            angle = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(angle), cy + r * 0.1 + rad * math.sin(angle)))
        return pts
    if shape == "cross":
        t = (x1 - x0) / 6  # half the bar thickness: bars one third of the side wide
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t), (cx + t, cy + t),
                (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    return None


def render_scene(scene: Scene, supersample: int = 2) -> Image.Image:
    """Render a scene: textured grey background (gradient, noise, faint lines), then the shapes, antialiased.

    Shapes and lines are drawn on a canvas `supersample` times larger and box-filtered down; the
    background is built at full size and upsampled by pixel repetition, so the filter leaves it unchanged.
    """
    S, k = scene.image_size, supersample
    rng = np.random.default_rng(scene.render_seed)
    xs, ys = _grid(S)
    level = int(rng.integers(85, 176))
    base = (level + rng.integers(-12, 13, size=3)).astype(np.int16)  # grey with a slight tint
    angle = rng.uniform(0, 2 * math.pi)
    ramp = ((math.cos(angle) * xs + math.sin(angle) * ys) * rng.uniform(20, 60)).astype(np.int16)  # (S, S)
    # Per-pixel noise in int16 (uniform, luminance plus weaker colour noise): ~5x faster than float normals.
    amp = int(rng.integers(6, 15))
    pixels = rng.integers(-amp, amp + 1, size=(S, S, 1), dtype=np.int16) \
        + rng.integers(-(amp // 3), amp // 3 + 1, size=(S, S, 3), dtype=np.int16)
    pixels += ramp[:, :, None]
    pixels += base
    background = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
    canvas = Image.fromarray(background).resize((S * k, S * k), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):  # faint lines: texture, never mistaken for a shape
        p = rng.uniform(0, S * k, size=4)
        grey = int(np.clip(level + rng.uniform(-35, 35), 0, 255))
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=(grey, grey, grey), width=int(rng.integers(1, k + 1)))
    for o in scene.objects:
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + jitter, 0, 255))
        x0, y0, x1, y1 = (v * k for v in o.box)
        outline = _shape_outline(o.shape, o.box, k)
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon(outline, fill=fill)
    return canvas.reduce(k) if k > 1 else canvas


# ----------------------------------------------------------------------------- files


def write_synthetic(out_dir: str | Path, n: int, split: str = "train", seed: int = 0,
                    image_size: int = 96) -> Path:
    """Write n scenes as images/<image_id>.png and captions.json (COCO captions + boxes); return its path."""
    out_dir = Path(out_dir)
    world = SyntheticWorld(image_size=image_size, seed=seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, boxes = [], [], {}
    for index in range(n):
        scene = world.scene(split, index)
        file_name = f"{scene.image_id}.png"
        scene.render().save(out_dir / "images" / file_name, compress_level=1)
        images.append({"id": scene.image_id, "file_name": file_name, "width": image_size,
                       "height": image_size, "split": split, "index": index})
        for caption in scene.captions:
            annotations.append({"id": len(annotations), "image_id": scene.image_id, "caption": caption})
        boxes[scene.image_id] = [
            {"shape": o.shape, "colour": o.colour, "size": o.size,
             "bbox": [o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]]}
            for o in scene.objects
        ]
    path = out_dir / "captions.json"
    info = {"description": "captioner synthetic shapes world",
            "synthetic": {"seed": seed, "image_size": image_size, "split": split}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"info": info, "images": images, "annotations": annotations, "boxes": boxes}))
    tmp.replace(path)
    return path


def scene_from_record(world: SyntheticWorld, split: str, index: int, boxes: list[dict]) -> Scene | None:
    """Regenerate a written scene from its (split, index) if its stored boxes still match, else None."""
    scene = world.scene(split, index)
    stored = []
    for b in boxes:
        x, y, w, h = b["bbox"]
        stored.append((b["shape"], b["colour"], b["size"], (x, y, x + w, y + h)))
    return scene if tuple(sorted(stored)) == scene.signature() else None
