"""The Python API: load a run, caption images. The CLI's `caption`, `attend` and `evaluate` use it too.

    from captioner import Captioner
    c = Captioner.load("runs/demo")
    print(c.caption("photo.jpg")[0].text)
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from captioner.checkpoint import LoadedRun, load_run
from captioner.data.images import load_image, to_tensor_batch
from captioner.decoding import Caption, DecodeSettings, decode_batch
from captioner.errors import ImageError
from captioner.runtime import precision_plan, resolve_device

__all__ = ["Caption", "Captioner", "DecodeSettings", "collect_images"]


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

    def to_tensor(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Open (via the one image loader) and preprocess images into a batch (B, 3, S, S)."""
        pils = [load_image(im) if isinstance(im, (str, Path)) else im.convert("RGB") for im in images]
        return to_tensor_batch(pils, self.preprocess).to(self.device)

    def caption_tensor(self, batch: torch.Tensor, settings: DecodeSettings | None = None, *,
                       need_weights: bool = False) -> list[Caption]:
        """Caption an already preprocessed batch (B, 3, S, S)."""
        return decode_batch(self.model, self.vocab, batch.to(self.device), settings, need_weights=need_weights)

    def caption(self, images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
                settings: DecodeSettings | None = None, *, need_weights: bool = False,
                batch_size: int = 32) -> list[Caption]:
        """Caption one image or many (PIL images or paths), in batches of `batch_size`."""
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = [images]
        results: list[Caption] = []
        for i in range(0, len(images), batch_size):
            batch = self.to_tensor(images[i:i + batch_size])
            results.extend(self.caption_tensor(batch, settings, need_weights=need_weights))
        return results

    def caption_files(self, paths: Sequence[Path], settings: DecodeSettings | None = None, *,
                      batch_size: int = 32, need_weights: bool = False
                      ) -> tuple[list[tuple[Path, Caption]], list[ImageError]]:
        """Caption files in batches; a file that cannot be read is returned as an error, not raised."""
        results: list[tuple[Path, Caption]] = []
        failures: list[ImageError] = []
        for i in range(0, len(paths), batch_size):
            loaded = []
            for path in paths[i:i + batch_size]:
                try:
                    loaded.append((path, self.preprocess(load_image(path))))
                except ImageError as err:
                    failures.append(err)
            if loaded:
                batch = torch.stack([t for _, t in loaded])
                captions = self.caption_tensor(batch, settings, need_weights=need_weights)
                results.extend(zip([p for p, _ in loaded], captions, strict=True))
        return results, failures



IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def collect_images(patterns: Sequence[str]) -> tuple[list[Path], list[ImageError]]:
    """Expand files, directories (their image files, sorted) and glob patterns into a list of paths.

    A pattern that matches nothing is reported as an ImageError; the caller decides whether to go on.
    """
    paths: list[Path] = []
    problems: list[ImageError] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
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
