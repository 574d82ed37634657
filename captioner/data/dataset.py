"""The training Dataset and the collate that pads captions: the only place the caption shift happens.

An item is one image with K of its captions, each encoded twice, shifted by one position:
    inputs  = <bos> w1 w2 ... wn          (what the decoder reads)
    targets = w1 w2 ... wn <eos>          (what it must predict at each position)
K > 1 ("captions per image") trains on several references of an image while encoding it once: the
decoder is the cheap part of a step, so K captions cost far less than K images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from captioner.data.images import Preprocess
from captioner.data.sources import Sample, sample_image
from captioner.data.vocab import EncodedCaptions, Vocabulary, token_count
from captioner.errors import DataError

MODES = ("random", "all")
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment: 2^64 / the golden ratio


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele, Lea and Flood, 2014): advance a 64-bit state and scramble it."""
    x = (x + _GOLDEN_GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(*values: int) -> int:
    """A 64-bit hash of integers, each folded into the state before a splitmix64 step.

    Written out rather than `hash((seed, epoch, index))`, whose tuple hashing changed in Python 3.8 and differs
    on 32-bit builds: the captions and augmentation an item gets must not, for runs to resume the same.
    """
    h = _GOLDEN_GAMMA
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h


@dataclass
class Item:
    """One training example before batching."""

    image: torch.Tensor  # (3, S, S), or backbone features (C, h, w) when holds_features
    inputs: list[torch.Tensor]  # K x (T_k,) <bos> + caption
    targets: list[torch.Tensor]  # K x (T_k,) caption + <eos>
    image_id: str
    pad_id: int
    holds_features: bool = False  # `image` is a frozen backbone's cached output (captioner/feature_cache.py)


@dataclass
class Batch:
    """A padded batch of B images and B*K caption rows; `pad_mask` is True at padding of `inputs`/`targets`.

    Rows are image-major: rows b*K .. b*K+K-1 are captions of image b, so the decoder can attend to
    each image's memory once for all its rows (see MultiHeadAttention.forward).
    """

    images: torch.Tensor  # (B, 3, S, S), or backbone features (B, C, h, w) when holds_features
    inputs: torch.Tensor  # (B*K, T) long
    targets: torch.Tensor  # (B*K, T) long, padded with pad_id (which the loss ignores)
    pad_mask: torch.Tensor  # (B*K, T) bool
    lengths: torch.Tensor  # (B*K,) real tokens per row (caption words + 1)
    image_ids: list[str]  # (B,)
    holds_features: bool = False  # pass to CaptionModel.forward(..., from_features=)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def captions_per_image(self) -> int:
        """K: caption rows per image."""
        return self.inputs.shape[0] // self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on `device`."""
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.images, self.inputs, self.targets, self.pad_mask, self.lengths)), self.image_ids,
                     self.holds_features)

    def pin_memory(self) -> Batch:
        """Page-locked copy; DataLoader(pin_memory=True) calls this on custom batch types."""
        return Batch(*(t.pin_memory() for t in (self.images, self.inputs, self.targets, self.pad_mask,
                                                self.lengths)), self.image_ids, self.holds_features)


def collate(batch: Sequence[Item]) -> Batch:
    """Stack images and right-pad every caption row (image-major) to the longest caption of the batch."""
    if not batch:
        raise DataError("cannot collate an empty batch")
    K = len(batch[0].inputs)
    if any(len(it.inputs) != K for it in batch):
        raise DataError("every item of a batch must carry the same number of captions")
    pad = batch[0].pad_id
    rows = [(i, t) for it in batch for i, t in zip(it.inputs, it.targets, strict=True)]
    R, T = len(rows), max(len(i) for i, _ in rows)
    inputs = torch.full((R, T), pad, dtype=torch.long)
    targets = torch.full((R, T), pad, dtype=torch.long)
    lengths = torch.tensor([len(i) for i, _ in rows], dtype=torch.long)  # (R,)
    for r, (i, t) in enumerate(rows):
        inputs[r, : len(i)] = i
        targets[r, : len(t)] = t
    pad_mask = torch.arange(T)[None, :] >= lengths[:, None]  # (R, T)
    images = torch.stack([it.image for it in batch])  # (B, 3, S, S)
    return Batch(images, inputs, targets, pad_mask, lengths, [it.image_id for it in batch], batch[0].holds_features)


class CaptionDataset(torch.utils.data.Dataset):
    """Images with their captions as decoder inputs/targets.

    mode "random": one item per image with `captions_per_image` (K) of its captions, drawn afresh each
    epoch (deterministic in seed, epoch, index; call `set_epoch`): K distinct ones when the image has
    at least K, else all of them and repeats. mode "all": one item per (image, caption) pair (K = 1).
    """

    holds_features = False  # items carry pixels; feature_cache.FeatureDataset's carry cached backbone features

    def __init__(self, samples: Sequence[Sample], vocab: Vocabulary,
                 transform: Callable[[Image.Image], torch.Tensor], *, max_len: int = 30, mode: str = "random",
                 seed: int = 0, cache_renders: bool = True, captions_per_image: int = 1) -> None:
        if mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if max_len < 1:
            raise DataError(f"max_len must be >= 1, got {max_len}")
        if captions_per_image < 1 or (mode == "all" and captions_per_image != 1):
            raise DataError(f"captions_per_image must be >= 1 (1 in mode 'all'), got {captions_per_image}")
        self.captions_per_image = captions_per_image
        self.samples = list(samples)
        self.vocab, self.transform = vocab, transform
        self.max_len, self.mode, self.seed = max_len, mode, seed
        self.cache_renders = cache_renders
        # Captions become token ids as items ask for them, truncated to max_len words (the <eos> still follows).
        self.tokens = EncodedCaptions([s.captions for s in self.samples], vocab, max_len)
        self.truncated = sum(token_count(c) > max_len for s in self.samples for c in s.captions)  # for the caller
        for s in self.samples:
            if not s.captions:
                raise DataError(f"image {s.image_id} has no captions")
        self.pairs: list[tuple[int, int]] | None = None
        if mode == "all":
            self.pairs = [(i, j) for i, s in enumerate(self.samples) for j in range(len(s.captions))]
        # The epoch lives in shared memory so persistent DataLoader workers see set_epoch too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._renders: dict[int, np.ndarray] = {}

    @property
    def image_size(self) -> int | None:
        """The side the transform shrinks images to: large JPEGs are decoded at a reduced scale down to it."""
        return getattr(self.transform, "image_size", None)

    def set_epoch(self, epoch: int) -> None:
        """Select which caption each image shows this epoch (mode "random")."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        """The epoch set last."""
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.samples)

    def caption_indices(self, index: int) -> tuple[int, list[int]]:
        """(sample, its K captions) shown at dataset position `index` in the current epoch."""
        if self.pairs is not None:
            i, j = self.pairs[index]
            return i, [j]
        n, K = len(self.tokens[index]), self.captions_per_image
        h = _mix(self.seed, self.epoch, index)
        if K == 1:
            return index, [h % n]
        rng = random.Random(h)
        if K <= n:
            return index, rng.sample(range(n), K)
        return index, rng.sample(range(n), n) + rng.choices(range(n), k=K - n)

    def _cached_render(self, i: int) -> np.ndarray | None:
        """Sample i's rendered scene as uint8 (S, S, 3), rendered once (rendering costs CPU); None for files."""
        s = self.samples[i]
        if s.path is not None or s.scene is None or not self.cache_renders:
            return None
        pixels = self._renders.get(i)
        if pixels is None:
            pixels = np.asarray(s.scene.render())
            self._renders[i] = pixels
        return pixels

    def __getitem__(self, index: int) -> Item:
        i, chosen = self.caption_indices(index)
        words = [self.tokens[i][j] for j in chosen]
        inputs = [torch.tensor([self.vocab.bos_id, *w], dtype=torch.long) for w in words]  # K x (T,)
        targets = [torch.tensor([*w, self.vocab.eos_id], dtype=torch.long) for w in words]  # K x (T,)
        image = self.image(i, index)
        return Item(image, inputs, targets, self.samples[i].image_id, self.vocab.pad_id, self.holds_features)

    def image(self, i: int, index: int) -> torch.Tensor:
        """Sample i's image (3, S, S) at dataset position `index` this epoch (augmented if the transform is)."""
        pixels = self._cached_render(i)
        if pixels is not None and isinstance(self.transform, Preprocess):
            image = self.transform(pixels)  # a cached render goes straight to the tensor, no Pillow round trip
        else:
            with self._augmentation_seeded(index):
                pil = sample_image(self.samples[i], min_side=self.image_size) if pixels is None else None
                image = self.transform(pil if pil is not None else Image.fromarray(pixels))
        return image

    @contextmanager
    def _augmentation_seeded(self, index: int) -> Iterator[None]:
        """Random augmentation drawn from (seed, epoch, index) alone, on a forked generator.

        So an item is the same in the main process or any worker, and after a resume: the number of
        workers and their start never change what the model sees, and the training RNG stream is untouched.
        """
        if isinstance(self.transform, Preprocess):  # nothing random to seed
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, self.epoch, index, 0xA06) >> 1)
            yield


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a DataLoader worker from the seed torch gave it."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, workers: int, seed: int,
                sampler: torch.utils.data.Sampler | None = None, *, drop_last: bool = False,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader with our collate, a seeded shuffle, and workers that persist across epochs."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=workers, collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
        persistent_workers=workers > 0, worker_init_fn=seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if workers > 0 else None,
    )
