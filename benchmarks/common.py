"""Shared pieces of the benchmarks: the model sizes of the peer comparisons, timing, machine description."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

# The matched size of the peer comparisons (issue "benchmarks"): ViT encoder on 96 px images with
# 8 px patches, width 256, 4 encoder layers, 3 decoder layers, 4 heads, vocabulary 1000, 20 tokens.
MATCHED = dict(encoder="vit", image_size=96, patch_size=8, d_model=256, n_heads=4, enc_layers=4, n_layers=3,
               d_ff=1024, vocab_size=1000, dropout=0.0, attn_dropout=0.0)
# Dropout is off on both sides (HF's ViT has none by default, GPT-2 has 0.1): we compare compute, not
# regularisation, and on a CPU dropout's random masks alone are ~20% of a training step.
# The realistic size (issue "Performance II"): a ViT-B/16 body at 224 px (torchvision's, random weights; its
# 12 layers of width 768 are fixed, so enc_layers, which only our own ViT reads, is 0) and a decoder of
# width 512, 6 layers, 8 heads, vocabulary 10,000: the shape of a captioner trained on COCO.
REALISTIC = dict(encoder="vit", vit_backbone="vit_b_16", image_size=224, patch_size=16, enc_layers=0, d_model=512,
                 n_heads=8, n_layers=6, d_ff=2048, vocab_size=10_000, dropout=0.0, attn_dropout=0.0)
TOKENS = 20
THREADS = 2


def setup_threads(threads: int = THREADS) -> None:
    """Pin intra-op threads so both sides of a comparison get the same CPU; CAPTIONER_BENCH_THREADS overrides.

    On a shared machine whose cores are busy, one thread is steadier: OpenMP threads that wait on a
    descheduled partner crawl.
    """
    threads = int(os.environ.get("CAPTIONER_BENCH_THREADS", threads))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def time_it(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, min_seconds: float = 0.0,
            sync: Callable[[], object] | None = None) -> float:
    """Median seconds of `fn()` over `repeat` runs after `warmup` runs.

    min_seconds > 0 adds runs until that much time has passed (so a fast case gets more runs than a slow
    one: comparisons that must give both sides the same number of runs leave it at 0). `sync` waits for
    queued work (torch.cuda.synchronize): without it a GPU timing only measures the launches.
    """
    def run() -> None:
        fn()
        if sync is not None:
            sync()

    for _ in range(warmup):
        run()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_in_turns(fns: dict[str, Callable[[], object]], *, repeat: int, warmup: int = 1,
                  sync: Callable[[], object] | None = None) -> dict[str, float]:
    """Fastest seconds of each of `fns` over `repeat` runs, the functions called in turns (a, b, a, b, ...).

    For side-by-side comparisons on a shared machine: each function gets exactly `repeat` runs, a burst of
    a neighbour's load slows all of them alike, and the fastest run is the one least disturbed. `sync` as
    in time_it.
    """
    def run(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return time.perf_counter() - start

    for _ in range(warmup):
        for fn in fns.values():
            run(fn)
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = min(best[name], run(fn))
    return best


def machine() -> dict[str, object]:
    """What the figures were measured on, and how busy the machine was (load average over 1, 5, 15 minutes)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
