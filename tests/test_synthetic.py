"""The synthetic world: determinism, split separation, layout, references, the checker, word boxes, files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.synthetic import (
    COLOURS,
    INVERSE,
    MIN_SEPARATION,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    SceneObject,
    SyntheticWorld,
    check_caption,
    split_of,
    write_synthetic,
)
from captioner.data.vocab import tokenize
from captioner.errors import DataError

WORLD = SyntheticWorld(seed=0)


@pytest.fixture(scope="module")
def train_scenes() -> list[Scene]:
    return WORLD.scenes("train", 2000)


def scene_with(n: int, start: int = 0) -> Scene:
    """The first test scene with n objects."""
    i = start
    while True:
        s = WORLD.scene("test", i)
        if len(s.objects) == n:
            return s
        i += 1


def test_deterministic_and_seed_dependent() -> None:
    a, b = SyntheticWorld(seed=5).scene("val", 17), SyntheticWorld(seed=5).scene("val", 17)
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    others = [SyntheticWorld(seed=6).scene("val", 17), SyntheticWorld(seed=5).scene("val", 18)]
    assert all(o.signature() != a.signature() for o in others)
    assert a.image_id == "val_000017"
    assert WORLD.scenes("train", 3, start=10) == [WORLD.scene("train", i) for i in (10, 11, 12)]


def test_splits_never_share_a_scene(train_scenes: list[Scene]) -> None:
    signatures = {split: {s.signature() for s in WORLD.scenes(split, 2000)} for split in ("val", "test")}
    signatures["train"] = {s.signature() for s in train_scenes}
    assert not signatures["train"] & signatures["val"]
    assert not signatures["train"] & signatures["test"]
    assert not signatures["val"] & signatures["test"]
    for split, sigs in signatures.items():
        assert all(split_of(sig) == split for sig in sigs)  # the partition that makes overlap impossible


def test_layout_rules(train_scenes: list[Scene]) -> None:
    S = WORLD.image_size
    counts = {1: 0, 2: 0, 3: 0}
    for s in train_scenes:
        counts[len(s.objects)] += 1
        kinds = [(o.size, o.colour, o.shape) for o in s.objects]
        assert len(set(kinds)) == len(kinds)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
            side = x1 - x0
            assert y1 - y0 == side and abs(side - SIZES[o.size] * S) <= 0.1 * SIZES[o.size] * S + 1
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                overlap_x = a.box[0] < b.box[2] and b.box[0] < a.box[2]
                overlap_y = a.box[1] < b.box[3] and b.box[1] < a.box[3]
                assert not (overlap_x and overlap_y)
                dx, dy = abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])
                assert max(dx, dy) >= MIN_SEPARATION * S
    assert all(c > 500 for c in counts.values())  # every count is common


def test_render_matches_the_metadata(train_scenes: list[Scene]) -> None:
    """Independent of the checker: each object's colour is at its box centre; the image has the right size."""
    for s in train_scenes[:300]:
        im = s.render()
        assert im.mode == "RGB" and im.size == (s.image_size, s.image_size)
        for o in s.objects:
            cx, cy = (int(v) for v in o.center)
            got = np.array(im.getpixel((cx, cy)), dtype=int)
            assert np.abs(got - np.array(COLOURS[o.colour])).max() <= 16, (s.image_id, o)


def _independent_truth(scene: Scene, caption: str) -> bool:
    """A second, regex-based reading of the canonical form, checked against raw box coordinates."""
    np_re = r"a (small|large) (\w+) (\w+)"
    rel_re = r"(to the left of|to the right of|above|below)"
    parts = re.fullmatch(rf"{np_re}(?: {rel_re} {np_re})?(?: {rel_re} {np_re})?", caption)
    assert parts, caption
    g = [x for x in parts.groups() if x is not None]
    nps = [tuple(g[i:i + 3]) for i in range(0, len(g), 4)]
    rels = [g[i] for i in range(3, len(g), 4)]
    objs = {(o.size, o.colour, o.shape): o for o in scene.objects}
    if sorted(nps) != sorted(objs):
        return False
    for (a, b), rel in zip(zip(nps, nps[1:], strict=False), rels, strict=True):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = objs[a].box, objs[b].box
        dx, dy = (bx0 + bx1) - (ax0 + ax1), (by0 + by1) - (ay0 + ay1)
        if not {"to the left of": dx > 0, "to the right of": dx < 0, "above": dy > 0, "below": dy < 0}[rel]:
            return False
    return True


def test_all_references_are_accurate_distinct_and_canonical_first(train_scenes: list[Scene]) -> None:
    scenes = train_scenes + SyntheticWorld(image_size=48, seed=1).scenes("test", 300) \
        + SyntheticWorld(image_size=160, seed=2).scenes("val", 200)
    for s in scenes:
        assert len(s.captions) == 5 and len(set(s.captions)) == 5
        assert _independent_truth(s, s.captions[0])
        for c in s.captions:
            check = check_caption(s, c)
            assert check.accurate, (s.image_id, c, check.failures)


def test_caption_templates() -> None:
    one, two, three = scene_with(1), scene_with(2), scene_with(3)
    a = one.objects[0].name
    assert one.captions == [f"a {a}", f"there is a {a}", f"a single {a}", f"a picture of a {a}",
                            f"a {a} on a noisy background"]
    assert two.captions[3].startswith("two shapes : a ") and " and a " in two.captions[3]
    assert three.captions[1].startswith("three shapes : a ") and " , a " in three.captions[1]
    # the reverse chain uses the inverse relations in reverse order
    words = three.captions[0]
    rels = re.findall(r"to the left of|to the right of|above|below", words)
    back = re.findall(r"to the left of|to the right of|above|below", three.captions[4])
    assert back == [INVERSE[r] for r in reversed(rels)]


def _swap(caption: str, old: str, new: str) -> str:
    tokens = caption.split()
    i = tokens.index(old)
    tokens[i] = new
    return " ".join(tokens)


def _failures(scene: Scene, caption: str) -> list[tuple[str, str]]:
    check = check_caption(scene, caption)
    assert not check.accurate, caption
    return [(c.kind, c.detail) for c in check.failures]


def test_checker_rejects_each_kind_of_error() -> None:
    s = scene_with(2)
    a, b = s.objects
    canonical = s.captions[0]
    first = canonical.split()[1:4]  # size colour shape of the first noun phrase
    size, colour, shape = first
    other_colour = next(c for c in COLOURS if c != colour and all(o.colour != c for o in s.objects))
    other_shape = next(x for x in SHAPES if x != shape and all(o.shape != x for o in s.objects))
    other_size = "large" if size == "small" else "small"

    wrong_colour = canonical.replace(f"{size} {colour} {shape}", f"{size} {other_colour} {shape}", 1)
    assert ("object", f"wrong colour (the scene has a {size} {colour} {shape})") in _failures(s, wrong_colour)
    wrong_shape = canonical.replace(f"{size} {colour} {shape}", f"{size} {colour} {other_shape}", 1)
    assert any(k == "object" and "wrong shape" in d for k, d in _failures(s, wrong_shape))
    wrong_size = canonical.replace(f"{size} {colour} {shape}", f"{other_size} {colour} {shape}", 1)
    kinds = [(o.size, o.colour, o.shape) for o in s.objects]
    if (other_size, colour, shape) not in kinds:
        assert any(k == "object" and "wrong size" in d for k, d in _failures(s, wrong_size))

    rel = next(r for r in INVERSE if f" {r} " in canonical)
    flipped = canonical.replace(f" {rel} ", f" {INVERSE[rel]} ")
    assert [k for k, _ in _failures(s, flipped)] == ["relation"]

    assert ("mention", "in the scene but not mentioned") in _failures(s, " ".join(canonical.split()[:4]))
    assert [k for k, _ in _failures(s, "three shapes : " + s.captions[4])] == ["count"]
    assert [k for k, _ in _failures(s, "a single " + canonical[2:])] == ["count"]
    assert "parse" in [k for k, _ in _failures(s, canonical + " banana")]
    assert "parse" in [k for k, _ in _failures(s, "banana " + canonical)]
    assert "parse" in [k for k, _ in _failures(s, f"a {colour} {shape}")]  # a noun phrase needs its size
    assert "parse" in [k for k, _ in _failures(s, "")]
    repeated = f"a {a.name} and a {a.name} and a {b.name}"
    assert any("twice" in d for _, d in _failures(s, repeated))


def test_checker_relation_needs_a_clear_difference() -> None:
    """A relation is true only by more than the tolerance, whatever the layout rules allowed."""
    S = 96
    left = SceneObject("circle", "red", "small", (10, 40, 26, 56))
    same_x = SceneObject("square", "blue", "small", (11, 70, 27, 86))  # 1 px to the right, far below
    scene = Scene("x", S, (left, same_x), 0, [])
    assert check_caption(scene, "a small red circle above a small blue square").accurate
    assert not check_caption(scene, "a small red circle to the left of a small blue square").accurate
    assert not check_caption(scene, "a small red circle below a small blue square").accurate


def test_word_boxes() -> None:
    s = scene_with(3)
    caption = s.captions[1]  # "three shapes : a A , a B and a C"
    boxes = s.word_boxes(caption)
    tokens = tokenize(caption)
    assert len(boxes) == len(tokens)
    by_name = {o.name: o.box for o in s.objects}
    expected: list = [None] * len(tokens)
    for i in range(len(tokens) - 3):
        if tokens[i] == "a" and " ".join(tokens[i + 1:i + 4]) in by_name:
            expected[i + 1:i + 4] = [by_name[" ".join(tokens[i + 1:i + 4])]] * 3
    assert boxes == expected
    assert sum(b is not None for b in boxes) == 9
    o = s.objects[0]
    assert s.word_boxes(f"a {o.colour} {o.shape}") == [None, o.box, o.box]  # unique even without the size
    absent = next(c for c in COLOURS if all(x.colour != c for x in s.objects))
    assert s.word_boxes(f"a small {absent} {o.shape}") == [None, None, None, None]


def test_world_refuses_bad_arguments() -> None:
    with pytest.raises(DataError):
        WORLD.scene("holdout", 0)
    with pytest.raises(DataError):
        SyntheticWorld(image_size=16)
    with pytest.raises(DataError):
        SyntheticWorld(max_objects=4)
    assert set(SPLITS) == {"train", "val", "test"}
    ones = SyntheticWorld(min_objects=1, max_objects=1).scenes("train", 20)
    assert all(len(s.objects) == 1 for s in ones)


def test_write_synthetic_files(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path / "out", 6, split="val", seed=3, image_size=64)
    data = json.loads(path.read_text())
    world = SyntheticWorld(image_size=64, seed=3)
    assert [im["id"] for im in data["images"]] == [f"val_{i:06d}" for i in range(6)]
    assert len(data["annotations"]) == 30
    for i, im in enumerate(data["images"]):
        scene = world.scene("val", i)
        file = tmp_path / "out" / "images" / im["file_name"]
        assert np.array_equal(np.asarray(Image.open(file).convert("RGB")), np.asarray(scene.render()))
        assert [a["caption"] for a in data["annotations"] if a["image_id"] == im["id"]] == scene.captions
        assert [b["bbox"] for b in data["boxes"][im["id"]]] == \
            [[o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]] for o in scene.objects]


def test_claim_shares_say_which_kind_of_claim_fails() -> None:
    """evaluate reports, beside accuracy, the share of object / relation claims that hold and how often
    captions of several-object scenes state a relation at all."""
    from types import SimpleNamespace

    from captioner.evaluation import synthetic_accuracy, synthetic_claims

    one, two, other = scene_with(1), scene_with(2), scene_with(2, start=50)
    assert other.image_id != two.image_id
    samples = [SimpleNamespace(image_id=s.image_id, scene=s) for s in (one, two, other)]
    rel = next(r for r in INVERSE if f" {r} " in two.captions[0])
    flipped = two.captions[0].replace(f" {rel} ", f" {INVERSE[rel]} ")
    predictions = {one.image_id: one.captions[0], two.image_id: flipped, other.image_id: other.captions[0]}
    assert synthetic_accuracy(samples, predictions)["all"] == pytest.approx(2 / 3)
    shares = synthetic_claims(samples, predictions)
    assert shares == {"object": 1.0, "relation": 0.5, "relation_used": 1.0}  # 5 objects named right, 1 of 2 relations
    a, b = two.objects
    predictions[two.image_id] = f"a {a.name} and a {b.name}"  # a relation-free list: true, but states no relation
    assert synthetic_claims(samples, predictions) == {"object": 1.0, "relation": 1.0, "relation_used": 0.5}
