"""Image loading (every mode, every bad file kind) and the shared preprocessing."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_PIXELS,
    Preprocess,
    check_image,
    load_image,
    to_rgb,
    to_tensor_batch,
    train_transform,
)
from captioner.errors import ConfigError, ImageError


def pixel(path: Path, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    im = load_image(path)
    assert im.mode == "RGB"
    return im.getpixel(xy)


def close(a, b, tol: int = 2) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- modes


def test_rgb_and_grayscale(tmp_path: Path) -> None:
    Image.new("RGB", (5, 4), (10, 20, 30)).save(tmp_path / "rgb.png")
    Image.new("L", (5, 4), 77).save(tmp_path / "l.png")
    Image.new("1", (5, 4), 1).save(tmp_path / "one.png")
    assert pixel(tmp_path / "rgb.png") == (10, 20, 30)
    assert load_image(tmp_path / "rgb.png").size == (5, 4)
    assert pixel(tmp_path / "l.png") == (77, 77, 77)
    assert pixel(tmp_path / "one.png") == (255, 255, 255)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 128))  # half-transparent red
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent
    rgba.save(tmp_path / "rgba.png")
    assert close(pixel(tmp_path / "rgba.png", (0, 0)), (255, 127, 127))
    assert pixel(tmp_path / "rgba.png", (1, 0)) == (255, 255, 255)
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 255))
    la.putpixel((1, 0), (0, 0))
    la.save(tmp_path / "la.png")
    assert pixel(tmp_path / "la.png", (0, 0)) == (0, 0, 0)
    assert pixel(tmp_path / "la.png", (1, 0)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "pt.png", transparency=1)
    assert pixel(tmp_path / "p.png", (1, 0)) == (0, 0, 255)
    assert pixel(tmp_path / "pt.png", (0, 0)) == (255, 0, 0)
    assert pixel(tmp_path / "pt.png", (1, 0)) == (255, 255, 255)  # the transparent index shows white


def test_cmyk(tmp_path: Path) -> None:
    Image.new("CMYK", (3, 3), (255, 0, 0, 0)).save(tmp_path / "cmyk.tiff")  # pure cyan
    assert close(pixel(tmp_path / "cmyk.tiff"), (0, 255, 255))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    im16 = Image.fromarray(values)
    assert im16.mode.startswith("I;16")
    im16.save(tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png")
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    # mode "I" (32-bit) holding a 16-bit range is scaled the same way; an 8-bit range is kept as is
    wide = to_rgb(Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32)))
    assert [wide.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    narrow = to_rgb(Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)))
    assert [narrow.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_exif_orientation_gives_upright_size(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "rot.jpg")
    assert upright.size == (20, 40)
    assert close(upright.getpixel((10, 5)), (255, 0, 0), tol=40)  # the red half is now on top
    assert close(upright.getpixel((10, 35)), (0, 0, 255), tol=40)


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1)])
def test_extreme_sizes(tmp_path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size, (1, 2, 3)).save(tmp_path / "x.png")
    im = load_image(tmp_path / "x.png")
    assert im.size == size
    assert Preprocess(image_size=16)(im).shape == (3, 16, 16)


# ----------------------------------------------------------------------------- bad files


def _png_with_claimed_size(path: Path, width: int, height: int) -> None:
    """A tiny valid PNG whose IHDR is rewritten to claim a huge size (with a correct CRC)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _truncated(path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _make_bad(kind: str, tmp_path: Path) -> tuple[Path, str]:
    p = tmp_path / f"{kind}.jpg"
    if kind == "missing":
        return tmp_path / "nope.jpg", "not found"
    if kind == "directory":
        p.mkdir()
        return p, "directory"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "empty"
    if kind == "text":
        p.write_text("this is not an image\n")
        return p, "not an image"
    if kind == "truncated_jpeg":
        _truncated(p, "JPEG")
        return p, "truncated"
    if kind == "truncated_png":
        p = p.with_suffix(".png")
        _truncated(p, "PNG")
        return p, "truncated"
    if kind == "bomb":
        p = p.with_suffix(".png")
        _png_with_claimed_size(p, 100_000, 100_000)
        return p, "decompression bomb"
    if kind == "over_limit":
        p = p.with_suffix(".png")
        _png_with_claimed_size(p, 12_000, 10_000)  # above MAX_PIXELS, below Pillow's own hard limit
        return p, "pixel limit"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "directory", "empty", "text", "truncated_jpeg", "truncated_png", "bomb", "over_limit"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_image_error_naming_the_file(kind: str, tmp_path: Path) -> None:
    path, reason = _make_bad(kind, tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert reason in info.value.reason
    assert check_image(path) is not None  # the cheap check agrees


def test_max_pixels_is_the_stated_limit() -> None:
    assert MAX_PIXELS == 100_000_000


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_permissions(tmp_path: Path) -> None:
    p = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(p)
    p.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission"):
            load_image(p)
    finally:
        p.chmod(0o644)


def test_check_image_accepts_good_files_and_jpeg_with_trailing_bytes(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (5, 6, 7)).save(tmp_path / "ok.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "tail.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes() + b"camera trailer")
    for name in ("ok.jpg", "ok.png", "tail.jpg"):
        assert check_image(tmp_path / name) is None, name
    load_image(tmp_path / "tail.jpg")


# Every format check_image accepts, saved from the same random picture (GIF keeps a palette of it).
CHECKED_FORMATS = {"BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "PPM": "ppm", "PNG": "png", "JPEG": "jpg"}


def _healthy(path: Path, fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    (im.convert("P") if fmt == "GIF" else im).save(path, fmt)
    return path.read_bytes()


@pytest.mark.parametrize("fmt", CHECKED_FORMATS)
def test_check_image_accepts_healthy_files_of_every_format(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / f"ok.{CHECKED_FORMATS[fmt]}"
    _healthy(path, fmt)
    assert check_image(path) is None
    load_image(path)


@pytest.mark.parametrize("cut", ["header", "half", "last_row"])
@pytest.mark.parametrize("fmt", CHECKED_FORMATS)
def test_check_image_refuses_truncation_in_every_format(fmt: str, cut: str, tmp_path: Path) -> None:
    """The check must refuse what load_image refuses, or training dies mid-epoch on a file it passed."""
    path = tmp_path / f"cut.{CHECKED_FORMATS[fmt]}"
    data = _healthy(path, fmt)
    keep = {"header": min(len(data) // 10, 800), "half": len(data) // 2, "last_row": len(data) - 64}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(ImageError):
        load_image(path)
    assert check_image(path) is not None


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_normalises_and_resizes() -> None:
    pre = Preprocess(image_size=12)
    x = pre(Image.new("RGB", (30, 20), (255, 0, 128)))
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32
    expected = [(255 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
                (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    # a uint8 array and a PIL image of the same pixels give the same tensor; a grayscale PIL is accepted
    arr = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    assert torch.equal(pre(arr), pre(Image.fromarray(arr)))
    assert pre(Image.new("L", (5, 5), 9)).shape == (3, 12, 12)
    assert pre.resized(Image.new("RGB", (30, 20))).size == (12, 12)


def test_preprocess_dict_round_trip() -> None:
    pre = Preprocess(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    again = Preprocess.from_dict(pre.to_dict())
    assert again == pre
    assert Preprocess(image_size=96) == Preprocess.from_dict({"image_size": 96})
    with pytest.raises(ConfigError):
        Preprocess.from_dict({"image_size": 96, "crop": True})
    with pytest.raises(ConfigError):
        Preprocess(image_size=0)


def test_train_transform_jitters_but_never_flips() -> None:
    torch.manual_seed(0)
    pre = Preprocess(image_size=32)
    im = Image.new("RGB", (32, 32), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 16, 32))  # left half red, right half blue
    aug = train_transform(pre)
    outputs = [aug(im) for _ in range(30)]
    assert all(o.shape == (3, 32, 32) for o in outputs)
    assert any(not torch.equal(o, pre(im)) for o in outputs)  # it does augment
    for o in outputs:
        left, right = o[:, :, :12], o[:, :, 20:]
        assert left[0].mean() > right[0].mean() and left[2].mean() < right[2].mean()


def test_to_tensor_batch() -> None:
    pre = Preprocess(image_size=8)
    batch = to_tensor_batch([Image.new("RGB", (4, 6)), Image.new("L", (9, 9))], pre)
    assert batch.shape == (2, 3, 8, 8)
    assert to_tensor_batch([], pre).shape == (0, 3, 8, 8)
