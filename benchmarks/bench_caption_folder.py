"""Captioning a folder of large JPEGs end to end, against the model alone on preprocessed tensors.

Writes N photos of 1600 x 1200 (JPEG, quality 90) and an untrained run of the matched size
(common.MATCHED: a 96 px ViT, width 256), then times, at the same batch size and max length:
- model only: `Captioner.caption_tensor` on batches already preprocessed (the ceiling);
- loader only: batches of decoded, preprocessed files per second with 0, 1 and 2 workers and no model
  (the most a model could be fed);
- end to end: the command a user runs, `captioner caption DIR --out f.jsonl`, with 0, 1 and 2 decoding
  workers and the default (one per spare core), each in a fresh process: Python and torch start-up,
  loading the run, decoding every file and writing the results included. The rate excluding start-up
  subtracts the same command's time on a single photo.
Peak memory is the largest resident set of the captioning process (its workers are forked from it and
share most of its pages).

    python benchmarks/bench_caption_folder.py                  # 2,000 photos, 2 threads
    CAPTIONER_BENCH_THREADS=1 python benchmarks/bench_caption_folder.py   # a shared, busy machine
    python benchmarks/bench_caption_folder.py --n 500 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MATCHED, TOKENS, machine, setup_threads  # noqa: E402

from captioner import checkpoint  # noqa: E402
from captioner.api import Captioner, DecodeSettings  # noqa: E402
from captioner.config import ModelConfig  # noqa: E402
from captioner.data.files import file_loader, workers_for  # noqa: E402
from captioner.data.images import Preprocess  # noqa: E402
from captioner.data.vocab import Vocabulary  # noqa: E402
from captioner.models.captioner import CaptionModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DISTINCT = 16  # distinct photos, copied to make up N files (decoding cost is per file, not per content)

# Runs `captioner caption ...` in this process, then reports its peak memory.
WRAPPER = """
import json, resource, sys
from captioner.cli import main
sys.argv = ["captioner", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "code": code}),
      file=sys.stderr)
"""


def write_photos(folder: Path, n: int) -> None:
    """n photo-like JPEGs of 1600 x 1200: smooth colour fields with grain, ~300-600 kB each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sources = []
    for i in range(DISTINCT):
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((1600, 1200),
                                                                                       Image.Resampling.BICUBIC)
        grain = rng.normal(0, 6, (1200, 1600, 3))
        pixels = np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        path = folder / f"src{i:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        sources.append(path)
    for i in range(n):
        shutil.copyfile(sources[i % DISTINCT], folder / f"photo{i:05d}.jpg")
    for path in sources:
        path.unlink()


def write_run(run_dir: Path) -> None:
    """An untrained run of the matched size (the rate does not depend on the weights' values)."""
    vocab = Vocabulary.build([" ".join(f"w{i}" for i in range(MATCHED["vocab_size"] - 4))])
    config = ModelConfig(**{**MATCHED, "vocab_size": len(vocab), "pad_id": vocab.pad_id})
    torch.manual_seed(0)
    model = CaptionModel(config)
    checkpoint.write_run_config(run_dir, model_config=config.to_dict(), vocab=vocab.to_dict(),
                                preprocess=Preprocess(config.image_size).to_dict(), train={}, data={})
    checkpoint.save_weights(run_dir / checkpoint.BEST, model)


def model_only(run_dir: Path, n: int, batch_size: int, max_len: int) -> float:
    """Captions per second of the model alone on batches already preprocessed."""
    captioner = Captioner.load(run_dir, device="cpu")
    S = captioner.preprocess.image_size
    batch = torch.randn(batch_size, 3, S, S)
    settings = DecodeSettings(max_len=max_len)
    captioner.caption_tensor(batch, settings)  # warm-up
    start = time.perf_counter()
    for _ in range(0, n, batch_size):
        captioner.caption_tensor(batch, settings)
    return batch_size * len(range(0, n, batch_size)) / (time.perf_counter() - start)


def loader_only(folder: Path, preprocess: Preprocess, batch_size: int, workers: int) -> float:
    """Files per second the DataLoader delivers, decoded and preprocessed, with nothing consuming them."""
    paths = sorted(folder.iterdir())
    start = time.perf_counter()
    for _ in file_loader(paths, preprocess, batch_size=batch_size, workers=workers):
        pass
    return len(paths) / (time.perf_counter() - start)


def end_to_end(run_dir: Path, target: Path | str, out: Path, batch_size: int, max_len: int,
               workers: int | None) -> dict[str, float]:
    """Seconds and peak memory of `captioner caption TARGET --out OUT` in a fresh process."""
    out.unlink(missing_ok=True)
    args = [sys.executable, "-c", WRAPPER, "caption", str(target), "--model", str(run_dir), "--out", str(out),
            "--device", "cpu", "--batch-size", str(batch_size), "--max-len", str(max_len)]
    if workers is not None:
        args += ["--workers", str(workers)]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the threads the model-only run had
    proc = subprocess.run(args, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    if report["code"] not in (0, None):
        raise SystemExit(f"captioner caption failed:\n{proc.stderr}")
    return {"seconds": seconds, "rss_mb": report["rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="photos in the folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=TOKENS)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2],
                        help="worker counts to time besides the default")
    args = parser.parse_args()
    setup_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_photos(root / "photos", args.n)
        write_run(root / "run")
        print(f"wrote {args.n} photos in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        ceiling = model_only(root / "run", args.n, args.batch_size, args.max_len)
        preprocess = Preprocess(MATCHED["image_size"])
        loader = {f"workers={w}": round(loader_only(root / "photos", preprocess, args.batch_size, w), 1)
                  for w in args.workers}
        print("loader only", json.dumps(loader), file=sys.stderr)
        one = root / "photos" / "photo00000.jpg"
        startup = end_to_end(root / "run", one, root / "one.jsonl", args.batch_size, args.max_len, 0)["seconds"]
        rows = {}
        for workers in [*args.workers, None]:
            r = end_to_end(root / "run", root / "photos", root / "f.jsonl", args.batch_size, args.max_len, workers)
            assert len((root / "f.jsonl").read_text().splitlines()) == args.n
            rate = args.n / r["seconds"]
            steady = args.n / max(r["seconds"] - startup, 1e-9)
            name = "default" if workers is None else f"workers={workers}"
            rows[name] = {"captions_per_s": round(rate, 1), "excluding_startup_per_s": round(steady, 1),
                          "vs_model_only": round(steady / ceiling, 2), "seconds": round(r["seconds"], 1),
                          "peak_rss_mb": round(r["rss_mb"])}
            print(name, json.dumps(rows[name]), file=sys.stderr)
    print(json.dumps({"photos": args.n, "size": "1600x1200 JPEG", "batch_size": args.batch_size,
                      "max_len": args.max_len, "model_only_per_s": round(ceiling, 1),
                      "loader_only_per_s": loader, "startup_s": round(startup, 1),
                      "default_workers": workers_for(args.n, args.batch_size),
                      "end_to_end": rows, "machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
