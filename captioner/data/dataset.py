"""The training Dataset and the collate that pads captions: the only place the caption shift happens.

An item is one image with one caption encoded twice, shifted by one position:
    inputs  = <bos> w1 w2 ... wn          (what the decoder reads)
    targets = w1 w2 ... wn <eos>          (what it must predict at each position)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from captioner.data.images import Preprocess
from captioner.data.sources import Sample, sample_image
from captioner.data.vocab import Vocabulary
from captioner.errors import DataError

MODES = ("random", "all")
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): cheap, stateless, identical in every process."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


@dataclass
class Item:
    """One training example before batching."""

    image: torch.Tensor  # (3, S, S)
    inputs: torch.Tensor  # (T,) <bos> + caption
    targets: torch.Tensor  # (T,) caption + <eos>
    image_id: str
    pad_id: int


@dataclass
class Batch:
    """A padded batch; `pad_mask` is True at padding positions of `inputs` and `targets`."""

    images: torch.Tensor  # (B, 3, S, S)
    inputs: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T) long, padded with pad_id (which the loss ignores)
    pad_mask: torch.Tensor  # (B, T) bool
    lengths: torch.Tensor  # (B,) real tokens per row (caption words + 1)
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on `device`."""
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.images, self.inputs, self.targets, self.pad_mask, self.lengths)), self.image_ids)

    def pin_memory(self) -> Batch:
        """Page-locked copy; DataLoader(pin_memory=True) calls this on custom batch types."""
        return Batch(*(t.pin_memory() for t in (self.images, self.inputs, self.targets, self.pad_mask,
                                                self.lengths)), self.image_ids)


def collate(batch: Sequence[Item]) -> Batch:
    """Stack images and right-pad inputs/targets to the longest caption of the batch."""
    if not batch:
        raise DataError("cannot collate an empty batch")
    pad = batch[0].pad_id
    B, T = len(batch), max(len(it.inputs) for it in batch)
    inputs = torch.full((B, T), pad, dtype=torch.long)
    targets = torch.full((B, T), pad, dtype=torch.long)
    lengths = torch.tensor([len(it.inputs) for it in batch], dtype=torch.long)  # (B,)
    for b, it in enumerate(batch):
        inputs[b, : len(it.inputs)] = it.inputs
        targets[b, : len(it.targets)] = it.targets
    pad_mask = torch.arange(T)[None, :] >= lengths[:, None]  # (B, T)
    images = torch.stack([it.image for it in batch])  # (B, 3, S, S)
    return Batch(images, inputs, targets, pad_mask, lengths, [it.image_id for it in batch])


class CaptionDataset(torch.utils.data.Dataset):
    """Images with their captions as decoder inputs/targets.

    mode "random": one item per image, its caption drawn afresh each epoch (deterministic in seed,
    epoch, index; call `set_epoch`). mode "all": one item per (image, caption) pair.
    """

    def __init__(self, samples: Sequence[Sample], vocab: Vocabulary,
                 transform: Callable[[Image.Image], torch.Tensor], *, max_len: int = 30, mode: str = "random",
                 seed: int = 0, cache_renders: bool = True) -> None:
        if mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if max_len < 1:
            raise DataError(f"max_len must be >= 1, got {max_len}")
        self.samples = list(samples)
        self.vocab, self.transform = vocab, transform
        self.max_len, self.mode, self.seed = max_len, mode, seed
        self.cache_renders = cache_renders
        # Captions are encoded once, truncated to max_len words (the <eos> still follows).
        encoded = [[vocab.encode(c) for c in s.captions] for s in self.samples]
        self.truncated = sum(len(t) > max_len for caps in encoded for t in caps)  # for the caller to report
        self.tokens: list[list[list[int]]] = [[t[:max_len] for t in caps] for caps in encoded]
        for s, caps in zip(self.samples, self.tokens, strict=True):
            if not caps:
                raise DataError(f"image {s.image_id} has no captions")
        self.pairs: list[tuple[int, int]] | None = None
        if mode == "all":
            self.pairs = [(i, j) for i, caps in enumerate(self.tokens) for j in range(len(caps))]
        # The epoch lives in shared memory so persistent DataLoader workers see set_epoch too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._renders: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select which caption each image shows this epoch (mode "random")."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        """The epoch set last."""
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.samples)

    def caption_index(self, index: int) -> tuple[int, int]:
        """(sample, caption) shown at dataset position `index` in the current epoch."""
        if self.pairs is not None:
            return self.pairs[index]
        n = len(self.tokens[index])
        return index, _mix(self.seed, self.epoch, index) % n

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
        i, j = self.caption_index(index)
        words = self.tokens[i][j]
        inputs = torch.tensor([self.vocab.bos_id, *words], dtype=torch.long)  # (T,)
        targets = torch.tensor([*words, self.vocab.eos_id], dtype=torch.long)  # (T,)
        pixels = self._cached_render(i)
        if pixels is None:
            image = self.transform(sample_image(self.samples[i]))  # (3, S, S)
        elif isinstance(self.transform, Preprocess):
            image = self.transform(pixels)  # a cached render goes straight to the tensor, no Pillow round trip
        else:
            image = self.transform(Image.fromarray(pixels))
        return Item(image, inputs, targets, self.samples[i].image_id, self.vocab.pad_id)


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
