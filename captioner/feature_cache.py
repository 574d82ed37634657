"""A frozen backbone's features, computed once per training image and kept on disk for later epochs and runs.

With `freeze_backbone` the backbone (a torchvision ResNet, or the ViT-B/16 body) is a fixed function of the
image, yet training would recompute it for every image of every epoch, and it is most of a step's compute.
`cached_dataset` runs each training image through `encoder.backbone_features` once, keeps the feature maps
as float16 rows of a memory-mapped file, and serves them as `FeatureDataset` items; the model finishes
them with `CaptionModel.forward(..., from_features=True)` (only the encoder's trainable rest runs).

Training from the cache sees un-augmented images (`Preprocess` alone): augmentation makes a new image each
epoch, which is exactly what a cache cannot hold. That is the price of the speed; validation still decodes
from images.

On disk, under the cache folder (default $XDG_CACHE_HOME/captioner/features, else ~/.cache/captioner/features),
one pair of files per (backbone architecture, image size, list of images):
    NAME.bin   a 4 KiB header (magic, build id), then rows (R, C, h, w) of float16: row r = sample r
    NAME.json  the index: build id; the key (architecture, digest of the backbone weights, image size,
               normalisation, storage dtype); the shape; each row's image (path, size, mtime_ns) and crc32;
               and a digest of the index itself
Opening checks what is cheap (the index's digest, the key, every image file's size and time, the data file's
length and build id, a few rows' checksums) and each row's checksum as it is read. Whatever does not match
is rebuilt, never used; rows of unchanged images are copied over from the old file. Both files are written
under temporary names and moved into place, data first, so a crash leaves a pair whose build ids disagree.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captioner.data import scan
from captioner.data.dataset import CaptionDataset
from captioner.data.files import workers_for
from captioner.data.images import Preprocess
from captioner.data.sources import Sample, sample_image
from captioner.errors import ConfigError, DataError, ImageError
from captioner.models.captioner import CaptionModel

VERSION = 1  # bump when what a row holds changes (preprocessing, the backbone split): old caches are rebuilt
MAGIC = b"captioner feature cache\n"
HEADER = 4096  # bytes before the rows: page-aligned, so the rows map straight into memory
DTYPE = np.float16  # half the disk and page cache of float32; its rounding (~5e-4 relative) is noise to training
SPOT_CHECKS = 8  # rows whose checksums are verified on open (every row is verified again as it is read)

Progress = Callable[[int, int], None]


class _Stale(Exception):
    """The cache on disk cannot be used as it is; the message says why."""


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/captioner/features, or ~/.cache/captioner/features."""
    return scan.default_cache_dir().parent / "features"  # beside the scan and samples caches


# ----------------------------------------------------------------------------------------------------------
# What a row depends on


def architecture(model: CaptionModel) -> str:
    """The backbone's name in cache keys and file names, e.g. resnet50-s32 or vit_b_16."""
    config = model.config
    return f"{config.cnn_arch}-s{config.cnn_stride}" if config.encoder == "cnn" else config.vit_backbone


def weights_digest(module: nn.Module) -> str:
    """blake2b of a state dict (names, dtypes, shapes, bytes): any changed weight or BatchNorm statistic changes it."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def backbone_key(model: CaptionModel, preprocess: Preprocess) -> dict[str, Any]:
    """What a row depends on besides its image: architecture, weights, resolution, normalisation, storage dtype."""
    encoder = model.encoder
    if encoder.backbone is None or not encoder.frozen:
        raise ConfigError("the feature cache needs a frozen torchvision backbone (--freeze-backbone with the cnn "
                          "encoder or vit_backbone=vit_b_16): a backbone that trains changes its features every step")
    return {"arch": architecture(model), "weights": weights_digest(encoder.backbone),
            "image_size": preprocess.image_size, "mean": list(preprocess.mean), "std": list(preprocess.std),
            "dtype": np.dtype(DTYPE).name}


def image_key(sample: Sample) -> list:
    """What identifies a sample's pixels: its file's resolved path, size and mtime_ns, or its scene's description."""
    if sample.path is not None:
        path = Path(sample.path).resolve()
        try:
            st = path.stat()
        except OSError as err:
            raise ImageError(path, f"cannot be read for the feature cache ({err.strerror or err})") from None
        return [str(path), st.st_size, st.st_mtime_ns]
    if sample.scene is not None:  # rendering is a pure function of the scene (synthetic.Scene)
        return [f"scene:{sample.image_id}", 0, hashlib.blake2b(repr(sample.scene).encode(), digest_size=8).hexdigest()]
    raise DataError(f"sample {sample.image_id} has neither an image file nor a scene")


def _file_name(key: dict[str, Any], images: list[list]) -> str:
    # Weights and normalisation are not in the name: a changed backbone replaces the old file instead of
    # leaving gigabytes behind. The list of images is, so two datasets keep a cache each.
    names = hashlib.blake2b(json.dumps([im[0] for im in images]).encode(), digest_size=8).hexdigest()
    return f"{key['arch']}-{key['image_size']}px-{names}"


def _digest(index: dict[str, Any]) -> str:
    body = {k: v for k, v in index.items() if k != "digest"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Reading


def _map(path: Path, shape: tuple[int, ...], mode: str) -> np.memmap:
    return np.memmap(path, dtype=DTYPE, mode=mode, offset=HEADER, shape=shape)


def _header(build: str) -> bytes:
    return (MAGIC + build.encode() + b"\n").ljust(HEADER, b"\0")


class FeatureStore:
    """A checked cache: row r (C, h, w) float16 is sample r's backbone features, verified as it is read."""

    def __init__(self, path: Path, index: dict[str, Any], *, rebuilt: str | None = None) -> None:
        self.path, self.index = path, index
        self.shape: tuple[int, ...] = tuple(index["shape"])  # (R, C, h, w)
        self.rebuilt = rebuilt  # why this open had to (re)build the cache; None when it was used as found
        self._rows: np.memmap | None = None  # mapped on first read in each process (a memmap pickles as a copy)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}

    def __getitem__(self, r: int) -> torch.Tensor:
        """Row r as a float16 tensor (C, h, w); DataError if its bytes are not the ones built."""
        if self._rows is None:
            self._rows = _map(self.path, self.shape, "r")
        row = np.array(self._rows[r])  # a copy: torch wants writable memory, and the check must see what is used
        if zlib.crc32(row) != self.index["crc32"][r]:
            raise DataError(f"{self.path}: row {r} does not match its checksum (the file changed after it was built); "
                            "delete it and start again to rebuild the feature cache")
        return torch.from_numpy(row)


def _read_index(path: Path) -> dict[str, Any]:
    """The index beside `path`, refused when missing, unreadable or edited (its digest no longer matches)."""
    try:
        index = json.loads(path.with_suffix(".json").read_text())
    except FileNotFoundError:
        raise _Stale("not built yet") from None
    except (OSError, ValueError) as err:
        raise _Stale(f"its index cannot be read ({type(err).__name__})") from None
    if not isinstance(index, dict) or index.get("digest") != _digest(index):
        raise _Stale("its index was edited or damaged")
    return index


def _check_data(path: Path, index: dict[str, Any], key: dict[str, Any]) -> None:
    """The index was written by this code for this backbone, and the data file is the one it describes."""
    if index.get("version") != VERSION:
        raise _Stale(f"it was written by feature cache version {index.get('version')}, not {VERSION}")
    changed = [k for k in key if index["key"].get(k) != key[k]]
    if changed:
        raise _Stale(f"the backbone's {', '.join(changed)} changed")
    shape = tuple(index["shape"])
    expected = HEADER + int(np.prod(shape)) * np.dtype(DTYPE).itemsize
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(HEADER)
    except OSError as err:
        raise _Stale(f"its data file cannot be read ({err.strerror or err})") from None
    if size != expected:
        raise _Stale(f"its data file holds {size} bytes, not {expected} (truncated or overwritten)")
    if header != _header(index["build"]):
        raise _Stale("its data file is not the one its index describes")


def _check_rows(path: Path, index: dict[str, Any], rows: Sequence[int]) -> None:
    store = FeatureStore(path, index)
    try:
        for r in rows:
            store[r]
    except DataError:
        raise _Stale(f"row {r} does not match its checksum") from None


def _open(path: Path, key: dict[str, Any], images: list[list]) -> FeatureStore:
    """The cache at `path` when every cheap check passes; _Stale saying why not."""
    index = _read_index(path)
    try:
        _check_data(path, index, key)
        if index["images"] != images:
            changed = [new[0] for old, new in zip(index["images"], images, strict=False) if old != new]
            first = f" (first: {changed[0]})" if changed else ""
            raise _Stale(f"{len(changed) or 'the list of'} images changed since it was built{first}")
        R = len(images)
        _check_rows(path, index, sorted({round(i * (R - 1) / max(SPOT_CHECKS - 1, 1)) for i in range(SPOT_CHECKS)}))
    except (KeyError, TypeError, ValueError) as err:  # a well-formed index of another layout
        raise _Stale(f"its index does not have the expected fields ({type(err).__name__})") from None
    return FeatureStore(path, index)


# ----------------------------------------------------------------------------------------------------------
# Building


class _Pixels(torch.utils.data.Dataset):
    """(row, un-augmented image (3, S, S)) of the rows to compute: what CaptionDataset gives with Preprocess."""

    def __init__(self, samples: Sequence[Sample], rows: list[int], preprocess: Preprocess) -> None:
        self.samples, self.rows, self.preprocess = samples, rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor]:
        r = self.rows[k]
        return r, self.preprocess(sample_image(self.samples[r], min_side=self.preprocess.image_size))


def _reusable(path: Path, key: dict[str, Any], images: list[list]) -> tuple[FeatureStore | None, dict[int, int]]:
    """The old cache at `path` and {new row: old row} for images it holds unchanged; nothing if it is not trusted."""
    try:
        index = _read_index(path)
        _check_data(path, index, key)
        old = {tuple(im): r for r, im in enumerate(index["images"])}
    except (_Stale, KeyError, TypeError, ValueError):
        return None, {}
    rows = {r: old[tuple(im)] for r, im in enumerate(images) if tuple(im) in old}
    return FeatureStore(path, index), rows


def _remove_dead_temporaries(path: Path) -> None:
    """Temporary files of builds on this host whose process is gone (killed mid-build): each can be gigabytes."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f"{path.stem}.*.tmp-*"):
        owner, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _feature_shape(model: CaptionModel, preprocess: Preprocess, device: torch.device) -> tuple[int, ...]:
    """(C, h, w) of one row, from a blank image."""
    S, dtype = preprocess.image_size, next(model.encoder.backbone.parameters()).dtype
    with torch.inference_mode():
        return tuple(model.encoder.backbone_features(torch.zeros(1, 3, S, S, device=device, dtype=dtype)).shape[1:])


def _build(path: Path, key: dict[str, Any], images: list[list], samples: Sequence[Sample], model: CaptionModel,
           preprocess: Preprocess, *, device: torch.device, batch_size: int, workers: int | None,
           on_progress: Progress) -> dict[str, Any]:
    """Write the cache of `samples` to `path` (rows of unchanged images copied from the old file); its index."""
    _remove_dead_temporaries(path)
    shape = (len(samples), *_feature_shape(model, preprocess, device))
    old, reusable = _reusable(path, key, images)
    if old is not None and old.shape[1:] != shape[1:]:
        old, reusable = None, {}
    build = uuid.uuid4().hex
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(_header(build))
        f.truncate(HEADER + int(np.prod(shape)) * np.dtype(DTYPE).itemsize)
    try:
        rows = _map(tmp, shape, "r+")
        crcs = [0] * len(samples)
        todo = _copy_rows(old, reusable, rows, crcs)
        done = len(samples) - len(todo)
        on_progress(done, len(samples))
        del old  # its rows are copied; the file goes when the new one replaces it
        for batch, features in _compute(samples, todo, model, preprocess, device, batch_size, workers):
            rows[batch] = features  # (n, C, h, w)
            for r, row in zip(batch.tolist(), features, strict=True):
                crcs[r] = zlib.crc32(row)
            done += len(batch)
            on_progress(done, len(samples))
        rows.flush()
        del rows
        index = {"version": VERSION, "build": build, "key": key, "shape": list(shape), "images": images,
                 "crc32": crcs}
        index["digest"] = _digest(index)
        _replace(tmp, path, index)
    finally:
        tmp.unlink(missing_ok=True)
    return index


def _copy_rows(old: FeatureStore | None, reusable: dict[int, int], rows: np.memmap, crcs: list[int]) -> list[int]:
    """Copy the reusable rows (each checked against its checksum); the rows still to compute."""
    todo = []
    for r in range(len(crcs)):
        try:
            row = old[reusable[r]].numpy()
        except (KeyError, DataError):  # a new or changed image, or a damaged old row
            todo.append(r)
            continue
        rows[r] = row
        crcs[r] = zlib.crc32(row)
    return todo


def _compute(samples: Sequence[Sample], todo: list[int], model: CaptionModel, preprocess: Preprocess,
             device: torch.device, batch_size: int, workers: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows (n,), float16 features (n, C, h, w)) as numpy for the rows in `todo`, a batch at a time."""
    if not todo:
        return
    workers = workers_for(len(todo), batch_size) if workers is None else workers
    loader = torch.utils.data.DataLoader(_Pixels(samples, todo, preprocess), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    encoder, dtype = model.encoder, next(model.encoder.backbone.parameters()).dtype
    for rows, images in loader:
        with torch.inference_mode():
            features = encoder.backbone_features(images.to(device, dtype, non_blocking=True)).to(torch.float16)
        if not bool(torch.isfinite(features).all()):
            raise DataError(f"the backbone's features of image {samples[int(rows[0])].image_id} (or its batch) "
                            "overflow float16, which the feature cache stores; train without the cache")
        yield rows.numpy(), np.ascontiguousarray(features.cpu().numpy())  # rows contiguous: checksummed as read back


def _replace(tmp: Path, path: Path, index: dict[str, Any]) -> None:
    """Move the built data into place, then its index (written to a temporary name first too)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    index_path = path.with_suffix(".json")
    index_tmp = index_path.with_name(f"{index_path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        index_tmp.write_text(json.dumps(index))
        os.replace(tmp, path)
        os.replace(index_tmp, index_path)
    finally:
        index_tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Entry points


def open_features(model: CaptionModel, samples: Sequence[Sample], preprocess: Preprocess, *,
                  cache_dir: str | Path | None = None, device: torch.device | str | None = None,
                  batch_size: int = 64, workers: int | None = None,
                  on_progress: Progress | None = None) -> FeatureStore:
    """The backbone features of `samples` (row r = samples[r]): the cache on disk if it checks out, else built.

    model: its encoder's frozen backbone computes the rows, on `device` (default: where the model is).
    preprocess: the un-augmented image -> tensor mapping (training's, without its augmentation).
    on_progress(done, total): called as rows are built; never called when the cache is used as found.
    """
    if not samples:
        raise DataError("no images to cache the features of")
    key = backbone_key(model, preprocess)
    images = [image_key(s) for s in samples]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / (_file_name(key, images) + ".bin")
    try:
        return _open(path, key, images)
    except _Stale as stale:
        reason = str(stale)
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    index = _build(path, key, images, samples, model, preprocess, device=device, batch_size=batch_size,
                   workers=workers, on_progress=on_progress or (lambda done, total: None))
    return FeatureStore(path, index, rebuilt=reason)


class FeatureDataset(CaptionDataset):
    """CaptionDataset's items, with each image replaced by its cached backbone features (C, h, w) in float16."""

    holds_features = True

    def __init__(self, dataset: CaptionDataset, store: FeatureStore) -> None:
        # Not CaptionDataset.__init__: the same samples, encoded captions, seed and shared epoch counter as
        # `dataset`, so both show the same captions at every position and set_epoch on either moves both.
        self.__dict__.update(dataset.__dict__)
        if len(store) != len(self.samples):
            raise DataError(f"{store.path} holds {len(store)} images, the dataset {len(self.samples)}")
        self.store = store

    def image(self, i: int, index: int) -> torch.Tensor:
        """Sample i's cached backbone features (C, h, w), the same in every epoch."""
        return self.store[i]


def cached_dataset(model: CaptionModel, dataset: CaptionDataset, preprocess: Preprocess, *,
                   cache_dir: str | Path | None = None, device: torch.device | str | None = None,
                   batch_size: int = 64, workers: int | None = None,
                   on_progress: Progress | None = None) -> FeatureDataset:
    """`dataset` served from the frozen backbone's cached features (built first if needed; see open_features).

    Its batches have `holds_features` set: pass it on as `model(batch.images, inputs, from_features=True)`.
    Training on it sees un-augmented images, whatever `dataset`'s transform does.
    """
    store = open_features(model, dataset.samples, preprocess, cache_dir=cache_dir, device=device,
                          batch_size=batch_size, workers=workers, on_progress=on_progress)
    return FeatureDataset(dataset, store)
