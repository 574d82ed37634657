"""A training start at COCO scale: augmentation without torchvision, captions tokenised once."""

from __future__ import annotations

import json
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data import vocab as vocab_module
from captioner.data.dataset import CaptionDataset
from captioner.data.images import IMAGENET_MEAN, IMAGENET_STD, Augmentation, Preprocess, TrainTransform
from captioner.data.sources import load_samples
from captioner.data.vocab import Caption, Vocabulary, tokenize, tokens_of

PRE = Preprocess(image_size=32)


def _halves(size: int = 40) -> Image.Image:
    """Left half red, right half blue, and a white bar along the top: asymmetric both ways."""
    im = Image.new("RGB", (size, size), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, size // 2, size))
    im.paste((255, 255, 255), (0, 0, size, size // 5))
    return im


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_deterministic_in_torch_seed_alone() -> None:
    aug, im = TrainTransform(PRE), _halves()
    torch.manual_seed(5)
    first = aug(im)
    torch.manual_seed(5)
    random.seed(1), np.random.seed(1)  # other generators: never read
    again = aug(im)
    torch.manual_seed(6)
    other = aug(im)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_augmentation_output_shape_dtype_and_range() -> None:
    aug = TrainTransform(PRE)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std  # what 0 and 255 normalise to
    torch.manual_seed(0)
    for im in (_halves(), np.asarray(_halves(32)), Image.new("L", (50, 20), 128)):
        out = aug(im)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert bool(((out >= lo - 1e-6) & (out <= hi + 1e-6)).all())
        assert not torch.equal(out, PRE(im))  # it does augment


def test_augmentation_never_flips() -> None:
    aug, im = TrainTransform(PRE, brightness=0.5, contrast=0.5, saturation=0.5, translate=0.1), _halves()
    torch.manual_seed(0)
    for _ in range(40):
        out = aug(im)
        red, blue = out[0], out[2]
        assert red[:, :12].mean() > red[:, 20:].mean()  # red stays on the left
        assert blue[:, :12].mean() < blue[:, 20:].mean()
        assert blue[:5].mean() > blue[-5:].mean()  # the white bar stays at the top


def test_augmentation_with_zero_strengths_is_the_preprocessing() -> None:
    aug = TrainTransform(PRE, brightness=0, contrast=0, saturation=0, translate=0, scale=(1.0, 1.0))
    im = _halves()
    torch.manual_seed(0)
    assert all(torch.equal(aug(im), PRE(im)) for _ in range(5))


def test_augmentation_draws_within_its_ranges() -> None:
    aug = TrainTransform(PRE)
    torch.manual_seed(0)
    draws = [aug.draw(96, 64) for _ in range(300)]
    assert {abs(d.shift[0]) for d in draws} == set(range(5))  # 4 % of 96 px: shifts -4 .. 4 (rounded)
    assert {abs(d.shift[1]) for d in draws} == set(range(4))  # 4 % of 64 px: -3 .. 3 (rounded)
    assert all(0.94 <= d.scale <= 1.06 and all(0.85 <= f <= 1.15 for f in d.factors) for d in draws)
    assert {d.order for d in draws} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}


@pytest.mark.parametrize("aug", [
    Augmentation(shift=(3, -2), scale=1.05, factors=(1.1, 0.9, 1.12), order=(2, 0, 1)),
    Augmentation(shift=(-4, 1), scale=0.94, factors=(0.86, 1.14, 0.9), order=(1, 2, 0)),
])
def test_augmentation_matches_torchvision(aug: Augmentation) -> None:
    """The same parameters through torchvision's functional ops (what RandomAffine and ColorJitter call)."""
    F = pytest.importorskip("torchvision.transforms.functional")
    transform, im = TrainTransform(PRE), PRE.resized(_halves())
    expected = F.affine(im, angle=0.0, translate=list(aug.shift), scale=aug.scale, shear=[0.0, 0.0],
                        interpolation=F.InterpolationMode.BILINEAR, fill=list(transform.fill))
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for i in aug.order:
        expected = adjust[i](expected, aug.factors[i])
    assert np.array_equal(np.asarray(transform.apply(im, aug)), np.asarray(expected))


# ----------------------------------------------------------------------------- tokenised once


def _coco(folder: Path) -> Path:
    captions = {1: ["A man's dog, running: FAST!", "Two dogs on   a lawn."], 2: ["A red bus.", "Caf\u00e9 au lait"],
                3: ["black-and-white photo.", "It\u2019s 3.5 m tall", "a red bus"]}
    (folder / "images").mkdir()
    for i in captions:
        Image.new("RGB", (8, 6), (i * 40, 0, 0)).save(folder / "images" / f"{i}.jpg")
    data = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in captions],
            "annotations": [{"image_id": i, "caption": c} for i, caps in captions.items() for c in caps]}
    (folder / "captions.json").write_text(json.dumps(data))
    return folder / "captions.json"


def test_each_caption_is_tokenised_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_samples, Vocabulary.build and CaptionDataset together tokenise each caption exactly once."""
    calls: Counter[str] = Counter()
    real = vocab_module.tokenize

    def counting(text: str) -> list[str]:
        calls[text] += 1
        return real(text)

    monkeypatch.setattr(vocab_module, "tokenize", counting)
    samples = load_samples(_coco(tmp_path))
    captions = [c for s in samples for c in s.captions]
    vocab = Vocabulary.build(captions)
    dataset = CaptionDataset(samples, vocab, PRE, max_len=30, captions_per_image=2)
    assert len(captions) == 7 and calls == Counter(captions) and max(calls.values()) == 1
    assert dataset.tokens[0][0] == [vocab.stoi[w] for w in real("A man's dog, running: FAST!")]


def test_a_caption_is_its_text_with_its_tokens() -> None:
    texts = ["A man's dog, running: FAST!", "Caf\u00e9 au lait", "?!.", ""]
    vocab = Vocabulary.build(texts)
    for text in texts:
        c = Caption.of(text)
        assert c == text and hash(c) == hash(text) and json.dumps([c]) == json.dumps([text])
        assert list(c.words) == tokenize(text) == list(tokens_of(c)) == list(tokens_of(text))
        assert vocab.encode(c) == vocab.encode(text)
        again = pickle.loads(pickle.dumps(c))  # spawned DataLoader workers receive samples pickled
        assert again == text and again.words == c.words
    assert type(Caption.of("a b")[:1]) is str  # a derived string is tokenised afresh
    assert Vocabulary.build([Caption.of(t) for t in texts]).itos == vocab.itos
