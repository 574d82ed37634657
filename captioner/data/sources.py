"""Dataset readers: every format becomes one list of `Sample`s (image, its reference captions, its split).

Formats (detected from the file name and content, or named with `format`):
    coco      captions JSON {"images": [{id, file_name}], "annotations": [{image_id, caption}]}
    karpathy  dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json (standard splits)
    flickr8k  Flickr8k.token.txt ("img.jpg#0<TAB>caption"), split lists Flickr_8k.*Images.txt beside it
    csv       a header with image and caption columns (one row per caption), optional split column
    jsonl     one object per line: image, caption or captions, optional split (or a JSON list of them)
`data=None` is the built-in synthetic world.

Datasets without split information get a deterministic 90/5/5 train/val/test split from a hash of the
image id, so every run and every command sees the same split.

Image paths stay inside the image folder (`image_dir`, else the one found beside the annotations), judged on
the annotation's text alone: a relative path whose `..` climbs above the folder is refused. Absolute paths are
followed as written only when no `image_dir` is given (the user's own file list); with one, they too must lie
inside it. Symlinks are not followed to judge: a link in the folder (git-annex, DVC's symlink cache, `cp -s`)
is the user's own data, wherever it points. Each path is used as normalised, so the file opened is the one
judged (`link/../x.jpg` is the folder's x.jpg, not one beside the link's target). A refused path reads the
same whether or not its target exists: the file system is never asked.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from captioner.config import FORMATS, SPLITS, TrainConfig
from captioner.data.fastload import fast_tokenize, remembered, samples_cache_dir
from captioner.data.images import load_image
from captioner.data.samples import Sample, SampleList
from captioner.data.scan import Progress, gc_paused, scan_images
from captioner.data.synthetic import Scene, SyntheticWorld, scene_from_record
from captioner.data.vocab import CaptionText, Vocabulary, token_count, tokens_of
from captioner.errors import DataError

MAX_CAPTION_TOKENS = 100  # longer "captions" are paragraphs or broken rows, not captions: dropped and counted
HASH_SPLIT = (90, 5, 5)  # train/val/test percentages for datasets that carry no split

_SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test"}
_IMAGE_COLUMNS = ("image", "image_path", "file_name", "filename", "file", "path", "img", "image_name")
_CAPTION_COLUMNS = ("caption", "text", "sentence", "comment", "description")
_JSON_FORMATS = ("auto", "coco", "karpathy", "jsonl")  # those that read a .json file as JSON
_IMAGE_DIR_NAMES = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "imgs")


def split_or_whole(samples: SampleList, split: str) -> tuple[list[Sample], str | None]:
    """The samples of `split`; all of them when the file names no splits (COCO's val2017), with a note saying so."""
    if samples.has_splits:
        return [s for s in samples if s.split == split], None
    return list(samples), f"{samples.source} names no splits: all {len(samples)} images used"


def sample_image(sample: Sample, *, min_side: int | None = None) -> Image.Image:
    """The sample's RGB image: loaded from its file when it has one (at least `min_side` on each side, decoded
    at a reduced scale where the format can: see load_image), else rendered from its scene."""
    if sample.path is not None:
        return load_image(sample.path, min_side=min_side)
    if sample.scene is not None:
        return sample.scene.render()
    raise DataError(f"sample {sample.image_id} has neither an image file nor a scene")


def hash_split(image_id: str) -> str:
    """Deterministic 90/5/5 split from a hash of the image id (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") % 100
    train, val, _ = HASH_SPLIT
    return "train" if bucket < train else "val" if bucket < train + val else "test"


# ----------------------------------------------------------------------------- entry point


def load_samples(data: str | Path | None, *, image_dir: str | Path | None = None, format: str = "auto",
                 synth_train: int = TrainConfig.synth_train, synth_val: int = TrainConfig.synth_val,
                 synth_test: int = TrainConfig.synth_test, seed: int = 0, synth_image_size: int = 96,
                 synth_max_objects: int = TrainConfig.synth_max_objects, cache: bool | Path = True) -> SampleList:
    """Read a dataset (or build the synthetic world when `data` is None) into samples with splits.

    A large annotations file's samples are remembered between starts (`cache`: True for the user's cache
    directory, a folder, or False for none; see `fastload`).
    """
    if format not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if data is None:
        world = SyntheticWorld(image_size=synth_image_size, seed=seed, max_objects=synth_max_objects)
        out = SampleList(source="synthetic", format="synthetic")
        for split, n in (("train", synth_train), ("val", synth_val), ("test", synth_test)):
            out.extend(Sample(s.image_id, [CaptionText.of(c) for c in s.captions], split, scene=s)
                       for s in world.scenes(split, n))
        return out
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: dataset file not found")
    if path.is_dir():
        path = _annotations_in_folder(path)
    image_dir = Path(image_dir) if image_dir is not None else None
    if image_dir is not None and not image_dir.is_dir():
        raise DataError(f"{image_dir}: images folder not found")
    with gc_paused():  # a large data set is ~1M objects: see gc_paused
        if cache is False:
            return _read_file(path, image_dir, format)
        return remembered(path, image_dir, format, samples_cache_dir() if cache is True else Path(cache),
                          read=_read_file)


def _read_file(path: Path, image_dir: Path | None, format: str) -> SampleList:
    """The annotations file read by its format's reader and cleaned."""
    # A JSON file is parsed once, for detecting its format and reading it (COCO's is ~90 MB).
    parsed = _read_json(path) if path.suffix.lower() == ".json" and format in _JSON_FORMATS else None
    fmt = detect_format(path, parsed) if format == "auto" else format
    reader = {"coco": _read_coco, "karpathy": _read_karpathy, "flickr8k": _read_flickr8k, "csv": _read_csv,
              "jsonl": _read_jsonl}[fmt]
    raw, notes = reader(path, image_dir, parsed)
    del parsed  # read into `raw`: free it before cleaning builds the samples
    samples = _clean(raw, notes)
    if not samples:
        raise DataError(f"{path}: no images with usable captions")
    return SampleList(samples, source=str(path), format=fmt, notes=notes,
                      has_splits=any(r.split is not None for r in raw))


def _annotations_in_folder(folder: Path) -> Path:
    """A dataset folder: the one annotations file it holds (our own captions.json first)."""
    names = ["captions.json", "dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json",
             "Flickr8k.token.txt", "captions.csv", "captions.txt", "captions.jsonl"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".jsonl", ".csv"))
    if len(found) == 1:
        return folder / found[0]
    hint = f" (candidates: {', '.join(found)})" if found else ""
    raise DataError(f"{folder}: no annotations file found{hint}; pass the file itself as --data")


def detect_format(path: Path, parsed: Any = None) -> str:
    """Name the format of an annotations file from its name and, for JSON, its layout (`parsed`: read already)."""
    name, suffix = path.name.lower(), path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".txt":
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if "token" in name or ("#" in first.split("\t")[0] and "\t" in first):
            return "flickr8k"
        return "csv"  # e.g. Kaggle's Flickr8k captions.txt: "image,caption"
    if suffix == ".json":
        data = _read_json(path) if parsed is None else parsed
        if isinstance(data, list):
            return "jsonl"
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            first = data["images"][0] if data["images"] else {}
            if isinstance(first, dict) and "sentences" in first:
                return "karpathy"
            if "annotations" in data:
                return "coco"
        raise DataError(f"{path}: JSON layout not recognised (expected COCO captions with \"images\" and "
                        "\"annotations\", Karpathy's \"images\" with \"sentences\", or a list of objects)")
    raise DataError(f"{path}: cannot tell the format from the name; pass --format "
                    f"({', '.join(FORMATS[1:])})")


# ----------------------------------------------------------------------------- shared helpers


@dataclass
class _Raw:
    image_id: str
    file: str  # as written in the annotations (relative to the image folder unless absolute)
    captions: list[str]
    split: str | None = None
    scene: Scene | None = None


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg})") \
            from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _normalise_split(value: Any, where: str) -> str:
    split = _SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise DataError(f"{where}: unknown split {value!r} (expected train, val, test or restval)")
    return split


def _find_image_dir(annotations: Path, files: list[str], given: Path | None,
                    extra: Sequence[Path] = ()) -> Path:
    """The image folder: the one given, else the first candidate beside the annotations holding the images."""
    if given is not None:
        return given
    parent = annotations.parent
    candidates = [*extra, *(parent / n for n in _IMAGE_DIR_NAMES), parent,
                  *(parent.parent / n for n in _IMAGE_DIR_NAMES)]
    probe = [f for f in files[:20] if not _climbs_out(f)]
    if not probe:
        return parent  # absolute paths need no folder; climbing ones are refused by _locate
    seen: list[Path] = []
    for c in candidates:
        if c in seen:
            continue
        seen.append(c)
        if c.is_dir() and _holds_any(c, probe):
            return c
    tried = ", ".join(str(c) for c in seen if c.is_dir()) or "none of the usual folders exist"
    raise DataError(f"{annotations}: cannot find the image folder (looked for {probe[0]} in: {tried}); "
                    "pass --images FOLDER")


def _clean(raw: list[_Raw], notes: list[str]) -> list[Sample]:
    """Merge repeated images, drop empty and absurdly long captions, assign splits; note every change."""
    by_id: dict[str, _Raw] = {}
    merged = duplicate_captions = empty = long = no_captions = 0
    for r in raw:
        if r.image_id in by_id:
            first = by_id[r.image_id]
            if first.file != r.file:
                raise DataError(f"image id {r.image_id!r} names two files: {first.file!r} and {r.file!r}")
            if r.split is not None and first.split is not None and r.split != first.split:
                raise DataError(f"image {r.image_id!r} is listed in two splits ({first.split}, {r.split})")
            first.captions.extend(r.captions)
            first.split = first.split or r.split
            merged += 1
        else:
            by_id[r.image_id] = _Raw(r.image_id, r.file, list(r.captions), r.split, r.scene)
    samples: list[Sample] = []
    hashed = 0
    for r in by_id.values():
        kept: list[str] = []
        for text in r.captions:
            c = " ".join(str(text).split())
            words = fast_tokenize(c)  # once: the CaptionText carries them to the vocabulary and the dataset
            if not words:
                empty += 1
            elif len(words) > MAX_CAPTION_TOKENS:
                long += 1
            elif c in kept:
                duplicate_captions += 1
            else:
                kept.append(CaptionText.of(c, " ".join(words)))
        if not kept:
            no_captions += 1
            continue
        split = r.split
        if split is None:
            split, hashed = hash_split(r.image_id), hashed + 1
        samples.append(Sample(r.image_id, kept, split, Path(r.file), r.scene))
    if merged:
        notes.append(f"{merged} repeated image entries merged into one image each")
    if empty:
        notes.append(f"{empty} empty captions dropped")
    if long:
        notes.append(f"{long} captions longer than {MAX_CAPTION_TOKENS} words dropped")
    if duplicate_captions:
        notes.append(f"{duplicate_captions} duplicate captions of the same image dropped")
    if no_captions:
        notes.append(f"{no_captions} images without any usable caption dropped")
    if hashed:
        shares = "/".join(map(str, HASH_SPLIT))
        notes.append(f"{hashed} images carry no split: assigned train/val/test {shares} by image id hash")
    return samples


def _holds_any(folder: Path, files: list[str]) -> bool:
    """Whether one of the (relative, non-climbing) files is in the folder; a link there counts, even dangling."""
    return any(os.path.lexists(os.path.join(folder, os.path.normpath(f))) for f in files)


def _climbs_out(entry: str) -> bool:
    """An absolute path, or a relative one whose `..` climb above its folder: judged on the text alone."""
    return os.path.isabs(entry) or _inside(entry) is None


def _inside(entry: str) -> str | None:
    """A relative entry lexically normalised (`a/../b` is `b`), or None when its `..` climb above its folder."""
    normal = os.path.normpath(entry)
    return None if normal == os.pardir or normal.startswith(os.pardir + os.sep) else normal


def _locate(annotations: Path, raw: list[_Raw], given: Path | None, extra: Sequence[Path] = ()) -> list[_Raw]:
    """Each entry's file in the image folder; one whose text leads outside it is refused (the rule: module
    docstring). Only the text is judged, once per distinct entry: no file is looked at."""
    folder = _find_image_dir(annotations, [r.file for r in raw], given, extra)
    root = os.path.normpath(os.path.abspath(folder))
    located: dict[str, str] = {}  # CSV and Flickr8k list each image once per caption: judge each entry once
    for r in raw:
        file = located.get(r.file)
        if file is None:
            file = _in_folder(r.file, folder, root, fenced=given is not None)
            if file is None:
                raise DataError(f"{annotations}: image path {r.file!r} leads outside the image folder {folder}")
            located[r.file] = file
        r.file = file
    return raw


def _in_folder(entry: str, folder: Path, root: str, *, fenced: bool) -> str | None:
    """The file `entry` names in `folder` (`root`: its absolute path), lexically normalised; None when the text
    leads outside. An absolute entry is the user's own unless `fenced` (an image folder was given)."""
    if os.path.isabs(entry):
        if not fenced:
            return entry
        normal = os.path.normpath(entry)
        return normal if normal == root or normal.startswith(root.rstrip(os.sep) + os.sep) else None
    normal = _inside(entry)
    return None if normal is None else str(folder / normal)


# ----------------------------------------------------------------------------- readers


def _read_coco(path: Path, image_dir: Path | None, parsed: Any = None) -> tuple[list[_Raw], list[str]]:
    data = _read_json(path) if parsed is None else parsed
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: COCO captions need top-level \"images\" and \"annotations\" lists")
    notes: list[str] = []
    images: dict[str, _Raw] = {}
    order: list[_Raw] = []
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{path}: images[{i}] needs \"id\" and a string \"file_name\"")
        split = _normalise_split(im["split"], f"{path}: images[{i}]") if "split" in im else None
        r = _Raw(str(im["id"]), im["file_name"], [], split)
        order.append(r)
        images.setdefault(r.image_id, r)
    unknown = 0
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: annotations[{i}] needs \"image_id\" and a string \"caption\"")
        target = images.get(str(ann["image_id"]))
        if target is None:
            unknown += 1
        else:
            target.captions.append(ann["caption"])
    if unknown:
        notes.append(f"{unknown} captions refer to image ids not in \"images\" and were ignored")
    # Repeated image entries reach _clean with their own (empty) caption lists and are merged there.
    raw = order
    _attach_scenes(data, raw, notes)
    stem = path.stem.replace("captions_", "")
    extra = [path.parent / stem, path.parent.parent / stem] if stem else []
    return _locate(path, raw, image_dir, extra), notes


def _attach_scenes(data: dict, raw: list[_Raw], notes: list[str]) -> None:
    """Files from write_synthetic: regenerate each scene so the checker and pointing game work on them."""
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    world_info = info.get("synthetic") if isinstance(info, dict) else None
    boxes = data.get("boxes")
    if not isinstance(world_info, dict) or not isinstance(boxes, dict):
        return
    try:
        world = SyntheticWorld(image_size=int(world_info["image_size"]), seed=int(world_info["seed"]))
    except (KeyError, TypeError, ValueError, DataError):
        return
    by_id = {str(im.get("id")): im for im in data["images"] if isinstance(im, dict)}
    stale = 0
    for r in raw:
        im = by_id.get(r.image_id)
        try:
            r.scene = scene_from_record(world, r.split or "train", int(im["index"]), boxes[r.image_id])
        except (KeyError, TypeError, ValueError, DataError):
            r.scene = None
        stale += r.scene is None
    if stale:
        notes.append(f"{stale} synthetic images no longer match the world's scenes; checked as plain images")


def _read_karpathy(path: Path, image_dir: Path | None, parsed: Any = None) -> tuple[list[_Raw], list[str]]:
    data = _read_json(path) if parsed is None else parsed
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: Karpathy split files need a top-level \"images\" list")
    raw: list[_Raw] = []
    for i, im in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str) \
                or not isinstance(im.get("sentences"), list):
            raise DataError(f"{where} needs a string \"filename\" and a \"sentences\" list")
        captions = []
        for j, s in enumerate(im["sentences"]):
            if isinstance(s, dict) and isinstance(s.get("raw"), str):
                captions.append(s["raw"])
            elif isinstance(s, dict) and isinstance(s.get("tokens"), list):
                captions.append(" ".join(map(str, s["tokens"])))
            else:
                raise DataError(f"{where}.sentences[{j}] needs \"raw\" text")
        split = _normalise_split(im["split"], where) if "split" in im else None
        file = str(Path(im["filepath"]) / im["filename"]) if im.get("filepath") else im["filename"]
        image_id = str(im["cocoid"]) if "cocoid" in im else Path(im["filename"]).stem
        raw.append(_Raw(image_id, file, captions, split))
    return _locate(path, raw, image_dir), []


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; anything else is a DataError naming the byte at fault."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_split_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_flickr8k(path: Path, image_dir: Path | None, parsed: Any = None) -> tuple[list[_Raw], list[str]]:
    notes: list[str] = []
    by_name: dict[str, _Raw] = {}
    lines = _read_lines(path)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_sign, _ = key.partition("#")
        if not sep or not hash_sign or not name.strip():
            raise DataError(f"{path}:{n}: expected \"image.jpg#N<TAB>caption\", got {line[:60]!r}")
        name = name.strip()
        by_name.setdefault(name, _Raw(Path(name).stem, name, [])).captions.append(caption)
    lists = {split: path.parent / f"Flickr_8k.{stem}Images.txt"
             for split, stem in (("train", "train"), ("val", "dev"), ("test", "test"))}
    raw = list(by_name.values())
    if any(p.exists() for p in lists.values()):
        split_of: dict[str, str] = {}
        for split, p in lists.items():
            if p.exists():
                for name in _read_split_list(p):
                    split_of[name] = split
        outside = [r for r in raw if r.file not in split_of]
        raw = [r for r in raw if r.file in split_of]
        for r in raw:
            r.split = split_of[r.file]
        if outside:
            notes.append(f"{len(outside)} images are in no Flickr_8k.*Images.txt split list; left out")
    return _locate(path, raw, image_dir), notes


def _pick_column(header: list[str], names: Sequence[str], what: str, path: Path) -> str:
    lowered = {h.strip().lower(): h for h in header}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise DataError(f"{path}: no {what} column in the header {header} (expected one of {', '.join(names)})")


def _read_csv(path: Path, image_dir: Path | None, parsed: Any = None) -> tuple[list[_Raw], list[str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    first = text.split("\n", 1)[0]
    delimiter = max((",", "\t", "|", ";"), key=first.count)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty file") from None
    image_col = header.index(_pick_column(header, _IMAGE_COLUMNS, "image", path))
    caption_col = header.index(_pick_column(header, _CAPTION_COLUMNS, "caption", path))
    lowered = [h.lower() for h in header]
    split_col = lowered.index("split") if "split" in lowered else None
    # An unquoted delimiter inside a caption that is the last column can only mean one thing: join it back.
    caption_last = caption_col == len(header) - 1
    raw: list[_Raw] = []
    joined = 0
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) > len(header) and caption_last:
                row = [*row[:caption_col], delimiter.join(row[caption_col:])]
                joined += 1
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: expected {len(header)} fields ({delimiter!r}-separated), "
                                f"got {len(row)}")
            file = row[image_col].strip()
            if not file:
                raise DataError(f"{path}:{line}: empty image field")
            split = _normalise_split(row[split_col], f"{path}:{line}") if split_col is not None else None
            raw.append(_Raw(file, file, [row[caption_col]], split))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    notes = [f"{joined} rows had an unquoted {delimiter!r} in the caption (joined back)"] if joined else []
    return _locate(path, raw, image_dir), notes


def _raw_from_object(obj: Any, where: str) -> _Raw:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    file = next((obj[k] for k in ("image", "file_name", "filename", "path", "image_path") if k in obj), None)
    if not isinstance(file, str) or not file.strip():
        raise DataError(f"{where}: needs an \"image\" path")
    if "captions" in obj:
        captions = obj["captions"]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{where}: \"captions\" must be a list of strings")
    elif isinstance(obj.get("caption"), str):
        captions = [obj["caption"]]
    else:
        raise DataError(f"{where}: needs \"caption\" (a string) or \"captions\" (a list of strings)")
    split = _normalise_split(obj["split"], where) if obj.get("split") is not None else None
    image_id = str(obj.get("image_id", obj.get("id", file)))
    return _Raw(image_id, file.strip(), list(captions), split)


def _read_jsonl(path: Path, image_dir: Path | None, parsed: Any = None) -> tuple[list[_Raw], list[str]]:
    raw: list[_Raw] = []
    if path.suffix.lower() == ".json":
        data = _read_json(path) if parsed is None else parsed
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of {{\"image\", \"caption\"}} objects")
        raw = [_raw_from_object(obj, f"{path}: [{i}]") for i, obj in enumerate(data)]
    else:
        lines = _read_lines(path)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg}, column {err.colno})") from None
            raw.append(_raw_from_object(obj, f"{path}:{n}"))
    return _locate(path, raw, image_dir), []


# ----------------------------------------------------------------------------- checks and report


def check_images(samples: Sequence[Sample], *, workers: int = 16, cache: bool | Path = True,
                 on_progress: Progress | None = None) -> tuple[int, list[tuple[Path, str]]]:
    """Check every referenced image file (exists, opens, not truncated); (usable count, [(path, reason)]).

    Files found usable by an earlier scan and unchanged since are not opened again (`scan.scan_images`:
    cache True for the user's cache directory, a folder, or False); on_progress(done, total) as it goes.
    """
    rendered = sum(1 for s in samples if s.path is None and s.scene is not None)
    # The scan works on text, so repeats are dropped by text; each failed file is reported by its first sample.
    first: dict[str, Path] = {}
    for s in samples:
        if s.path is not None:
            first.setdefault(str(s.path), s.path)
    files = list(first)
    reasons = scan_images(files, workers=workers, cache=cache, on_progress=on_progress)
    bad = [(first[f], r) for f, r in zip(files, reasons, strict=True) if r is not None]
    return len(files) - len(bad) + rendered, bad


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    mean, median = round(statistics.fmean(ordered), 2), statistics.median(ordered)
    return {"min": ordered[0], "mean": mean, "median": median, "p95": p95, "max": ordered[-1]}


def dataset_report(samples: Sequence[Sample], vocab_min_count: int | None = None) -> dict[str, Any]:
    """What `captioner data check` shows, as plain JSON-ready data: images found/missing/unreadable, images and
    captions per split, caption lengths in words, the vocabulary training would build, notes and warnings.

    vocab_min_count None: the threshold training would pick for these captions (TrainConfig.resolved_min_count),
    so the vocabulary size shown is the one a run with default options gets.
    """
    ok, bad = check_images(samples)
    missing = [(p, r) for p, r in bad if r == "file not found"]
    unreadable = [(p, r) for p, r in bad if r != "file not found"]
    captions = [c for s in samples for c in s.captions]
    lengths = [token_count(c) for c in captions]
    train_captions = [c for s in samples if s.split == "train" for c in s.captions]
    synthetic = getattr(samples, "format", "") == "synthetic"
    options = TrainConfig(data=None if synthetic else getattr(samples, "source", "") or "dataset",
                          min_count=vocab_min_count)
    min_count = options.resolved_min_count(len(train_captions or captions))
    vocab = Vocabulary.build(train_captions or captions, min_count=min_count, max_size=options.max_vocab)
    words = Counter(t for c in (train_captions or captions) for t in tokens_of(c))
    splits = {split: sum(1 for s in samples if s.split == split) for split in SPLITS}
    warnings = []
    if missing:
        warnings.append(f"{len(missing)} images not found")
    if unreadable:
        warnings.append(f"{len(unreadable)} images cannot be read")
    if not splits["train"] and getattr(samples, "has_splits", True):
        warnings.append("no train split: training needs one (or --val-data with a file that names no splits)")
    report: dict[str, Any] = {
        "source": getattr(samples, "source", ""),
        "format": getattr(samples, "format", ""),
        "images": len(samples),
        "images_found": ok,
        "images_missing": len(missing),
        "images_unreadable": len(unreadable),
        "splits": splits,
        "captions": len(captions),
        "split_captions": {split: sum(len(s.captions) for s in samples if s.split == split) for split in SPLITS},
        "captions_per_image": _summary([len(s.captions) for s in samples]),
        "caption_length": _summary(lengths),
        "vocab_size": len(vocab),
        "vocab_min_count": min_count,
        "vocab_max_size": options.max_vocab,
        "vocab_from": "train" if train_captions else "all",  # the split training builds it from, else everything
        "distinct_words": len(words),
        "notes": list(getattr(samples, "notes", [])),
        "warnings": warnings,
    }
    if missing:
        report["missing_examples"] = [str(p) for p, _ in missing[:5]]
    if unreadable:
        report["unreadable_examples"] = [f"{p}: {r}" for p, r in unreadable[:5]]
    return report
