"""Build a real (human-captioned, non-synthetic) image-caption set from Debian packages.

Sources (both from Debian's archive, installed with apt):
  openclipart-svg          ~8100 public-domain SVG clip-art drawings by ~530 artists; each SVG carries RDF
                           metadata with a human-written title, sometimes a description, and the artist.
                           About 3300 have a specific title (many carry only a collection name such as
                           "Lemon SVG theme" or "card"; those are left out). -> train / val
  tuxpaint-stamps-default  ~950 Tux Paint stamps (GPL-2): drawings and photo cut-outs by other artists, each
                           with a human-written English description ("A frog.", "Grandma's old rag doll.").
                           -> test (another source, other artists, many photographs: a real domain shift)

`--test artists` instead keeps Tux Paint out and holds out whole openclipart artists as the test split
(in-domain but unseen hands), for comparison.

Writes OUT/images/{oc,tp}/... (JPEG or PNG, SIZE x SIZE, aspect kept, padded white) and OUT/captions.json
(COCO captions with a "split" on each image), plus OUT/LICENSES.txt and OUT/stats.json.

    apt-get install -y --no-install-recommends openclipart-svg tuxpaint-stamps-default librsvg2-bin
    .venv/bin/python benchmarks/build_real_set.py --out /tmp/real_set
    .venv/bin/captioner data check --data /tmp/real_set/captions.json --images /tmp/real_set/images

Deterministic for a given --seed and package versions. Not part of the test suite (it needs the packages).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

OC_ROOT = Path("/usr/share/openclipart/svg")
TP_ROOT = Path("/usr/share/tuxpaint/stamps")
INSTALL = "apt-get install -y --no-install-recommends openclipart-svg tuxpaint-stamps-default librsvg2-bin"

NS = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
# Titles/descriptions that are not about the picture: collection names, links, addresses, tool residue.
JUNK = re.compile(r"HASH\(|@|https?://|www\.|\.svg\b|\.eps\b|^part of|clipart by|collection|\btheme\b|"
                  r"iconset|\bicons?$|^untitled|^image\s*\d*$|^drawing|^layer|^svg\b|converted from", re.I)
MAX_SHARED = 5  # a title or description shared by more images than this is a collection label
MAX_WORDS = 40
DUP_MAX_DIFF = 4.0  # mean absolute difference (0-255) of two cropped 16 x 16 signatures: "same drawing"


# ----------------------------------------------------------------------------- caption cleaning


def clean_text(text: str) -> str:
    """Strip markup and entities, turn file-name style into words, collapse whitespace."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    text = text.replace("_", " ").replace("#", " ")
    if " " not in text.strip():  # "RoundPointShovel", "Aircraft2" -> "Round Point Shovel", "Aircraft 2"
        text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)
        text = re.sub(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])", " ", text)
    return " ".join(text.split())


def oc_metadata(path: str) -> dict:
    """Title, description and artist from an openclipart SVG's RDF metadata (cc:Work)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return {"title": "", "desc": "", "artist": ""}
    work = next((e for e in root.iter() if e.tag.endswith("}Work")), None)
    if work is None:
        return {"title": "", "desc": "", "artist": ""}

    def text(el) -> str:
        return (el.text or "").strip() if el is not None else ""

    creator = work.find("dc:creator", NS)
    artist = text(creator.find(".//dc:title", NS)) if creator is not None else ""
    return {"title": text(work.find("dc:title", NS)), "desc": text(work.find("dc:description", NS)),
            "artist": artist}


def tp_description(txt: Path) -> str:
    """The English description: the first line of a Tux Paint stamp's .txt (other lines are lang.utf8=...)."""
    lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    return clean_text(lines[0]) if lines and "=" not in lines[0].split(" ")[0] else ""


# ----------------------------------------------------------------------------- rasterising


def _square(img: Image.Image, size: int) -> Image.Image:
    """RGB on white: cropped to the drawing (its opaque or non-white box), scaled up or down to fill
    size x size less a 4 % margin with its aspect kept, centred. Stamps and SVG pages often hold a small
    drawing in a large empty canvas; without the crop it would be a few pixels wide."""
    if img.mode in ("P", "LA", "L") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        alpha = img.getchannel("A")
        box = alpha.point(lambda v: 255 if v > 8 else 0).getbbox()
        base = Image.new("RGB", img.size, "white")
        base.paste(img, mask=alpha)
        img = base
    else:
        img = img.convert("RGB")
        box = img.convert("L").point(lambda v: 255 if v < 247 else 0).getbbox()
    if box:
        img = img.crop(box)
    inner = round(size * 0.92)
    scale = inner / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def signature(img: Image.Image) -> tuple[bytes, float]:
    """The drawing cropped to its non-white box, as 16 x 16 RGB bytes, and the box's aspect ratio: the same
    drawing in two sources (at another size or margin) gives nearly the same bytes."""
    box = img.convert("L").point(lambda v: 255 if v < 247 else 0).getbbox() or (0, 0, *img.size)
    crop = img.convert("RGB").crop(box)
    return crop.resize((16, 16), Image.BILINEAR).tobytes(), crop.width / max(crop.height, 1)


def render(job: tuple[str, str, int, str]) -> tuple[str, tuple[bytes, float] | None, str]:
    """Rasterise one source file to `dest`; (dest, signature or None, error)."""
    src, dest, size, ext = job
    try:
        if src.endswith(".svg"):
            proc = subprocess.run(["rsvg-convert", "-w", str(2 * size), "-h", str(2 * size), "--keep-aspect-ratio",
                                   src], capture_output=True, timeout=60)
            if proc.returncode != 0 or not proc.stdout:
                return dest, None, proc.stderr.decode(errors="replace").strip()[:200] or "rsvg-convert failed"
            img = Image.open(io.BytesIO(proc.stdout))
        else:
            img = Image.open(src)
        img.load()
        out = _square(img, size)
        if out.convert("L").getextrema()[0] >= 250:
            return dest, None, "blank after rendering"
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        if ext == "jpg":
            out.save(dest, "JPEG", quality=92)
        else:
            out.save(dest, "PNG", optimize=False)
        return dest, signature(out), ""
    except subprocess.TimeoutExpired:
        return dest, None, "rsvg-convert timed out"
    except Exception as err:  # noqa: BLE001 - a bad file is skipped and counted, never fatal
        return dest, None, f"{type(err).__name__}: {err}"[:200]


# ----------------------------------------------------------------------------- collecting entries


def _seeded_fraction(seed: int, key: str) -> float:
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def collect_openclipart(workers: int) -> tuple[list[dict], Counter]:
    files = sorted(str(p) for p in OC_ROOT.rglob("*.svg"))
    with Pool(workers) as pool:
        metas = pool.map(oc_metadata, files, chunksize=64)
    titles = Counter(clean_text(m["title"]).lower() for m in metas)
    descs = Counter(clean_text(m["desc"]).lower() for m in metas)
    seen_bytes: set[str] = set()
    dropped: Counter = Counter()
    entries = []
    for f, m in zip(files, metas, strict=True):
        digest = hashlib.sha1(Path(f).read_bytes()).hexdigest()
        if digest in seen_bytes:
            dropped["openclipart: same SVG twice"] += 1
            continue
        seen_bytes.add(digest)
        captions = []
        t, d = clean_text(m["title"]), clean_text(m["desc"])
        if t and not JUNK.search(t) and titles[t.lower()] <= MAX_SHARED and len(t.split()) <= MAX_WORDS \
                and t.lower() != m["artist"].lower():
            captions.append(t)
        if d and not JUNK.search(d) and descs[d.lower()] <= MAX_SHARED and 2 <= len(d.split()) <= MAX_WORDS \
                and d.lower() not in (c.lower() for c in captions):
            captions.append(d)
        if not captions:
            dropped["openclipart: no specific title or description"] += 1
            continue
        rel = Path(f).relative_to(OC_ROOT)
        entries.append({"src": f, "rel": "oc/" + str(rel.with_suffix("")), "captions": captions,
                        "artist": m["artist"] or "unknown", "source": "openclipart-svg"})
    return entries, dropped


def collect_tuxpaint() -> tuple[list[dict], Counter]:
    dropped: Counter = Counter()
    entries = []
    for txt in sorted(TP_ROOT.rglob("*.txt")):
        stem = txt.with_suffix("")
        src = next((stem.with_suffix(s) for s in (".svg", ".png") if stem.with_suffix(s).exists()), None)
        if src is None:
            dropped["tuxpaint: description without image"] += 1
            continue
        caption = tp_description(txt)
        if not caption or len(caption.split()) > MAX_WORDS:
            dropped["tuxpaint: empty or overlong description"] += 1
            continue
        rel = stem.relative_to(TP_ROOT)
        entries.append({"src": str(src), "rel": "tp/" + str(rel), "captions": [caption],
                        "artist": "Tux Paint contributors", "source": "tuxpaint-stamps-default"})
    return entries, dropped


def assign_splits(entries: list[dict], test: str, seed: int, val_frac: float, test_frac: float) -> None:
    held: set[str] = set()
    if test == "artists":  # whole artists to test until test_frac of the images: unseen hands
        per_artist = Counter(e["artist"] for e in entries)
        total = sum(per_artist.values())
        cands = sorted((a for a, n in per_artist.items() if n <= 0.03 * total and a != "unknown"),
                       key=lambda a: _seeded_fraction(seed, "artist:" + a))
        count = 0
        for a in cands:
            if count >= test_frac * total:
                break
            held.add(a)
            count += per_artist[a]
    for e in entries:
        if e["source"] == "tuxpaint-stamps-default" or e["artist"] in held:
            e["split"] = "test"
        else:
            e["split"] = "val" if _seeded_fraction(seed, "val:" + e["rel"]) < val_frac else "train"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/real_set", help="dataset folder to write (default %(default)s)")
    ap.add_argument("--size", type=int, default=256, help="square side in pixels (default %(default)s)")
    ap.add_argument("--ext", choices=("jpg", "png"), default="jpg")
    ap.add_argument("--test", choices=("tuxpaint", "artists"), default="tuxpaint",
                    help="test split: Tux Paint stamps (another source) or held-out openclipart artists")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--test-frac", type=float, default=0.12, help="--test artists only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep-duplicates", action="store_true",
                    help="keep test images that look the same as a train/val image (dropped by default)")
    args = ap.parse_args(argv)

    missing = []
    if not OC_ROOT.is_dir():
        missing.append("openclipart-svg")
    if args.test == "tuxpaint" and not TP_ROOT.is_dir():
        missing.append("tuxpaint-stamps-default")
    if shutil.which("rsvg-convert") is None:
        missing.append("librsvg2-bin")
    if missing:
        print(f"error: missing Debian package(s): {', '.join(missing)}. Install them with:\n"
              f"  sudo {INSTALL}", file=sys.stderr)
        return 1

    t0 = time.monotonic()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)

    entries, dropped = collect_openclipart(args.workers)
    if args.test == "tuxpaint":
        tp, tp_dropped = collect_tuxpaint()
        entries += tp
        dropped += tp_dropped
    assign_splits(entries, args.test, args.seed, args.val_frac, args.test_frac)
    print(f"collected {len(entries)} captioned images in {time.monotonic() - t0:.1f}s; rendering "
          f"with {args.workers} workers", file=sys.stderr)

    jobs = [(e["src"], str(out / "images" / f"{e['rel']}.{args.ext}"), args.size, args.ext) for e in entries]
    with Pool(args.workers) as pool:
        results = pool.map(render, jobs, chunksize=16)
    kept = []
    errors: Counter = Counter()
    for e, (dest, h, err) in zip(entries, results, strict=True):
        if h is None:
            errors[err.split(":")[0]] += 1
            dropped[f"{e['source']}: could not render"] += 1
            continue
        e["file"], e["sig"] = os.path.relpath(dest, out / "images"), h
        kept.append(e)

    # The same drawing in train and test would flatter the test score: drop test images whose picture is
    # (nearly) the same as a train/val one (Tux Paint took some stamps from openclipart).
    duplicates = []
    if not args.keep_duplicates:
        others = [e for e in kept if e["split"] != "test"]
        sigs = np.stack([np.frombuffer(e["sig"][0], np.uint8) for e in others]).astype(np.int16)
        aspects = np.array([e["sig"][1] for e in others])
        final = []
        for e in kept:
            if e["split"] == "test":
                diff = np.abs(sigs - np.frombuffer(e["sig"][0], np.uint8)).mean(axis=1)
                ratio = aspects / e["sig"][1]
                diff[(ratio < 0.8) | (ratio > 1.25)] = np.inf
                j = int(diff.argmin())
                if diff[j] <= DUP_MAX_DIFF:
                    dropped["test image the same drawing as a train/val one"] += 1
                    duplicates.append({"test": e["file"], "test_caption": e["captions"][0],
                                       "like": others[j]["file"], "like_captions": others[j]["captions"],
                                       "diff": round(float(diff[j]), 2)})
                    (out / "images" / e["file"]).unlink()
                    continue
            final.append(e)
        kept = final
    (out / "duplicates.json").write_text(json.dumps(duplicates, indent=1, ensure_ascii=False))

    images, annotations = [], []
    for i, e in enumerate(kept, 1):
        images.append({"id": i, "file_name": e["file"], "split": e["split"], "source": e["source"],
                       "artist": e["artist"], "width": args.size, "height": args.size,
                       "original": e["src"]})
        for c in e["captions"]:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "caption": c})
    info = {"description": "real clip art / stamp images with human-written titles and descriptions",
            "built_by": "benchmarks/build_real_set.py", "test": args.test, "seed": args.seed,
            "size": args.size, "packages": _package_versions()}
    (out / "captions.json").write_text(json.dumps({"info": info, "images": images,
                                                   "annotations": annotations}, ensure_ascii=False, indent=0))
    (out / "LICENSES.txt").write_text(
        "images/oc/: openclipart-svg (Debian), Open Clip Art Library, public domain dedication "
        "(/usr/share/doc/openclipart-svg/copyright); titles, descriptions and artists from each SVG's metadata.\n"
        "images/tp/: tuxpaint-stamps-default (Debian), Copyright 2002-2022 Bill Kendrick and Tux Paint "
        "contributors, GPL-2 (/usr/share/doc/tuxpaint-stamps-default/copyright); descriptions from each "
        "stamp's .txt.\n")
    splits = Counter(e["split"] for e in kept)
    stats = {"images": len(kept), "splits": dict(splits), "captions": len(annotations),
             "by_source_split": {f"{s}/{sp}": n for (s, sp), n in
                                 sorted(Counter((e["source"], e["split"]) for e in kept).items())},
             "artists": {sp: len({e["artist"] for e in kept if e["split"] == sp}) for sp in splits},
             "dropped": dict(dropped), "render_errors": dict(errors),
             "seconds": round(time.monotonic() - t0, 1)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    print(f"wrote {out / 'captions.json'}; check it with:\n  captioner data check --data "
          f"{out / 'captions.json'} --images {out / 'images'}", file=sys.stderr)
    return 0


def _package_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("openclipart-svg", "tuxpaint-stamps-default", "librsvg2-bin"):
        try:
            v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
            versions[pkg] = v.stdout.strip() if v.returncode == 0 else "not installed"
        except OSError:
            versions[pkg] = "unknown"
    return versions


if __name__ == "__main__":
    sys.exit(main())
