"""The dataset scan: every image file checked before training, in parallel, and remembered across starts.

A file that `check_image` found usable is remembered by its absolute path with its size and modification
time (ns); at the next start a file whose stat still matches is not opened again, so a warm start costs a
stat per file. Unusable files are never remembered: they are few, and some of their reasons (permission
denied, out of memory) can go away without the file changing, so they are checked at every scan.

The cache is one JSON file per image folder (the folder all the paths share), under
`$XDG_CACHE_HOME/captioner/scan/` (else `~/.cache/captioner/scan/`), or in a folder the caller names.
It is only a hint: a file that cannot be read, parsed, or was written by another checker version is
ignored and replaced; a cache that cannot be written is skipped. Writes go to a temporary file first and
replace the old one in one step, so processes scanning the same folder (one per GPU) never read half a file.

Checks run in threads: `check_image` mostly waits on two small reads (the header, the file's tail), and
threads overlap those waits where one process per core cannot. Processes win only when every file is
already in the page cache, which a first scan of a large data set rarely finds (benchmarks/NOTES.md,
"COCO-scale input pipeline").
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from itertools import compress
from operator import attrgetter, ne
from pathlib import Path
from typing import Any

import PIL

from captioner.data.images import check_image

# The checker a cached verdict came from: bump SCAN_VERSION when check_image's rules change, and a new
# Pillow may read files differently, so verdicts of other versions are not trusted.
SCAN_VERSION = 1
CHECKER = f"check_image {SCAN_VERSION}, Pillow {PIL.__version__}"
# A file modified this close to the scan could change again within the same mtime tick, leaving size and
# mtime as they were (git calls this "racily clean"): its verdict is not remembered.
RECENT_NS = 2_000_000_000
CHUNK = 64  # files per task: per-file tasks would cost about as much as a check, bigger ones a jerky progress
STAT_CHUNK = 2048  # files per stat task: a stat is microseconds, so small tasks would cost more than the stats

Progress = Callable[[int, int], None]  # (files done, files in all)
Stat = list[int]  # [size in bytes, mtime in ns]: a list, as JSON reads it back, so entries compare as read


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a data set's many objects are built or walked.

    They form no reference cycles, but every few thousand new objects start a collection, and the full
    ones walk every object alive: seconds at COCO's size (benchmarks/NOTES.md, "Warm start at COCO scale").
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def default_cache_dir() -> Path:
    """Where scan caches live unless the caller names a folder: the user's cache directory (XDG)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "captioner" / "scan"


def cache_path(folder: str, cache_dir: Path) -> Path:
    """The cache file of an image folder: named by a hash of its absolute path."""
    return cache_dir / f"{hashlib.sha256(folder.encode()).hexdigest()[:24]}.json"


def scan_images(paths: Sequence[str | Path], *, workers: int = 16, cache: bool | Path = True,
                on_progress: Progress | None = None) -> list[str | None]:
    """Why each file is unusable (check_image's reason), or None; files unchanged since found usable are skipped.

    cache: True keeps the cache in default_cache_dir(), a Path keeps it in that folder, False keeps none.
    on_progress(done, total) is called from this thread as verdicts come in.
    """
    files = _absolute_all(paths)
    if not files:
        return []
    started = time.time_ns()
    folder = _shared_folder(files)
    keys = [f[len(folder.rstrip(os.sep)) + 1:] for f in files]  # below the folder: what the cache stores
    file = None if cache is False else cache_path(folder, default_cache_dir() if cache is True else Path(cache))
    reasons: list[str | None] = [None] * len(files)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # The collector waits while the stats are compared: that builds a few objects per file and keeps none,
        # but with a data set's millions of objects alive each collection it starts would walk them all.
        with gc_paused():
            known, trusted = _read(file, folder) if file is not None else ({}, True)
            stats, todo = _changed(pool, files, keys, known, on_progress)
        done = len(files) - len(todo)
        for indices, verdicts in zip(_chunks(todo), pool.map(_check_all, _chunks([files[i] for i in todo])),
                                     strict=True):
            for i, reason in zip(indices, verdicts, strict=True):
                reasons[i] = reason
            done += len(indices)
            _report(on_progress, done, len(files))
    if file is not None:
        with gc_paused():
            remembered = _remember(known, keys, stats, reasons, todo, started)
            if remembered != known or not trusted:
                _write(file, folder, remembered)
    return reasons


def _absolute_all(paths: Sequence[str | Path]) -> list[str]:
    """Absolute paths as strings, without resolving symlinks (a prefix test, not isabs: it runs per file)."""
    cwd = os.getcwd()
    texts = [os.fspath(p) for p in paths]
    return [t if t.startswith(os.sep) else os.path.join(cwd, t) for t in texts]


def _shared_folder(files: list[str]) -> str:
    """The deepest folder holding every file; string-wise, so it costs two comparisons per file."""
    prefix = os.path.commonprefix([min(files), max(files)])
    return prefix[:prefix.rfind(os.sep)] or os.sep


def _chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _stat(file: str) -> Stat | None:
    try:
        st = os.stat(file)
    except (OSError, ValueError):  # missing, unreadable, or a name the OS refuses: check_image names the reason
        return None
    return [st.st_size, st.st_mtime_ns]


_SIZE_AND_MTIME = attrgetter("st_size", "st_mtime_ns")


def _stat_all(files: list[str]) -> list[Stat | None]:
    try:  # every file there (the usual case): in C-level loops, a third of the time of a Python loop
        return list(map(list, map(_SIZE_AND_MTIME, map(os.stat, files))))
    except (OSError, ValueError):
        return [_stat(f) for f in files]


def _check_all(files: list[str]) -> list[str | None]:
    return [check_image(f) for f in files]


def _changed(pool: ThreadPoolExecutor, files: list[str], keys: list[str], known: dict[str, Stat],
             on_progress: Progress | None) -> tuple[list[Stat | None], list[int]]:
    """Every file's [size, mtime], and the indices of those the cache cannot vouch for.

    The stats run in threads too: a network file system answers each one slowly.
    """
    stats: list[Stat | None] = []
    todo: list[int] = []
    for part in pool.map(_stat_all, _chunks(files, STAT_CHUNK)):
        start = len(stats)
        stats += part
        if None in part:  # a file that could not be stat-ed is checked whatever the cache says
            todo += [start + j for j, st in enumerate(part) if st is None or known.get(keys[start + j]) != st]
        else:
            todo += compress(range(start, len(stats)), map(ne, map(known.get, keys[start:len(stats)]), part))
        if known:
            _report(on_progress, len(stats) - len(todo), len(files))
    return stats, todo


def _report(on_progress: Progress | None, done: int, total: int) -> None:
    if on_progress is not None:
        on_progress(done, total)


def _remember(known: dict[str, Stat], keys: list[str], stats: list[Stat | None], reasons: list[str | None],
              checked: list[int], started: int) -> dict[str, Stat]:
    """The cache after this scan: the files checked now replace their entries; the others keep theirs."""
    remembered = dict(known)
    for i in checked:
        st = stats[i]
        if reasons[i] is None and st is not None and st[1] < started - RECENT_NS:
            remembered[keys[i]] = st
        else:
            remembered.pop(keys[i], None)
    return remembered


def _read(file: Path, folder: str) -> tuple[dict[str, Stat], bool]:
    """The cached [size, mtime] of usable files, and whether the cache file was sound (absent counts as sound)."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}, True
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: rebuilt, never trusted
        return {}, False
    if not isinstance(data, dict) or data.get("checker") != CHECKER or data.get("folder") != folder \
            or not isinstance(data.get("ok"), dict):
        return {}, False
    return data["ok"], True  # a malformed entry equals no file's stat, so its file is checked again


def _write(file: Path, folder: str, remembered: dict[str, Stat]) -> None:
    replace_json(file, {"checker": CHECKER, "folder": folder, "ok": remembered})


def replace_json(file: Path, data: Any) -> None:
    """Replace a cache file with `data` as JSON in one step; a folder that cannot be written only costs the
    next start the work the cache would have saved, so the error is swallowed."""
    temp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=file.parent, prefix=file.stem + ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, separators=(",", ":")))  # dumps, not dump: only it runs json's C encoder
        os.replace(temp, file)
    except OSError:  # a read-only cache folder
        if temp is not None:
            with suppress(OSError):
                os.unlink(temp)
