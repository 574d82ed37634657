"""Image files decoded and preprocessed in DataLoader workers, for captioning folders of photos.

Decoding a large photo can cost more than the model spends captioning it, so the files are opened in
worker processes (while the model captions the previous batch) and at about the model's resolution:
JPEG's draft mode scales inside the decoder, which then never builds the full-size picture. A file that
cannot be used travels through the loader as its reason, so one bad file never costs the batch it sits in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from captioner.data.images import Preprocess, load_image
from captioner.errors import ImageError

# The smallest side a draft decode may stop at, in multiples of the model's side: at 2x the final
# antialiased resize still averages several decoded pixels into each input pixel, so the model's input
# stays close to that of a full decode (tests/test_caption_stream.py holds it to that).
DRAFT_MARGIN = 2
# A ceiling on the default number of decoding processes: each is a process with its own memory and
# prefetched batches, so a many-core host does not start one per core unasked (--workers goes beyond).
MAX_WORKERS = 16


@dataclass
class FileItem:
    """One file of an `ImageFiles`: its position, and either its tensor (3, S, S) or why it is unusable."""

    index: int
    image: torch.Tensor | None
    error: str | None  # the ImageError's reason (an ImageError does not survive pickling between processes)


@dataclass
class FileBatch:
    """A batch of files in input order: `images` (B', 3, S, S) holds only the usable ones."""

    indices: list[int]  # positions in the dataset's list of paths, ascending
    images: torch.Tensor
    errors: list[str | None]  # one per index: None for a usable file, else the reason it is not

    def pin_memory(self) -> FileBatch:
        """Page-locked images, so the copy to a GPU overlaps the next batch (called by the DataLoader)."""
        return FileBatch(self.indices, self.images.pin_memory(), self.errors)


class ImageFiles(Dataset):
    """Image files as model inputs, opened by the one image loader at (about) the model's resolution."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> FileItem:
        try:
            pil = load_image(self.paths[index], min_side=DRAFT_MARGIN * self.preprocess.image_size)
            return FileItem(index, self.preprocess(pil), None)
        except ImageError as err:
            return FileItem(index, None, err.reason)


def collate_files(items: list[FileItem]) -> FileBatch:
    """Stack the usable files' tensors; keep every file's position and error, in order."""
    images = [it.image for it in items if it.image is not None]
    stacked = torch.stack(images) if images else torch.empty(0)
    return FileBatch([it.index for it in items], stacked, [it.error for it in items])


def file_loader(paths: Sequence[Path], preprocess: Preprocess, *, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """Batches of files in input order; `workers` > 0 decodes them in that many processes, ahead of use."""
    return DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_files, pin_memory=pin_memory,
                      prefetch_factor=4 if workers > 0 else None)


def workers_for(n_files: int, batch_size: int, *, processes: int = 1) -> int:
    """Decoding processes worth starting: none for a single batch (starting them costs more than it
    saves), else one per core the main process leaves free, at least one, at most MAX_WORKERS.

    processes: captioning processes sharing this machine's cores (torchrun's ranks on it), each with its own.
    """
    if n_files <= batch_size:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores // max(processes, 1) - 1))
