"""What a training start needs at COCO's scale beyond the plain readers: the samples cache and a fast tokenizer.

They exist because re-reading and re-tokenising COCO's 90 MB of annotations (~590k captions) would cost
seconds at every start, for a result that only changes when the file does (figures: benchmarks/NOTES.md,
"Warm start at COCO scale").

The samples cache remembers what `sources` read from a large annotations file (the samples, their captions
with their tokens), one JSON file per (annotations file, format, image folder, and the working directory
when a path is relative) under `$XDG_CACHE_HOME/captioner/samples`. It is trusted only while the annotations
file keeps its size and mtime and the folders the images were found in, and those where the image folder is
looked for, keep theirs (`_folders_of`): adding, removing or re-pointing an entry there (an image, a
symlink, a candidate folder) changes a folder's mtime, and the next load reads the file again, so the image
folder is found as it is without a cache. Like the scan cache it is only a hint: unreadable, malformed or
stale files are ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from captioner.config import SPLITS
from captioner.data.samples import Sample, SampleList
from captioner.data.scan import default_cache_dir, replace_json
from captioner.data.vocab import CaptionText, tokenize

# Bump SAMPLES_VERSION when a reader, `sources._clean` or the tokenizer changes what the same file gives;
# NFKC's tables come with Python, so captions tokenised under another Unicode version are redone.
SAMPLES_VERSION = 1
SAMPLES_CHECKER = f"load_samples {SAMPLES_VERSION}, Unicode {unicodedata.unidata_version}"
CACHE_MIN_BYTES = 1 << 20  # smaller annotation files read in a fraction of a second: no cache file for them
RECENT_NS = 2_000_000_000  # a file changed this close to the read may change again within its mtime tick


# ----------------------------------------------------------------------------- the tokenizer for many captions


def _ascii_table() -> bytes:
    """Byte map for ASCII text: upper to lower case, "," and ":" kept, every other non-alphanumeric a space."""
    table = bytearray(range(256))
    for i in range(128):
        c = chr(i)
        table[i] = ord(c.lower()) if c.isalnum() or c in ",:" else ord(" ")
    return bytes(table)


_ASCII = _ascii_table()


def fast_tokenize(text: str) -> list[str]:
    """vocab.tokenize(text), by byte passes when the text is ASCII.

    They give the regex's tokens (tests/test_vocab.py holds them to it) in a third of its time, and nearly
    every caption of an English data set is ASCII: reading COCO's captions tokenises ~590k of them.
    """
    if not text.isascii():
        return tokenize(text)
    data = text.encode("ascii").translate(_ASCII, b"'`")  # apostrophes join words, as in vocab.tokenize
    return data.replace(b",", b" , ").replace(b":", b" : ").decode("ascii").split()


# ----------------------------------------------------------------------------- the samples cache


def samples_cache_dir() -> Path:
    """Where large annotation files' samples are remembered: beside the scan cache, in the user's cache directory."""
    return default_cache_dir().parent / "samples"


def remembered(path: Path, image_dir: Path | None, format: str, cache_dir: Path,
               read: Callable[[Path, Path | None, str], SampleList]) -> SampleList:
    """`read(path, image_dir, format)`, from the cache when nothing the samples came from has changed."""
    relative = not path.is_absolute() or (image_dir is not None and not image_dir.is_absolute())
    key = "\0".join([os.getcwd() if relative else "", os.path.abspath(path), format,
                     "" if image_dir is None else os.path.abspath(image_dir)])
    file = cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    st = os.stat(path)
    if st.st_size < CACHE_MIN_BYTES:
        return read(path, image_dir, format)
    stamp = {"checker": SAMPLES_CHECKER, "key": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    samples = _read_cache(file, stamp)
    if samples is not None:
        return samples
    started = time.time_ns()
    samples = read(path, image_dir, format)
    dirs = _folders_of(path, samples)
    recent = started - RECENT_NS
    if st.st_mtime_ns < recent and all(m < recent for m in dirs.values()) \
            and all(s.scene is None for s in samples):  # scenes are regenerated from the world, not stored
        _write_cache(file, {**stamp, "dirs": dirs}, samples)
    return samples


def _folders_of(annotations: Path, samples: Sequence[Sample]) -> dict[str, int]:
    """mtime (ns) of each folder whose entries decided where the images are: those holding them, the folders
    between them and the deepest one they share, that one's parent (the image folder's siblings: other
    candidates), and the annotations' folder (where the image folder is looked for first)."""
    parents = {os.path.abspath(d) for d in {os.path.dirname(s.path) for s in samples if s.path is not None}}
    shared = os.path.commonpath(list(parents)) if parents else None
    folders = {os.path.dirname(os.path.abspath(annotations))}
    if shared is not None:
        folders.add(os.path.dirname(shared))
    for d in parents:
        while d not in folders:
            folders.add(d)
            if d == shared or os.path.dirname(d) == d:
                break
            d = os.path.dirname(d)
    out: dict[str, int] = {}
    for d in sorted(folders):
        with suppress(OSError):
            out[d] = os.stat(d).st_mtime_ns
    return out


def _read_cache(file: Path, stamp: dict[str, Any]) -> SampleList | None:
    """The remembered samples when `stamp` and every folder's mtime still match, else None."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # absent, unreadable, not UTF-8, not JSON: read the annotations
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in stamp.items()):
        return None
    try:
        if any(os.stat(d).st_mtime_ns != m for d, m in data["dirs"].items()):
            return None
        return _unpack(data)
    except (OSError, KeyError, TypeError, ValueError, AttributeError):  # a folder gone, a malformed file
        return None


def _only(column: list, kind: type) -> bool:
    return set(map(type, column)) <= {kind}


def _unpack(data: dict[str, Any]) -> SampleList:
    """Samples from the cache's columns (the inverse of _write_cache's)."""
    ids, paths, splits, counts = data["ids"], data["paths"], data["splits"], data["counts"]
    texts, normals = data["captions"], data["normals"]
    if not ids or not all(_only(column, str) for column in (ids, paths, splits, texts, normals)) \
            or not _only(counts, int) or min(counts) < 0 or not set(splits) <= set(SPLITS) \
            or not len(ids) == len(paths) == len(splits) == len(counts) \
            or not len(texts) == len(normals) == sum(counts):
        raise ValueError("inconsistent samples cache")
    captions = [CaptionText.of(text, normal) for text, normal in zip(texts, normals, strict=True)]
    samples = SampleList(source=data["source"], format=data["format"], notes=data["notes"],
                         has_splits=data["has_splits"])
    start = 0
    for image_id, path, split, count in zip(ids, paths, splits, counts, strict=True):
        samples.append(Sample(image_id, captions[start:start + count], split, Path(path)))
        start += count
    return samples


def _write_cache(file: Path, stamp: dict[str, Any], samples: SampleList) -> None:
    """The samples as columns of one JSON file, replaced in one step (scan.replace_json)."""
    data = {**stamp, "source": samples.source, "format": samples.format, "notes": samples.notes,
            "has_splits": samples.has_splits, "ids": [s.image_id for s in samples],
            "paths": [str(s.path) for s in samples], "splits": [s.split for s in samples],
            "counts": [len(s.captions) for s in samples], "captions": [c for s in samples for c in s.captions],
            "normals": [c.normal for s in samples for c in s.captions]}
    replace_json(file, data)
