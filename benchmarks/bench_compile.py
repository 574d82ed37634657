"""Does torch.compile pay, counting its compile time? The decoding step and the training step, cold and warm.

At the matched size (common.MATCHED), float32, on this machine's device:
- decoding: greedy captions of 20 tokens at batch 1 and 32, the device's default step (growing caches on
  a CPU, a CUDA graph's replay on a GPU) against the fixed-size step under torch.compile (`--compile`);
  the first call's seconds (the compile) and the steady seconds per batch, in turns;
- training: one step at batch 32 (forward, loss, backward, AdamW), eager against `torch.compile(model)` as
  `captioner train --compile` wraps it.
Each case runs in a fresh process twice: with an empty compile cache ("cold", the first start on a machine)
and again with the cache the first run left on disk ("warm", every later start). `break_even` is the
number of images (decoding) or steps (training) after which the compiled side is ahead, compile included.

    python benchmarks/bench_compile.py [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MATCHED, TOKENS, machine, setup_threads, time_in_turns  # noqa: E402

CASES = ("greedy_b1", "greedy_b32", "train_b32")
REPEAT = {"greedy_b1": 10, "greedy_b32": 4, "train_b32": 4}  # timed calls per side, in turns


def decoding_case(batch: int, device: torch.device) -> dict[str, float]:
    """Eager growing vs compiled fixed-size greedy decoding of `batch` images: seconds per call."""
    from captioner.config import ModelConfig
    from captioner.decoding import SearchOptions, fixed_caches_pay, greedy
    from captioner.models.captioner import CaptionModel

    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(**MATCHED)).eval().to(device)
    opts = SearchOptions(bos_id=1, eos_id=MATCHED["vocab_size"] + 7, max_len=TOKENS)  # never ends early
    images = torch.randn(batch, 3, MATCHED["image_size"], MATCHED["image_size"], device=device)
    # The shipped default of the device (growing caches on a CPU, a CUDA graph's step on a GPU) vs compiled.
    static = fixed_caches_pay(device)
    start = time.perf_counter()
    greedy(model, images, opts, compiled=True)
    sync(device)
    first = time.perf_counter() - start
    best = time_in_turns({"eager": lambda: greedy(model, images, opts, static=static),
                          "compiled": lambda: greedy(model, images, opts, compiled=True)},
                         repeat=REPEAT[f"greedy_b{batch}"], sync=lambda: sync(device))
    return {"first_call_s": first, "eager_s": best["eager"], "compiled_s": best["compiled"], "units": batch}


def training_case(device: torch.device, batch: int = 32) -> dict[str, float]:
    """Eager vs torch.compile'd training step at `batch` (as `captioner train --compile`): seconds per step."""
    from captioner.config import ModelConfig
    from captioner.models.captioner import CaptionModel
    from captioner.training import caption_loss

    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(**MATCHED)).train().to(device)
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, MATCHED["image_size"], MATCHED["image_size"], device=device)
    tokens = torch.randint(4, MATCHED["vocab_size"], (batch, TOKENS + 1), device=device)

    def step(module: torch.nn.Module) -> None:
        loss = caption_loss(module(images, tokens[:, :-1]), tokens[:, 1:], pad_id=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step(compiled)
    sync(device)
    first = time.perf_counter() - start
    best = time_in_turns({"eager": lambda: step(model), "compiled": lambda: step(compiled)}, repeat=REPEAT["train_b32"],
                         sync=lambda: sync(device))
    return {"first_call_s": first, "eager_s": best["eager"], "compiled_s": best["compiled"], "units": 1}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one(case: str, device: torch.device) -> dict[str, float]:
    setup_threads()
    return training_case(device) if case == "train_b32" else decoding_case(int(case.split("_b")[1]), device)


def in_process(case: str, cache: Path, device: str) -> dict[str, float]:
    """Run one case in a fresh Python whose compile cache is `cache`."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, __file__, "--one", case, "--device", device], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(cold: dict[str, float], warm: dict[str, float]) -> dict[str, float]:
    """The case's figures: compile seconds cold and warm, steady speed-up, and where compiling breaks even."""
    eager, compiled = min(cold["eager_s"], warm["eager_s"]), min(cold["compiled_s"], warm["compiled_s"])
    saved = eager - compiled  # per call
    compile_cold, compile_warm = cold["first_call_s"] - compiled, warm["first_call_s"] - compiled

    def break_even(compile_s: float) -> float:
        return round(compile_s / saved * cold["units"]) if saved > 0 else math.inf

    return {"eager_ms": round(eager * 1e3, 1), "compiled_ms": round(compiled * 1e3, 1),
            "speedup": round(eager / compiled, 3), "compile_cold_s": round(compile_cold, 1),
            "compile_warm_s": round(compile_warm, 1), "break_even_cold": break_even(compile_cold),
            "break_even_warm": break_even(compile_warm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)  # a child process: one case, one cache
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, torch.device(args.device))))
        return
    setup_threads()
    result = {"machine": machine(), "device": args.device, "cases": {}}
    for case in CASES:
        with tempfile.TemporaryDirectory() as cache:
            cold = in_process(case, Path(cache), args.device)
            warm = in_process(case, Path(cache), args.device)
        result["cases"][case] = row(cold, warm)
        print(f"{case}: {result['cases'][case]}", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
