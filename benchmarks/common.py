"""Shared pieces of the benchmarks: the matched model size, timing, machine description."""

from __future__ import annotations

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


def time_it(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, min_seconds: float = 0.0) -> float:
    """Median seconds of `fn()` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, object]:
    """What the figures were measured on."""
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
            "capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d")}
