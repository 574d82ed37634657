"""Our decoding and training step alone at the matched size, as one JSON line: for before/after comparisons.

Milliseconds, fastest of several runs:
- decoding: greedy at batch 1 and 32 and beam 3 at batch 32 with the encoder in bf16 where
  `--precision auto` would pick it (the default a user gets), and cached vs naive greedy at batch 1,
  30 tokens, in float32;
- training: one step at batch 32 (forward + caption_loss + backward + AdamW step), in float32 and
  under CPU bf16 autocast.

It uses only model-level code, so it times older commits too. Either run it once per tree, alternately:

    python benchmarks/bench_decode.py
    git worktree add /tmp/old COMMIT && (cd /tmp/old && PYTHONPATH=. python /path/to/benchmarks/bench_decode.py)

or give it the trees, and it imports each tree's `captioner` apart in one process and times them in
turns, call by call, so that a neighbour's load on a shared machine slows every tree alike:

    python benchmarks/bench_decode.py --trees /tmp/old .
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reference.py: the naive decoding loop
from common import MATCHED, TOKENS, setup_threads, time_in_turns  # noqa: E402

from tests.reference import naive_greedy  # noqa: E402  (model-level only: the same loop for every tree)

NEVER = MATCHED["vocab_size"] + 7  # an <eos> id outside the vocabulary: every caption runs its full length
RUNS = {"b1_30tok_cached_fp32_ms": 15, "b1_30tok_naive_fp32_ms": 6, "b1_greedy_ms": 15, "b32_greedy_ms": 5,
        "b32_beam3_ms": 4, "b32_train_step_fp32_ms": 4, "b32_train_step_bf16_ms": 4}  # timed runs per case


def load_captioner(root: Path | None) -> SimpleNamespace:
    """The pieces of `captioner` this benchmark uses, imported from the tree at `root` (None: the usual one)."""
    for name in [n for n in sys.modules if n == "captioner" or n.startswith("captioner.")]:
        del sys.modules[name]  # so that the next tree's modules are imported afresh, not reused
    if root is not None:
        sys.path.insert(0, str(root))
    try:
        decoding = importlib.import_module("captioner.decoding")
        training = importlib.import_module("captioner.training")
        try:
            runtime = importlib.import_module("captioner.runtime")
        except ImportError:  # commits before captioner.runtime existed kept it in training
            runtime = training
        return SimpleNamespace(
            ModelConfig=importlib.import_module("captioner.config").ModelConfig,
            CaptionModel=importlib.import_module("captioner.models.captioner").CaptionModel,
            SearchOptions=decoding.SearchOptions, greedy=decoding.greedy, naive_greedy=naive_greedy,
            beam_search=decoding.beam_search, caption_loss=training.caption_loss,
            cpu_has_native_bf16=runtime.cpu_has_native_bf16)
    finally:
        if root is not None:
            sys.path.remove(str(root))


def decode_cases(api: SimpleNamespace) -> dict[str, Callable[[], object]]:
    """Greedy and beam decoding at batch 1 and 32; cached vs naive greedy at batch 1."""
    torch.manual_seed(0)
    fp32 = api.CaptionModel(api.ModelConfig(**MATCHED)).eval()
    torch.manual_seed(0)
    auto = api.CaptionModel(api.ModelConfig(**MATCHED)).eval()
    if api.cpu_has_native_bf16():
        auto.encoder.to(torch.bfloat16)  # what Captioner.load does at --precision auto
    opts = api.SearchOptions(bos_id=1, eos_id=NEVER, max_len=TOKENS)
    opts30 = api.SearchOptions(bos_id=1, eos_id=NEVER, max_len=30)
    one, batch = torch.randn(1, 3, 96, 96), torch.randn(32, 3, 96, 96)
    return {"b1_30tok_cached_fp32_ms": lambda: api.greedy(fp32, one, opts30),
            "b1_30tok_naive_fp32_ms": lambda: api.naive_greedy(fp32, one, opts30),
            "b1_greedy_ms": lambda: api.greedy(auto, one, opts),
            "b32_greedy_ms": lambda: api.greedy(auto, batch, opts),
            "b32_beam3_ms": lambda: api.beam_search(auto, batch, opts, beam=3)}


def train_cases(api: SimpleNamespace) -> dict[str, Callable[[], object]]:
    """One training step at batch 32 (forward + loss + backward + AdamW), float32 and bf16 autocast."""
    torch.manual_seed(0)
    model = api.CaptionModel(api.ModelConfig(**MATCHED)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(32, 3, MATCHED["image_size"], MATCHED["image_size"])
    tokens = torch.randint(4, MATCHED["vocab_size"], (32, TOKENS + 1))

    def step(dtype: torch.dtype) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(images, tokens[:, :-1])
        loss = api.caption_loss(logits, tokens[:, 1:], pad_id=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"b32_train_step_fp32_ms": lambda: step(torch.float32),
            "b32_train_step_bf16_ms": lambda: step(torch.bfloat16)}


def fastest_in_turns(trees: dict[str, dict[str, Callable[[], object]]]) -> dict[str, dict[str, float]]:
    """Fastest time (ms) of every case of every tree; the trees run each case in turns, one call at a time."""
    best = {tree: {} for tree in trees}
    for case in next(iter(trees.values())):
        times = time_in_turns({tree: cases[case] for tree, cases in trees.items()}, repeat=RUNS[case])
        for tree, t in times.items():
            best[tree][case] = round(t * 1e3, 1)
    return best


def main() -> None:
    """Print the figures as one JSON line (per tree, and each tree's ratio to the first, with --trees)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "decode", "train"), default="all")
    parser.add_argument("--trees", nargs="+", type=Path, help="repository roots to time in turns (first = base)")
    args = parser.parse_args()
    setup_threads()
    roots = args.trees or [None]
    trees = {}
    for root in roots:
        api = load_captioner(None if root is None else root.resolve())
        cases = {}
        if args.part in ("all", "decode"):
            cases.update(decode_cases(api))
        if args.part in ("all", "train"):
            cases.update(train_cases(api))
        trees[str(root)] = cases
    best = fastest_in_turns(trees)
    if args.trees is None:
        print(json.dumps(best["None"]))
        return
    base, *others = best
    ratios = {tree: {case: round(t / best[base][case], 3) for case, t in best[tree].items()} for tree in others}
    print(json.dumps({"ms": best, "ratio_to_first": ratios}))


if __name__ == "__main__":
    main()
