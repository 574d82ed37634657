"""Uploaded bytes -> model inputs, through the one image loader, so a refusal reads as the CLI's for the same file.

`load_image` opens files, and every check it makes (empty, not an image, truncated, a decompression bomb,
over MAX_PIXELS) lives there once; an upload is written to a private temporary file and opened by it, and
the error is renamed from that file to the name the client gave. The client never names a server path.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import torch
from PIL import Image

from captioner.api import Captioner
from captioner.data.images import load_image
from captioner.errors import ImageError, printable

T = TypeVar("T")


@dataclass
class Upload:
    """One uploaded image: the name the client gave it (for messages only) and its bytes."""

    name: str
    data: bytes


def upload_name(filename: str | None, index: int) -> str:
    """The base name of a client's file name, safe to show; `upload` (or `upload 2`, ...) when it gave none."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    return printable(base) if base.strip() else ("upload" if index == 0 else f"upload {index + 1}")


class UploadReader:
    """Opens uploads for one Captioner; each call writes, opens and removes its own temporary file."""

    def __init__(self, captioner: Captioner, folder: Path) -> None:
        self.captioner = captioner
        self.folder = folder  # a private temporary folder the server owns
        self._ids = itertools.count()  # next() on a count is atomic under the GIL: safe across threads

    def tensor(self, upload: Upload) -> torch.Tensor:
        """The model input (3, S, S), opened as `Captioner.caption` opens a file (JPEG draft decoding)."""
        return self._through_file(upload, lambda path: self.captioner.to_tensor([path])[0])

    def image_and_tensor(self, upload: Upload) -> tuple[Image.Image, torch.Tensor]:
        """The whole upright RGB image (to draw on) and its model input, as `captioner attend` opens a file."""
        image = self._through_file(upload, load_image)
        return image, self.captioner.preprocess(image)

    def _through_file(self, upload: Upload, open_file: Callable[[Path], T]) -> T:
        path = self.folder / f"{next(self._ids)}.upload"
        try:
            with open(path, "xb") as f:
                f.write(upload.data)
            return open_file(path)
        except ImageError as err:
            # the loader named our temporary file; the client knows its image by its own name
            raise ImageError(upload.name, err.reason.replace(str(path), upload.name)) from None
        finally:
            path.unlink(missing_ok=True)


def private_folder() -> tempfile.TemporaryDirectory:
    """A temporary folder for uploads on their way through the loader (mkdtemp makes it readable by this user only)."""
    return tempfile.TemporaryDirectory(prefix="captioner-serve-")
