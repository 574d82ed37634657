"""The one place that opens image files, and the one preprocessing shared by training, evaluation, captioning.

Every way a file can be unusable (missing, a folder, empty, not an image in one of `FORMATS`, truncated,
a decompression bomb, unreadable) becomes an `ImageError` naming the file. Every usable file comes back
as an upright RGB image, whatever its mode (palette, alpha, CMYK, 16-bit, 1-bit) or EXIF orientation.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFile, ImageOps, UnidentifiedImageError

from captioner.config import ModelConfig, check_int, declared
from captioner.errors import ConfigError, ImageError

# ImageNet statistics: what torchvision's pretrained backbones were trained with, so pretrained
# weights see inputs on the scale they expect; harmless for models trained from scratch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Refuse images above 100 megapixels (e.g. 10000 x 10000). Decoding one takes ~300 MB as RGB, and a small
# file whose header claims more is almost always a decompression bomb. Checked on the header alone.
MAX_PIXELS = 100_000_000

# The raster formats a photo or dataset image comes in (JPEG includes the MPO files of many cameras). Pillow
# would otherwise also try some forty others by content, whatever the file is named, among them EPS, which
# it renders by running Ghostscript on the file: no file we are handed should ever start a program.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM")

_WHITE = (255, 255, 255)


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Decode with truncation as an error, whatever another library set globally."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Our explicit MAX_PIXELS check replaces PIL's warning threshold; PIL's own hard error
            # (twice its limit) is still caught below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Plugins warn about malformed metadata (e.g. TIFF "Truncated File Read") and then either decode
            # or raise; the error, if any, becomes the one ImageError line, the warning would be noise.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _check_file(path: Path) -> None:
    """Refuse what is not a readable, non-empty regular file, before PIL sees it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except PermissionError:
        raise ImageError(path, "cannot be read (permission denied)") from None
    except OSError as err:
        raise ImageError(path, f"cannot be read ({err.strerror or err})") from None
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image file")
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError(path, "cannot be read (permission denied)")


def _open(path: Path) -> Image.Image:
    """Open lazily (header only) and check the claimed size before any pixel is decoded."""
    try:
        im = Image.open(path, formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"refused as a decompression bomb ({err})") from None
    except PermissionError:
        raise ImageError(path, "cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError, NotImplementedError) as err:  # plugins raise any of these
        raise ImageError(path, f"not a readable image ({err})") from None
    w, h = im.size
    if w < 1 or h < 1:
        im.close()
        raise ImageError(path, f"has no pixels ({w} x {h})")
    if w * h > MAX_PIXELS:
        im.close()
        raise ImageError(path, f"claims {w} x {h} pixels, over the {MAX_PIXELS:,} pixel limit "
                               "(likely a decompression bomb)")
    return im


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grayscale -> 8-bit, keeping relative brightness."""
    v = values.astype(np.float64)
    finite = v[np.isfinite(v)]
    if finite.size < v.size:  # a float image with NaN or infinities: darkest / brightest finite value
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        v = np.nan_to_num(v, nan=lo, posinf=hi, neginf=lo)
    if mode.startswith("I;16"):
        v = v / 257.0  # 65535 -> 255 exactly
    elif mode == "F" and v.size and v.min() >= 0.0 and v.max() <= 1.0:
        v = v * 255.0  # a float image in [0, 1]
    elif v.size and (v.min() < 0 or v.max() > 255):
        lo, hi = (0.0, 65535.0) if v.min() >= 0 and v.max() <= 65535 else (v.min(), v.max())
        v = (v - lo) / max(hi - lo, 1e-12) * 255.0  # a 16-bit range stored as "I", else stretch
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white (what a viewer shows)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "L" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def load_image(path: str | Path, *, min_side: int | None = None) -> Image.Image:
    """Open an image file as an upright RGB image, or raise ImageError naming the file and the reason.

    min_side: the caller shrinks the image to this side anyway, so a format that can decode at a reduced
    scale does so, never below min_side on either axis (JPEG's draft mode: 1/2, 1/4 or 1/8 of each side,
    done inside the decoder, which then touches a fraction of the pixels). Other formats decode in full.
    """
    path = Path(path)
    _check_file(path)
    with _strict_decoding():
        im = _open(path)
        try:
            with im:
                try:
                    if min_side is not None:
                        im.draft(None, (min_side, min_side))  # a no-op for formats without reduced decoding
                    im.load()
                except Image.DecompressionBombError as err:
                    raise ImageError(path, f"refused as a decompression bomb ({err})") from None
                except (OSError, SyntaxError, ValueError, EOFError, NotImplementedError, AssertionError) as err:
                    raise ImageError(path, f"truncated or corrupt image data ({err})") from None
                try:
                    upright = ImageOps.exif_transpose(im)
                except Exception:  # noqa: BLE001 (a broken EXIF block must not lose a good image)
                    upright = im
                rgb = to_rgb(upright)
                if rgb is im:
                    rgb = im.copy()  # detach from the file handle the `with` closes
        except MemoryError:
            raise ImageError(path, "too large to decode in the available memory") from None
    return rgb


def check_image(path: str | Path) -> str | None:
    """Whether `load_image` would succeed, decoding only what a cheaper test cannot vouch for.

    The reason the file is unusable, or None. Only decoding notices truncated BMP, GIF, TIFF, PPM or WebP
    pixel data, so those are decoded in full; a PNG or JPEG is decoded only when its structure leaves doubt
    (a full decode of a photo costs tens of times more than these checks).
    """
    path = Path(path)
    try:
        _check_file(path)
        fmt = _verify(path)
        if not _complete_without_decoding(path, fmt):
            load_image(path)
    except ImageError as err:
        return err.reason
    return None


def _complete_without_decoding(path: Path, fmt: str | None) -> bool:
    """PNG's verify walked every chunk to IEND with its CRC; a JPEG cut short lacks its end marker."""
    return fmt == "PNG" or (fmt == "JPEG" and _jpeg_has_end_marker(path))


def _verify(path: Path) -> str | None:
    """Pillow's structural check (PNG chunks with their CRCs, headers elsewhere); the file's format."""
    with _strict_decoding():
        im = _open(path)
        with im:
            try:
                im.verify()
            except Exception as err:  # noqa: BLE001 (verify raises a variety of types)
                raise ImageError(path, f"truncated or corrupt image data ({err})") from None
            return im.format


def _jpeg_has_end_marker(path: Path) -> bool:
    """A complete JPEG ends with the EOI marker FF D9 (possibly followed by padding)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        tail = f.read().rstrip(b"\x00\r\n ")
    return tail.endswith(b"\xff\xd9")


@dataclass
class Preprocess:
    """Resize to a square and normalise: the single image -> tensor mapping every code path shares.

    Plain resize (squash) rather than resize + centre crop: a caption describes the whole picture,
    and a crop can cut away an object the caption mentions, or the left/right half a spatial word
    refers to. Squashing distorts aspect ratio a little but never removes content, and it is the
    same function at training, evaluation and caption time.
    """

    image_size: int
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        size = declared(ModelConfig)["image_size"]  # the bounds a model's image size has
        check_int("image_size", self.image_size, size.low, size.high)
        try:
            self.mean = tuple(float(m) for m in self.mean)
            self.std = tuple(float(s) for s in self.std)
        except (TypeError, ValueError, OverflowError) as err:
            raise ConfigError(f"mean and std need 3 numbers each, got {self.mean!r}, {self.std!r}") from err
        values = self.mean + self.std
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0 or not np.isfinite(values).all():
            raise ConfigError(f"mean and std need 3 finite values each (std > 0), got {self.mean}, {self.std}")

    def resized(self, pil: Image.Image) -> Image.Image:
        """The RGB image at S x S exactly as the model sees it (before normalisation)."""
        pil = to_rgb(pil)
        S = self.image_size
        if pil.size != (S, S):
            pil = pil.resize((S, S), Image.Resampling.BICUBIC)  # Pillow antialiases when shrinking
        return pil

    def normalize(self, pixels: np.ndarray | Image.Image) -> torch.Tensor:
        """uint8 pixels (H, W, 3) -> normalised float tensor (3, H, W), no resizing."""
        a = np.array(pixels, dtype=np.uint8)  # a writable copy: Pillow's buffer is read-only
        x = torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, pil: Image.Image | np.ndarray) -> torch.Tensor:
        """PIL image (any mode) or uint8 array (H, W, 3) -> tensor (3, S, S)."""
        if isinstance(pil, np.ndarray):
            if pil.dtype == np.uint8 and pil.shape == (self.image_size, self.image_size, 3):
                return self.normalize(pil)  # already RGB at S x S (a cached render): no Pillow round trip
            pil = Image.fromarray(pil)
        return self.normalize(self.resized(pil))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in every run directory."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        """Rebuild from `to_dict` output; unknown keys are an error."""
        unknown = sorted(set(data) - {"image_size", "mean", "std"})
        if unknown:
            raise ConfigError(f"unknown preprocessing keys: {', '.join(unknown)}")
        return cls(image_size=data["image_size"], mean=data.get("mean", IMAGENET_MEAN),
                   std=data.get("std", IMAGENET_STD))


@dataclass(frozen=True)
class Augmentation:
    """One draw of TrainTransform's random parameters."""

    shift: tuple[int, int]  # whole pixels, (right, down)
    scale: float  # zoom about the centre (> 1 zooms in)
    factors: tuple[float, float, float]  # brightness, contrast, saturation; 1 leaves the image as it is
    order: tuple[int, int, int]  # the order the three colour changes are applied in (indices into factors)


class TrainTransform:
    """Training-time augmentation around a Preprocess: mild colour jitter and a small zoom/shift.

    Never flips or rotates: captions say "left", "right", "above", "below", and a mirrored image
    would make those words lies. The zoom/shift is small enough that objects stay in frame.

    The same operations on Pillow images as torchvision's RandomAffine(degrees=0, translate, scale,
    bilinear) and ColorJitter(brightness, contrast, saturation), with parameters drawn from the same
    ranges, written out so that training does not import torchvision (a start-up cost: benchmarks/NOTES.md,
    "Warm start at COCO scale"). Every random number comes from torch's global generator, which
    CaptionDataset seeds per item (exact resume).
    """

    def __init__(self, preprocess: Preprocess, *, brightness: float = 0.15, contrast: float = 0.15,
                 saturation: float = 0.15, translate: float = 0.04,
                 scale: tuple[float, float] = (0.94, 1.06)) -> None:
        strengths = (brightness, contrast, saturation)
        if not all(0 <= s <= 1 for s in strengths) or not 0 <= translate <= 1 or not 0 < scale[0] <= scale[1]:
            raise ConfigError(f"augmentation strengths and translate must be in [0, 1] and the scale range "
                              f"positive, got {strengths}, {translate}, {scale}")
        self.preprocess = preprocess
        self.strengths, self.translate, self.scale = strengths, translate, scale
        self.fill = tuple(int(round(255 * m)) for m in preprocess.mean)  # borders normalise to ~0

    @property
    def image_size(self) -> int:
        """Side of the square output."""
        return self.preprocess.image_size

    def __call__(self, pil: Image.Image | np.ndarray) -> torch.Tensor:
        """PIL image or uint8 array (H, W, 3) -> augmented tensor (3, S, S)."""
        if isinstance(pil, np.ndarray):
            pil = Image.fromarray(pil)
        S = self.image_size
        return self.preprocess.normalize(self.apply(self.preprocess.resized(pil), self.draw(S, S)))

    def draw(self, width: int, height: int) -> Augmentation:
        """Random parameters for an image of this size, from torch's global generator."""
        ux, uy, us, ub, uc, usat = torch.rand(6, dtype=torch.float64).tolist()
        (b, c, s), t, (lo, hi) = self.strengths, self.translate, self.scale
        first, second, third = torch.randperm(3).tolist()
        return Augmentation(shift=(round((2 * ux - 1) * t * width), round((2 * uy - 1) * t * height)),
                            scale=lo + (hi - lo) * us,
                            factors=(1 - b + 2 * b * ub, 1 - c + 2 * c * uc, 1 - s + 2 * s * usat),
                            order=(first, second, third))

    def apply(self, pil: Image.Image, aug: Augmentation) -> Image.Image:
        """The RGB image zoomed and shifted, then colour-jittered, as `aug` says."""
        W, H = pil.size
        (tx, ty), s = aug.shift, aug.scale
        if (tx, ty) != (0, 0) or s != 1.0:
            cx, cy = W * 0.5, H * 0.5
            # Pillow maps each output pixel back into the input: x_in = (x_out - cx - tx) / s + cx.
            inverse = (1 / s, 0.0, cx - (cx + tx) / s, 0.0, 1 / s, cy - (cy + ty) / s)
            pil = pil.transform((W, H), Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR,
                                fillcolor=self.fill)
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for i in aug.order:
            if aug.factors[i] != 1.0:
                pil = enhancers[i](pil).enhance(aug.factors[i])
        return pil


def train_transform(preprocess: Preprocess) -> TrainTransform:
    """The augmentation used for training on real images (no flips: captions name left and right)."""
    return TrainTransform(preprocess)


def to_tensor_batch(pils: Sequence[Image.Image], preprocess: Preprocess) -> torch.Tensor:
    """Preprocess several images into one batch (B, 3, S, S)."""
    if not pils:
        S = preprocess.image_size
        return torch.empty(0, 3, S, S)
    return torch.stack([preprocess(p) for p in pils])
