"""COCO at scale on the input side: the dataset scan at start-up, the image pipeline, and memory.

Writes (once) a COCO-format folder of N 640 x 480 JPEGs under --root: `train2017/` and
`captions_train2017.json` (images with COCO's fields and a Karpathy-style "split", annotations with
image_id/caption, five COCO-like captions each: ~10 words, capitals, full stops, a vocabulary of thousands
of words, nearly all distinct). With --files F < N only F JPEGs are written and the other N - F file names
are hard links to them (os.link), so COCO's 118k-image annotation file costs 20k files of disk and time;
every name is still scanned and stat-ed on its own (a cold scan reads only F files from disk, though).
Then it measures:
- start-up: seconds from launching a training process to its first optimiser step, with a cold scan cache
  (none) and a warm one (the first run's), each in a fresh process. The process calls
  `training.prepare` / `fit` with an `on_event` callback (the CLI shows its first step only on a tqdm bar
  and at every 10th step), so the figure is the CLI's own start-up without rich and typer;
- the input pipeline alone: images/s out of the training loader (augmentation, collate) with 0, 1 and
  2 DataLoader workers, no model; and the resident memory of each worker process;
- a training step: images/s of the default model (default preset and encoder) at batch 32 on
  preprocessed tensors, after warm-up.
Targets: a warm start under 10 s for 118k images; the pipeline faster than the training step.

    python benchmarks/bench_coco_pipeline.py --n 5000
    python benchmarks/bench_coco_pipeline.py --n 20000 --json /tmp/coco.json
    python benchmarks/bench_coco_pipeline.py --n 118287 --files 20000 --parts start --warm-runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, setup_threads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLIT_NAME = "train2017"
WIDTH, HEIGHT = 640, 480
BASES = 8  # distinct textured backgrounds; each image adds its own shapes, so no two files are the same
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40),
           "white": (235, 235, 235), "black": (20, 20, 20)}
THINGS = ("box", "ball", "dog", "cat", "car", "tree", "kite", "boat", "man", "woman", "bus", "train", "plate",
          "table", "horse", "bench", "clock", "pizza", "giraffe", "surfboard", "umbrella", "laptop", "bed", "sign")
DETERMINERS = ("a", "a", "a", "a", "the", "the", "two", "three", "some", "a small", "a large")
ACTIONS = ("sitting on", "standing next to", "riding", "holding", "in front of", "on top of", "looking at",
           "parked near", "walking past", "lying beside", "with", "under")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle", "near a wall",
          "in a field", "on a city street", "in a kitchen", "by the water", "in a living room", "at night")
SYLLABLES = ("ba", "ke", "lo", "mi", "nu", "ra", "so", "ti", "ve", "zo", "chan", "dor", "fel", "gra", "hin", "ple")
RARE_WORDS = 12_000  # made-up words with Zipf frequencies: COCO's captions use ~25k words, ~10k of them 5+ times
CAPTIONS_VERSION = 2  # bump when the captions or the JSON change, so an older folder's annotations are rewritten
MARKER = ".complete"
PARTS = ("scan", "start", "data", "pipeline", "step", "end-to-end")


# ----------------------------------------------------------------------------- the data set


def _bases(seed: int = 0) -> list[np.ndarray]:
    """Textured backgrounds: a smooth colour field with grain, about the detail of a photo's JPEG."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(BASES):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (WIDTH, HEIGHT), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 10, (HEIGHT, WIDTH, 3))
        out.append(np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    return out


def _write_one(args: tuple[int, Path]) -> int:
    """One JPEG: a base with a few random shapes; its file size."""
    index, path = args
    rng = np.random.default_rng(index)
    im = Image.fromarray(_BASES[index % BASES])
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(2, 5)):
        x, y = int(rng.integers(0, WIDTH - 60)), int(rng.integers(0, HEIGHT - 60))
        w, h = (int(v) for v in rng.integers(40, 200, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    im.save(path, quality=85)
    return path.stat().st_size


_BASES = _bases()  # built at import, so forked generator processes share them


def _rare_words(rng: random.Random) -> tuple[list[str], list[float]]:
    """Made-up words and their cumulative Zipf weights (the k-th most frequent word drawn ~1/k as often)."""
    words = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(RARE_WORDS)})
    rng.shuffle(words)
    cumulative, total = [], 0.0
    for k in range(len(words)):
        total += 1.0 / (k + 1)
        cumulative.append(total)
    return words, cumulative


def _caption(rng: random.Random, rare: tuple[list[str], list[float]]) -> str:
    """A COCO-like caption: about ten words, usually capitalised, often a full stop, now and then a comma
    or an apostrophe, and one or two words from a long tail."""
    words, cumulative = rare
    odd = rng.choices(words, cum_weights=cumulative, k=2)
    colour, other = rng.choice(list(COLOURS)), rng.choice(list(COLOURS))
    text = (f"{rng.choice(DETERMINERS)} {colour} {rng.choice(THINGS)} {odd[0]} {rng.choice(ACTIONS)} "
            f"{rng.choice(DETERMINERS)} {other} {rng.choice(THINGS)}")
    if rng.random() < 0.5:
        text += f" {rng.choice(PLACES)}"
    if rng.random() < 0.15:
        text += f", {odd[1]}'s {rng.choice(THINGS)}"
    if rng.random() < 0.8:
        text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.6 else text


def _split(i: int, n: int) -> str:
    held_out = max(50, n // 25)  # Karpathy's 5k val / 5k test of 123k, rounded up for small N
    return "val" if i < held_out else "test" if i < 2 * held_out else "train"


def _read_marker(root: Path) -> dict[str, int]:
    """What the folder holds: {"files", "n", "captions"}; {} when incomplete. A bare number is the
    first version's marker (N real files, short captions)."""
    try:
        text = (root / MARKER).read_text().strip()
    except OSError:
        return {}
    if text.isdigit():
        return {"files": int(text), "n": int(text), "captions": 1}
    with contextlib.suppress(ValueError):
        return json.loads(text)
    return {}


def _file_name(i: int) -> str:
    return f"{i:012d}.jpg"


def generate(root: Path, n: int, files: int, processes: int) -> dict[str, float]:
    """Write what the folder lacks: the `files` JPEGs, hard links up to `n` names, the annotations.

    Seconds taken and mean file size. JPEGs already there are kept when only N or the captions change.
    """
    files = min(files, n)
    have = _read_marker(root)
    if have == {"files": files, "n": n, "captions": CAPTIONS_VERSION}:
        return {"generated": False, "seconds": 0.0}
    folder = root / SPLIT_NAME
    t0 = time.perf_counter()
    out: dict[str, float] = {"generated": True}
    (root / MARKER).unlink(missing_ok=True)
    if have.get("files") != files:
        if root.exists():
            shutil.rmtree(root)
        folder.mkdir(parents=True)
        jobs = [(i, folder / _file_name(i)) for i in range(files)]
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=64)
        out["mean_kb"] = float(np.mean(sizes)) / 1024
        old = time.time() - 3600  # an hour old, as a downloaded data set is: recent files are never cached
        for _, p in jobs:
            os.utime(p, (old, old))
    else:
        for i in range(files, have.get("n", files)):  # the last run's links
            (folder / _file_name(i)).unlink(missing_ok=True)
    for i in range(files, n):
        os.link(folder / _file_name(i % files), folder / _file_name(i))
    _write_annotations(root, n)
    out["seconds"] = time.perf_counter() - t0
    (root / MARKER).write_text(json.dumps({"files": files, "n": n, "captions": CAPTIONS_VERSION}))
    return out


def _write_annotations(root: Path, n: int) -> None:
    """captions_train2017.json with COCO's fields (so parsing it costs what COCO's does) and a split each."""
    rng = random.Random(1)
    rare = _rare_words(rng)
    images = [{"license": 1 + i % 8, "file_name": _file_name(i),
               "coco_url": f"http://images.cocodataset.org/{SPLIT_NAME}/{_file_name(i)}",
               "height": HEIGHT, "width": WIDTH, "date_captured": "2013-11-14 11:18:45",
               "flickr_url": f"http://farm{1 + i % 9}.staticflickr.com/{i % 9000}/{i}_4e622c8349_z.jpg",
               "id": i, "split": _split(i, n)} for i in range(n)]
    annotations = [{"image_id": i, "id": 5 * i + k, "caption": _caption(rng, rare)}
                   for i in range(n) for k in range(5)]
    with open(root / f"captions_{SPLIT_NAME}.json", "w") as f:
        json.dump({"info": {"description": "bench_coco_pipeline"}, "images": images, "annotations": annotations}, f)


def annotations(root: Path) -> Path:
    return root / f"captions_{SPLIT_NAME}.json"


# ----------------------------------------------------------------------------- the scan


def _evict(paths: list[str]) -> None:
    """Drop the files from the page cache, as after a reboot or on a data set larger than memory."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _check_chunk(paths: list[str]) -> list[str | None]:
    from captioner.data.images import check_image

    return [check_image(p) for p in paths]


def _in_threads(paths: list[str], threads: int) -> list[str | None]:
    from concurrent.futures import ThreadPoolExecutor

    from captioner.data.images import check_image

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(check_image, paths))


def _in_processes(paths: list[str], processes: int) -> list[str | None]:
    from concurrent.futures import ProcessPoolExecutor

    chunks = [paths[i:i + 64] for i in range(0, len(paths), 64)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        return [r for part in pool.map(_check_chunk, chunks) for r in part]


def measure_scan(root: Path, files: int, cache_dir: Path) -> dict[str, object]:
    """check_image's rate on its own (one thread, threads, two processes; page cache evicted or not), and the
    cached scan (scan_images) of the whole folder, cold and warm."""
    from captioner.data.scan import scan_images

    paths = sorted(str(p) for p in (root / SPLIT_NAME).iterdir())
    sub = paths[:files]
    ways = {
        "1 thread": lambda: _check_chunk(sub),
        "8 threads": lambda: _in_threads(sub, 8),
        "16 threads": lambda: _in_threads(sub, 16),
        "2 processes (fork)": lambda: _in_processes(sub, 2),
    }
    rates: dict[str, dict[str, float]] = {}
    for cached in (False, True):
        for name, way in ways.items():
            best = 0.0
            for _ in range(2):  # the better of two: the machine may be shared
                if not cached:
                    _evict(sub)
                t0 = time.perf_counter()
                way()
                best = max(best, len(sub) / (time.perf_counter() - t0))
            rates.setdefault("page cache warm" if cached else "page cache evicted", {})[name] = best
    shutil.rmtree(cache_dir, ignore_errors=True)
    _evict(paths)
    t0 = time.perf_counter()
    scan_images(paths, cache=cache_dir)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    scan_images(paths, cache=cache_dir)
    warm = time.perf_counter() - t0
    return {"files": len(sub), "check_image files/s": rates, "scan_images cold s": cold,
            "scan_images warm s": warm, "scan files": len(paths)}


# ----------------------------------------------------------------------------- start-up


# One training start in a fresh process: the time of each phase up to the first optimiser step, then exit.
START = """
import json, os, sys, time
launched = float(sys.argv[1])
entered = time.time()
from captioner import training
from captioner.config import TrainConfig
imported = time.time()
marks = {}

def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            marks[name] = marks.get(name, 0.0) + time.time() - t0
    return wrapper

training.load_samples = timed("read annotations", training.load_samples)
training.check_images = timed("scan images", training.check_images)
training.Vocabulary.build = timed("vocabulary", training.Vocabulary.build)
training.train_transform = timed("transform", training.train_transform)
training.CaptionDataset.__init__ = timed("dataset", training.CaptionDataset.__init__)
training.CaptionModel.__init__ = timed("model", training.CaptionModel.__init__)
training.make_optimizer = timed("optimizer", training.make_optimizer)  # the first one imports torch._dynamo
step = training.cross_entropy_step

def first_step(run, group):
    marks.setdefault("batch in", time.time())  # the loader's worker started and the first batch collated
    return step(run, group)

def on_event(kind, data):
    if kind == "start":
        marks["start"] = time.time()
    elif kind == "step":
        now = time.time()
        print(json.dumps({"python start": entered - launched, "imports": imported - entered,
                          **{k: v for k, v in marks.items() if k not in ("start", "batch in")},
                          "prepare": prepared - imported, "first batch": marks["batch in"] - marks["start"],
                          "first step": now - marks["start"], "total": now - launched,
                          "load": os.getloadavg()[0]}), flush=True)
        os._exit(0)

run = training.prepare(TrainConfig(data=sys.argv[2], max_steps=2, device="cpu"), sys.argv[3], on_event=on_event)
prepared = time.time()
run.log_every = 1
training.fit(run, first_step)
"""


def measure_start(data: Path, runs: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds from launching a training process to its first step, by phase."""
    out = Path(tempfile.mkdtemp(dir=runs)) / "run"
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", START, str(launched), str(data), str(out)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"the training start failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the data side of a start


def _seconds(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure_data(data: Path, cache_dir: Path) -> dict[str, float]:
    """In this process, seconds of what a start does with the annotations: reading them without the samples
    cache and from it, the vocabulary, the dataset; and tokenising every caption by the regex alone (the
    tokenizer before its ASCII route) and by `tokenize`."""
    import re
    import unicodedata

    from captioner.data.dataset import CaptionDataset
    from captioner.data.images import Preprocess, train_transform
    from captioner.data.sources import gc_paused, load_samples
    from captioner.data.vocab import Vocabulary, tokenize

    shutil.rmtree(cache_dir, ignore_errors=True)
    out: dict[str, float] = {}
    out["read, no cache"], _ = _seconds(lambda: load_samples(data, cache=False))
    out["read, writing the cache"], _ = _seconds(lambda: load_samples(data, cache=cache_dir))
    out["read, from the cache"], samples = _seconds(lambda: load_samples(data, cache=cache_dir))
    train = [s for s in samples if s.split == "train"]
    captions = [c for s in train for c in s.captions]
    out["vocabulary"], vocab = _seconds(lambda: Vocabulary.build(captions, min_count=5))
    transform = train_transform(Preprocess(image_size=96))
    out["dataset"], _ = _seconds(lambda: CaptionDataset(train, vocab, transform, captions_per_image=5))
    texts = [str(c) for c in captions]
    apostrophes, token = re.compile(r"['\u2019\u2018`]"), re.compile(r"[^\W_]+|[,:]")

    def regex(text: str) -> list[str]:
        return token.findall(apostrophes.sub("", unicodedata.normalize("NFKC", text).lower()))

    with gc_paused():  # the tokenisers alone, not the collector
        out["tokenise, regex"], _ = _seconds(lambda: [regex(t) for t in texts])
        out["tokenise, tokenize"], _ = _seconds(lambda: [tokenize(t) for t in texts])
    out["captions"] = len(texts)
    return out


# ----------------------------------------------------------------------------- pipeline, step, memory


def _kb(pid: int, file: str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children() -> list[int]:
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def memory() -> dict[str, object]:
    """Resident (RSS) and proportional (PSS: shared pages split among their users) memory, MB, of this
    process and each of its children (the DataLoader workers)."""
    def mb(pid: int) -> dict[str, float | None]:
        rss, pss = _kb(pid, "status", "VmRSS"), _kb(pid, "smaps_rollup", "Pss")
        return {"rss": rss / 1024 if rss else None, "pss": pss / 1024 if pss else None}

    return {"main": mb(os.getpid()), "workers": [mb(c) for c in _children()]}


def measure_pipeline(run, workers: int, batches: int) -> dict[str, object]:
    """Images/s out of the training loader alone (augmentation, collate; no model), and its memory."""
    from dataclasses import replace

    from captioner import training

    cfg = replace(run.cfg, workers=workers)
    _, loader, _ = training.batches(cfg, run.data.train_set, run.dist, run.device)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = sum(len(next(it).images) for _ in range(batches))
    rate = images / (time.perf_counter() - t0)
    mem = memory()
    del it, loader  # persistent workers end with their iterator
    return {"workers": workers, "images/s": rate, "first batch s": first, "memory MB": mem}


def measure_step(run, steps: int, warmup: int = 3) -> float:
    """Images/s of training steps (forward, backward, update) on one preprocessed batch: the model alone."""
    from captioner import training

    _, loader, _ = training.batches(run.cfg, run.data.train_set, run.dist, run.device)
    batch = next(iter(loader))
    for _ in range(warmup):
        training.cross_entropy_step(run, [batch])
    t0 = time.perf_counter()
    for _ in range(steps):
        training.cross_entropy_step(run, [batch])
    return steps * len(batch.images) / (time.perf_counter() - t0)


class _Enough(Exception):
    pass


def measure_end_to_end(data: Path, runs: Path, workers: int, steps: int, warmup: int = 5) -> float:
    """Images/s of `fit` itself with this many loader workers: the loader and the model share the cores."""
    from captioner import training
    from captioner.config import TrainConfig

    times: list[float] = []

    def on_event(kind: str, event: dict) -> None:
        if kind == "step":
            times.append(time.perf_counter())
            if len(times) > warmup + steps:
                raise _Enough

    cfg = TrainConfig(data=str(data), device="cpu", workers=workers, max_steps=warmup + steps + 10)
    run = training.prepare(cfg, Path(tempfile.mkdtemp(dir=runs)) / "run", on_event=on_event)
    run.log_every = 1
    with contextlib.suppress(_Enough):
        training.fit(run)
    return steps * cfg.batch_size / (times[warmup + steps] - times[warmup])


# ----------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/coco_bench"))
    parser.add_argument("--n", type=int, default=20000, help="images in the folder (COCO train2017: 118287)")
    parser.add_argument("--files", type=int, default=None,
                        help="real JPEGs among them (default: all); the other names are hard links to these")
    parser.add_argument("--warm-runs", type=int, default=2, help="warm starts timed after the cold one")
    parser.add_argument("--no-cold", action="store_true", help="time warm starts only (scan cache kept)")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per worker count")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    parser.add_argument("--scan-files", type=int, default=2000, help="files for check_image's rates")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to measure (default: all); the step and end-to-end runs are the slow ones")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    setup_threads()
    result: dict[str, object] = {"machine": machine(), "n": args.n}
    files = args.n if args.files is None else args.files
    result["generate"] = gen = generate(args.root, args.n, files, processes=os.cpu_count() or 2)
    result["files"] = min(files, args.n)
    if gen["generated"]:
        size = f" ({gen['mean_kb']:.0f} kB mean)" if "mean_kb" in gen else ""
        print(f"generated {args.n} images ({result['files']} JPEGs of {WIDTH} x {HEIGHT}{size}, the rest hard "
              f"links) in {gen['seconds']:.1f} s")
    data = annotations(args.root)
    # Runs and caches live beside the data set, not in it: the samples cache is trusted only while the folders
    # around the annotations keep their mtime, as a downloaded data set's do.
    work = args.root.with_name(args.root.name + "_work")
    cache = work / "cache"  # XDG_CACHE_HOME of every run here (scan and samples caches), not the user's
    os.environ["XDG_CACHE_HOME"] = str(cache)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)

    if "scan" in args.parts:
        result["scan"] = measure_scan(args.root, min(args.scan_files, args.n), work / "scan_probe")
    if "start" in args.parts:
        env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
        result["start"] = {}
        if not args.no_cold:
            shutil.rmtree(cache, ignore_errors=True)
            _evict([str(p) for p in (args.root / SPLIT_NAME).iterdir()])
            result["start"]["cold"] = measure_start(data, runs, env)
        result["start"]["warm"] = [measure_start(data, runs, env) for _ in range(args.warm_runs)]
    if "data" in args.parts:
        result["data"] = measure_data(data, work / "samples_probe")
    if {"pipeline", "step"} & set(args.parts):
        from captioner import training
        from captioner.config import TrainConfig

        run = training.prepare(TrainConfig(data=str(data), device="cpu"), Path(tempfile.mkdtemp(dir=runs)) / "run")
        result["model"] = {"preset": run.cfg.preset, "encoder": run.cfg.encoder, "image_size":
                           run.data.model_config.image_size, "batch_size": run.cfg.batch_size,
                           "parameters": sum(p.numel() for p in run.model.parameters())}
        if "pipeline" in args.parts:
            result["pipeline"] = [measure_pipeline(run, w, args.batches) for w in (0, 1, 2)]
        if "step" in args.parts:
            result["step images/s"] = measure_step(run, args.steps)
        if run.lock is not None:
            run.lock.close()
    if "end-to-end" in args.parts:
        result["end to end images/s"] = {w: measure_end_to_end(data, runs, w, args.steps) for w in (0, 2)}
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


def report(r: dict) -> None:
    print(f"\n{r['machine']}")
    if "scan" in r:
        _report_scan(r["scan"])
    if "start" in r:
        _report_start(r["start"], r["n"])
    if "data" in r:
        print(f"\nthe data side in one process ({r['n']} images; training split's captions: "
              f"{r['data']['captions']}), s:")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in r["data"].items() if k != "captions"))
    if "model" in r:
        _report_throughput(r)
    if "end to end images/s" in r:
        print("end to end (fit, batch 32): " + ", ".join(f"workers {w} {v:.0f} images/s"
                                                         for w, v in r["end to end images/s"].items()))


def _report_scan(scan: dict) -> None:
    print(f"\ncheck_image on {scan['files']} files, files/s:")
    for where, rates in scan["check_image files/s"].items():
        print(f"  {where:20s} " + "  ".join(f"{k} {v:6.0f}" for k, v in rates.items()))
    per = 118_287 / scan["scan files"]
    print(f"scan_images of {scan['scan files']} files (page cache evicted): cold {scan['scan_images cold s']:.2f} s, "
          f"warm {scan['scan_images warm s']:.2f} s (x{per:.1f} for 118k: {scan['scan_images warm s'] * per:.1f} s)")


def _report_start(start: dict, n: int) -> None:
    print(f"\nstart to first step ({n} images), s (prepare includes the seven before it, the first step the first "
          "batch; load: 1-min average):")
    phases = ["python start", "imports", "read annotations", "scan images", "vocabulary", "transform", "dataset",
              "model", "optimizer", "prepare", "first batch", "first step", "total", "load"]
    print("  " + " ".join(f"{p[:10]:>10s}" for p in ["", *phases]))
    runs = [("cold", start["cold"])] if "cold" in start else []
    for name, s in [*runs, *((f"warm {i + 1}", s) for i, s in enumerate(start["warm"]))]:
        print("  " + f"{name:>10s} " + " ".join(f"{s.get(p, float('nan')):10.2f}" for p in phases))
    if start["warm"]:
        warm = min(s["total"] for s in start["warm"])
        print(f"  target: warm start under 10 s for 118k images; here {warm:.1f} s for {n} "
              "(the scan and reading the annotations grow with N, the imports and the model do not)")


def _report_throughput(r: dict) -> None:
    m = r["model"]
    print(f"\ninput pipeline ({m['preset']} preset, {m['encoder']}, {m['image_size']} px, batch {m['batch_size']}):")
    for p in r.get("pipeline", []):
        workers = p["memory MB"]["workers"]
        mem = ", ".join(f"RSS {w['rss']:.0f} / PSS {w['pss']:.0f}" for w in workers) or "-"
        print(f"  workers {p['workers']}: {p['images/s']:7.0f} images/s (first batch {p['first batch s']:.2f} s); "
              f"main RSS {p['memory MB']['main']['rss']:.0f} MB; per worker MB: {mem}")
    step = r.get("step images/s")
    if step is not None:
        print(f"training step alone (preprocessed batch): {step:.0f} images/s")
        print("target: the pipeline faster than the step: " + ", ".join(
            f"workers {p['workers']} x{p['images/s'] / step:.2f}" for p in r.get("pipeline", [])))


if __name__ == "__main__":
    main()
