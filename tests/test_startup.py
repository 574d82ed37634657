"""A training start at COCO scale: augmentation without torchvision, captions tokenised once, the samples cache."""

from __future__ import annotations

import gc
import json
import os
import pickle
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data import fastload, sources
from captioner.data import vocab as vocab_module
from captioner.data.dataset import CaptionDataset
from captioner.data.images import IMAGENET_MEAN, IMAGENET_STD, Augmentation, Preprocess, TrainTransform
from captioner.data.sources import Sample, check_images, load_samples
from captioner.data.vocab import CaptionText, Vocabulary, tokenize, tokens_of

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

    real_fast = fastload.fast_tokenize

    def counting_fast(text: str) -> list[str]:  # the readers' tokenizer: `tokenize` itself for non-ASCII text
        calls[text] += text.isascii()
        return real_fast(text)

    for module in (vocab_module, fastload):  # fastload imports it by name
        monkeypatch.setattr(module, "tokenize", counting)
    monkeypatch.setattr(sources, "fast_tokenize", counting_fast)
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
        c = CaptionText.of(text)
        assert c == text and hash(c) == hash(text) and json.dumps([c]) == json.dumps([text])
        assert list(c.words) == tokenize(text) == list(tokens_of(c)) == list(tokens_of(text))
        assert vocab.encode(c) == vocab.encode(text)
        again = pickle.loads(pickle.dumps(c))  # spawned DataLoader workers receive samples pickled
        assert again == text and again.words == c.words
    assert type(CaptionText.of("a b")[:1]) is str  # a derived string is tokenised afresh
    assert Vocabulary.build([CaptionText.of(t) for t in texts]).itos == vocab.itos


def test_the_fast_tokenizer_gives_the_tokenizer_s_tokens() -> None:
    """fastload.fast_tokenize's byte passes for ASCII text against vocab.tokenize's regex (tests/test_vocab.py
    holds the two to the tokenizer before on random text too)."""
    rng = random.Random(0)
    alphabet = "aZ9 _-,:;.'`!?\"#()/\\\t\n|~" + "".join(chr(i) for i in range(32))
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    for text in texts + ["A man's dog, running: FAST!", "x__y", "3.5", "a,,b::c", "Caf\u00e9 au lait"]:
        regex = vocab_module._TOKEN.findall(vocab_module._APOSTROPHES.sub("", text.lower()))
        assert fastload.fast_tokenize(text) == tokenize(text) == regex, text


# ----------------------------------------------------------------------------- the samples cache


@pytest.fixture
def cached_coco(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A COCO file old enough to be cached (every file and folder dated an hour back), and a cache folder
    outside its folder; the size threshold lowered so this small file counts as large."""
    monkeypatch.setattr(fastload, "CACHE_MIN_BYTES", 0)
    annotations = _coco(tmp_path)
    _age(annotations, tmp_path / "images", tmp_path)
    return annotations, tmp_path_factory.mktemp("samples-cache")


def _age(*paths: Path) -> None:
    old = time.time_ns() - 3600 * 10**9
    for p in paths:
        os.utime(p, ns=(old, old))


def _readers_counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = sources._read_file
    monkeypatch.setattr(sources, "_read_file", lambda path, *a: calls.append(path) or real(path, *a))
    return calls


def _summary(samples: sources.SampleList) -> tuple:
    return ([(s.image_id, s.split, s.path, list(s.captions), [c.normal for c in s.captions]) for s in samples],
            samples.source, samples.format, samples.notes, samples.has_splits)


def test_the_samples_cache_is_used_on_the_second_load(cached_coco: tuple[Path, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    annotations, cache = cached_coco
    first = load_samples(annotations, cache=cache)
    assert len(list(cache.iterdir())) == 1
    calls = _readers_counted(monkeypatch)
    again = load_samples(annotations, cache=cache)
    assert calls == [] and _summary(again) == _summary(first)
    assert all(type(c) is CaptionText for s in again for c in s.captions)
    assert _summary(load_samples(annotations, cache=False)) == _summary(first) and calls == [annotations]


def test_a_changed_annotations_file_is_read_again(cached_coco: tuple[Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    annotations, cache = cached_coco
    load_samples(annotations, cache=cache)
    annotations.write_text(annotations.read_text().replace("A red bus.", "A blue bus."))  # same size
    _age(annotations)
    calls = _readers_counted(monkeypatch)
    samples = load_samples(annotations, cache=cache)
    assert calls == [annotations] and "A blue bus." in {c for s in samples for c in s.captions}


def test_a_new_symlink_out_of_the_image_folder_is_followed_as_without_the_cache(
        cached_coco: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    """A user's link is their data, wherever it points: the cached load equals a fresh one and opens its target."""
    annotations, cache = cached_coco
    load_samples(annotations, cache=cache)
    outside = tmp_path_factory.mktemp("outside") / "shared.jpg"
    Image.new("RGB", (5, 4)).save(outside)
    image = annotations.parent / "images" / "2.jpg"
    image.unlink()
    image.symlink_to(outside)  # the folder's mtime moves
    samples = load_samples(annotations, cache=cache)
    assert _summary(samples) == _summary(load_samples(annotations, cache=False))
    assert sources.sample_image(next(s for s in samples if s.path == image)).size == (5, 4)


def test_a_corrupt_or_foreign_cache_file_is_ignored_and_replaced(cached_coco: tuple[Path, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    annotations, cache = cached_coco
    expected = _summary(load_samples(annotations, cache=cache))
    (file,) = cache.iterdir()
    good = json.loads(file.read_text())
    n = len(good["counts"])
    malformed = [{**good, "paths": [1] * n}, {**good, "ids": [None] * n},
                 {**good, "counts": [good["counts"][0] + 1, -1, *good["counts"][2:]]},
                 {**good, "counts": [float(c) for c in good["counts"]]},
                 {**good, "normals": good["normals"][:-1] + [3]}]
    broken = [b"\x00not json", json.dumps({**good, "counts": good["counts"][:-1]}).encode(),
              json.dumps({**good, "checker": "load_samples 0"}).encode(), json.dumps([1, 2]).encode(),
              *(json.dumps(columns).encode() for columns in malformed)]
    calls = _readers_counted(monkeypatch)
    for content in broken:
        file.write_bytes(content)
        calls.clear()
        assert _summary(load_samples(annotations, cache=cache)) == expected and calls == [annotations]
        assert json.loads(file.read_text()) == good  # rewritten


def test_fresh_or_small_files_are_not_cached(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A file changed within its mtime tick could change again unseen; a small one reads fast anyway."""
    cache = tmp_path_factory.mktemp("samples-cache")
    annotations = _coco(tmp_path)
    _age(annotations, tmp_path / "images", tmp_path)
    load_samples(annotations, cache=cache)  # small
    monkeypatch.setattr(fastload, "CACHE_MIN_BYTES", 0)
    os.utime(annotations)
    load_samples(annotations, cache=cache)  # the annotations just written
    _age(annotations)
    os.utime(tmp_path / "images")
    load_samples(annotations, cache=cache)  # an image folder just changed
    assert list(cache.iterdir()) == []
    _age(tmp_path / "images")
    load_samples(annotations, cache=cache)
    assert len(list(cache.iterdir())) == 1


# ----------------------------------------------------------------------------- a cached sample


def test_a_cached_sample_is_the_sample_read(cached_coco: tuple[Path, Path]) -> None:
    annotations, cache = cached_coco
    read = load_samples(annotations, cache=cache)
    cached = load_samples(annotations, cache=cache)
    assert cached == read and repr(cached) == repr(read)
    assert all(type(s.path) is type(r.path) and s.path == r.path for s, r in zip(cached, read, strict=True))
    assert check_images(cached) == check_images(read) == (3, [])
    thawed = pickle.loads(pickle.dumps(cached[2]))  # as a spawned loader worker receives it
    assert thawed == read[2] and thawed.captions[0].normal == read[2].captions[0].normal
    assert Sample("x", [], "train").path is None


def test_loading_leaves_the_collector_as_it_found_it(tmp_path: Path) -> None:
    """The collector is paused while a data set is built, and nothing process-wide outlives the call."""
    annotations = _coco(tmp_path)
    frozen = gc.get_freeze_count()
    samples = load_samples(annotations, cache=False)
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    assert any(o is samples[0] for o in gc.get_objects())  # still the collector's to walk
    gc.disable()
    try:
        load_samples(annotations, cache=False)
        assert not gc.isenabled()  # a caller that paused it keeps it paused
    finally:
        gc.enable()


# ----------------------------------------------------------------------------- remembered word counts


@pytest.fixture
def counts_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder for remembered counts; the size threshold lowered so a few captions count as many."""
    monkeypatch.setattr(vocab_module, "COUNTS_MIN_CAPTIONS", 1)
    return tmp_path / "counts"


def _many_captions(n: int = 60, seed: int = 0) -> list[CaptionText]:
    rng = random.Random(seed)
    words = ["A", "red", "bus,", "dog's", "Caf\u00e9", "two:", "x1", "the", "the", "the", "a"]
    return [CaptionText.of(" ".join(rng.choice(words) for _ in range(rng.randint(0, 9)))) for _ in range(n)]


def _counted_build(captions: list, cache: Path, **kwargs: object) -> Vocabulary:
    built = Vocabulary.build(captions, cache=cache, **kwargs)
    assert built.itos == Vocabulary.build(captions, cache=False, **kwargs).itos
    return built


def test_word_counts_are_remembered_and_used(counts_cache: Path) -> None:
    captions = _many_captions()
    vocab = _counted_build(captions, counts_cache, min_count=2)
    (file,) = counts_cache.iterdir()
    assert json.loads(file.read_text())["counts"] == dict(Counter(t for c in captions for t in tokenize(c)))
    assert Vocabulary.build(captions, min_count=2, cache=counts_cache).itos == vocab.itos
    assert vocab_module.count_tokens(list(captions), cache=counts_cache) == Counter(
        t for c in captions for t in tokenize(c))
    data = json.loads(file.read_text())  # the file is what the next build reads: doctor it and see
    data["counts"]["x1"] = 10_000
    file.write_text(json.dumps(data))
    assert Vocabulary.build(captions, min_count=2, cache=counts_cache).itos[4] == "x1"


def test_other_captions_are_counted_again(counts_cache: Path) -> None:
    captions = _many_captions()
    _counted_build(captions, counts_cache)
    changed = list(captions)
    changed[5] = CaptionText.of("a zebra")  # another caption
    fewer = captions[:-1]  # one image skipped
    retokenised = list(captions)
    retokenised[7] = CaptionText.of(str(captions[7]), "other tokens")  # the same text, other tokens
    for other in (changed, fewer, retokenised, list(reversed(captions))):
        _counted_build(other, counts_cache)
    assert "zebra" in Vocabulary.build(changed, cache=counts_cache) and "other" in Vocabulary.build(
        retokenised, cache=counts_cache)
    assert len(list(counts_cache.iterdir())) == 5


@pytest.mark.parametrize("content", [
    "{not json", "[]", json.dumps({"version": 0, "captions": 60, "counts": {"the": 5}}),
    json.dumps({"version": vocab_module.COUNTS_VERSION, "captions": 59, "counts": {"the": 5}}),
    json.dumps({"version": vocab_module.COUNTS_VERSION, "captions": 60, "counts": ["the"]}),
    json.dumps({"version": vocab_module.COUNTS_VERSION, "captions": 60, "counts": {"the": "5"}}),
    json.dumps({"version": vocab_module.COUNTS_VERSION, "captions": 60, "counts": {"the": 0}}),
], ids=["not JSON", "a list", "another version", "another number of captions", "counts a list", "a count text",
        "a count zero"])
def test_a_broken_counts_file_is_ignored_and_replaced(counts_cache: Path, content: str) -> None:
    captions = _many_captions()
    _counted_build(captions, counts_cache)
    (file,) = counts_cache.iterdir()
    good = file.read_text()
    file.write_text(content)
    _counted_build(captions, counts_cache)
    assert file.read_text() == good


def test_only_many_captions_with_their_tokens_have_counts_remembered(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    captions = _many_captions()
    monkeypatch.setattr(vocab_module, "COUNTS_MIN_CAPTIONS", len(captions) + 1)
    _counted_build(captions, tmp_path / "few")  # too few
    monkeypatch.setattr(vocab_module, "COUNTS_MIN_CAPTIONS", 1)
    _counted_build([str(c) for c in captions], tmp_path / "texts")  # tokens not known
    _counted_build([*captions[:-1], str(captions[-1])], tmp_path / "mixed")
    assert not any((tmp_path / name).exists() for name in ("few", "texts", "mixed"))
    Vocabulary.build(iter(captions), cache=tmp_path / "generator")  # any iterable of Captions
    assert len(list((tmp_path / "generator").iterdir())) == 1


def test_the_counts_live_under_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vocab_module, "COUNTS_MIN_CAPTIONS", 1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    Vocabulary.build(_many_captions())
    assert len(list((tmp_path / "xdg" / "captioner" / "vocab").iterdir())) == 1
