"""The Python API: load a run, caption images. The CLI's `caption`, `attend` and `evaluate` use it too.

    from captioner import Captioner
    c = Captioner.load("runs/demo")
    print(c.caption("photo.jpg")[0].text)
    for caption in c.caption_iter(path_generator(), errors="collect"):   # streamed, in input order
        ...
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from captioner.checkpoint import LoadedRun, load_run
from captioner.data.files import DRAFT_MARGIN, file_loader, workers_for
from captioner.data.images import load_image
from captioner.decoding import Caption, DecodeSettings, decode_batch
from captioner.errors import ConfigError, ImageError
from captioner.runtime import precision_plan, resolve_device

__all__ = ["Caption", "Captioner", "DecodeSettings", "ImageLike", "collect_images"]

# What `caption` accepts as one image: a file path, a PIL image, a uint8 array (H, W, 3) or (H, W), a uint8
# tensor (3, H, W) as torchvision's read_image returns, or a float tensor (3, S, S) already preprocessed.
ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor
# A batch's results in input order: each file with its caption, or the error that kept it from one.
FileResults = list[tuple[Path, Caption | ImageError]]


class Captioner:
    """A trained captioning model with its vocabulary and preprocessing, ready to caption images."""

    def __init__(self, run: LoadedRun, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.run = run
        # The precision plan's inference half: the encoder (compute-bound at any batch size) in `dtype`,
        # the decoder in float32 (config.PRECISION_HELP). Converted once, so no step pays for a cast.
        self.model = run.model
        self.model.encoder.to(dtype)
        self.vocab = run.vocab
        self.preprocess = run.preprocess
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, run_dir: str | Path | None = None, *, device: str = "auto", which: str = "best",
             precision: str = "auto") -> Captioner:
        """Load a run directory (default: the newest under ./runs) for inference.

        precision: auto, fp32, bf16 or fp16 (CUDA), as config.PRECISION_HELP describes.
        """
        dev = resolve_device(device)
        plan = precision_plan(precision, dev)
        return cls(load_run(run_dir, which=which, device=str(dev)), dev, plan.encoder)

    def to_tensor(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Open (via the one image loader) and preprocess images into a batch (B, 3, S, S)."""
        S = self.preprocess.image_size
        tensors = [self._prepare(im, i) for i, im in enumerate(images)]
        return (torch.stack(tensors) if tensors else torch.empty(0, 3, S, S)).to(self.device)

    def caption_tensor(self, batch: torch.Tensor, settings: DecodeSettings | None = None, *,
                       need_weights: bool = False) -> list[Caption]:
        """Caption an already preprocessed batch (B, 3, S, S)."""
        return decode_batch(self.model, self.vocab, batch.to(self.device, non_blocking=True), settings,
                            need_weights=need_weights)

    def caption(self, images: ImageLike | Iterable[ImageLike], settings: DecodeSettings | None = None, *,
                need_weights: bool = False, batch_size: int = 32,
                errors: Literal["raise", "collect"] = "raise") -> list[Caption | ImageError]:
        """Caption one image or any iterable of them (generators too), in batches of `batch_size`.

        A bad item raises an ImageError naming it; with errors="collect" the error takes its place in
        the list instead, and every good item is captioned.
        """
        return list(self.caption_iter(images, settings, need_weights=need_weights, batch_size=batch_size,
                                      errors=errors))

    def caption_iter(self, images: ImageLike | Iterable[ImageLike], settings: DecodeSettings | None = None, *,
                     need_weights: bool = False, batch_size: int = 32,
                     errors: Literal["raise", "collect"] = "raise") -> Iterator[Caption | ImageError]:
        """Stream captions in input order, a batch at a time: only one batch of images is held at once.

        errors="raise" stops at the first bad item with an ImageError naming it (the good items before
        it in its batch are yielded first); errors="collect" yields the error in the item's place.
        """
        if errors not in ("raise", "collect"):
            raise ConfigError(f"errors must be 'raise' or 'collect', got {errors!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        items = enumerate(_as_items(images))
        while chunk := list(itertools.islice(items, batch_size)):
            prepared: list[torch.Tensor | ImageError] = []
            for index, item in chunk:
                try:
                    prepared.append(self._prepare(item, index))
                except ImageError as err:
                    prepared.append(err)
                    if errors == "raise":
                        break
            good = [t for t in prepared if isinstance(t, torch.Tensor)]
            captions = iter(self.caption_tensor(torch.stack(good), settings, need_weights=need_weights)
                            if good else [])
            for t in prepared:
                if isinstance(t, ImageError) and errors == "raise":
                    raise t
                yield t if isinstance(t, ImageError) else next(captions)

    def _prepare(self, item: ImageLike, index: int) -> torch.Tensor:
        """One item -> its model input (3, S, S), or an ImageError naming the item and the problem."""
        S = self.preprocess.image_size
        if isinstance(item, (str, Path)):
            return self.preprocess(load_image(item, min_side=DRAFT_MARGIN * S))
        name = f"item {index} ({_describe(item)})"
        if isinstance(item, torch.Tensor):
            if item.is_floating_point():  # already preprocessed: the model's own input
                if tuple(item.shape) != (3, S, S):
                    raise ImageError(name, f"a float tensor is taken as preprocessed and must be (3, {S}, {S})")
                return item.float()
            if item.dtype != torch.uint8 or item.dim() != 3 or item.shape[0] not in (1, 3, 4):
                raise ImageError(name, "a tensor image must be uint8 (C, H, W) with 1, 3 or 4 channels, "
                                       "or float (3, S, S) already preprocessed")
            item = item.permute(1, 2, 0).cpu().numpy()  # (H, W, C)
            item = item[..., 0] if item.shape[2] == 1 else item
        if not isinstance(item, (Image.Image, np.ndarray)):
            raise ImageError(name, "not an image: give a path, a PIL image, a numpy array or a tensor")
        try:
            return self.preprocess(item)
        except (TypeError, ValueError, OSError) as err:  # Pillow's words for an array it cannot read as pixels
            raise ImageError(name, f"cannot be read as an image ({err})") from None

    def caption_files(self, paths: Sequence[Path], settings: DecodeSettings | None = None, *,
                      batch_size: int = 32, workers: int | None = None, need_weights: bool = False,
                      on_batch: Callable[[FileResults], None] | None = None
                      ) -> tuple[list[tuple[Path, Caption]], list[ImageError]]:
        """Caption files in batches; a file that cannot be read is returned as an error, not raised.

        The files are decoded in `workers` processes (None: one per spare core when there is more than one
        batch; 0: in this process) while the model captions the batch before. Returns the (path, caption)
        pairs and the failures, in input order. With `on_batch`, each batch's results go to it as soon as
        it is captioned and are not kept, so memory stays flat however many files there are; only the
        failures are returned then.
        """
        workers = workers_for(len(paths), batch_size) if workers is None else workers
        loader = file_loader(paths, self.preprocess, batch_size=batch_size, workers=workers,
                             pin_memory=self.device.type == "cuda")
        results: list[tuple[Path, Caption]] = []
        failures: list[ImageError] = []
        for batch in loader:
            captions = iter(self.caption_tensor(batch.images, settings, need_weights=need_weights)
                            if len(batch.images) else [])
            done: FileResults = [(paths[i], ImageError(paths[i], err) if err else next(captions))
                                 for i, err in zip(batch.indices, batch.errors, strict=True)]
            failures.extend(r for _, r in done if isinstance(r, ImageError))
            if on_batch is not None:
                on_batch(done)
            else:
                results.extend((p, r) for p, r in done if isinstance(r, Caption))
        return results, failures


def _as_items(images: ImageLike | Iterable[ImageLike]) -> Iterable[ImageLike]:
    """One image -> [it]; a batch tensor (B, 3, S, S) -> its rows; any other iterable as it is."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, Iterable):
        return images
    raise ImageError(_describe(images), "not an image, nor an iterable of images")


def _describe(item: object) -> str:
    """A short description of an in-memory image for an error message."""
    if isinstance(item, Image.Image):
        return f"PIL image {item.mode} {item.width}x{item.height}"
    if isinstance(item, (np.ndarray, torch.Tensor)):
        kind = "array" if isinstance(item, np.ndarray) else "tensor"
        return f"{kind} {str(item.dtype).removeprefix('torch.')} {tuple(item.shape)}"
    return type(item).__name__


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def collect_images(patterns: Sequence[str], *, recursive: bool = False) -> tuple[list[Path], list[ImageError]]:
    """Expand files, directories (their image files, sorted) and glob patterns into a list of paths.

    recursive: a directory's subdirectories too. A pattern that matches nothing is reported as an
    ImageError; the caller decides whether to go on.
    """
    paths: list[Path] = []
    problems: list[ImageError] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            entries = path.rglob("*") if recursive else path.iterdir()
            found = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(ImageError(path, "directory holds no image files"))
            paths.extend(found)
        elif path.exists():
            paths.append(path)  # whatever it is, the image loader gives the precise reason if it is unusable
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(ImageError(pattern, "no image files match this pattern"))
            paths.extend(found)
        else:
            problems.append(ImageError(path, "file not found"))
    return list(dict.fromkeys(paths)), problems
