"""Our decoding alone at the matched size, as one JSON line: for before/after comparisons across commits.

Milliseconds, fastest of several runs: greedy at batch 1 and 32 and beam 3 at batch 32 with the
encoder in bf16 where `--precision auto` would pick it (the default a user gets), and cached vs naive
greedy at batch 1, 30 tokens, in float32. It imports whatever `captioner` is first on the path, so the
same file times an older commit too:

    python benchmarks/bench_decode.py
    git worktree add /tmp/old COMMIT && (cd /tmp/old && PYTHONPATH=. python /path/to/benchmarks/bench_decode.py)

Run the two alternately, a few rounds, on a shared machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MATCHED, TOKENS, setup_threads  # noqa: E402

from captioner.config import ModelConfig  # noqa: E402
from captioner.decoding import SearchOptions, beam_search, greedy, naive_greedy  # noqa: E402
from captioner.models.captioner import CaptionModel  # noqa: E402
from captioner.training import cpu_has_native_bf16  # noqa: E402

NEVER = MATCHED["vocab_size"] + 7  # an <eos> id outside the vocabulary: every caption runs its full length


def fastest_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times) * 1e3, 1)


def main() -> None:
    setup_threads()
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(**MATCHED)).eval()
    opts, opts30 = SearchOptions(bos_id=1, eos_id=NEVER, max_len=TOKENS), SearchOptions(bos_id=1, eos_id=NEVER,
                                                                                        max_len=30)
    one, batch = torch.randn(1, 3, 96, 96), torch.randn(32, 3, 96, 96)
    result = {"b1_30tok_cached_fp32_ms": fastest_ms(lambda: greedy(model, one, opts30), 10),
              "b1_30tok_naive_fp32_ms": fastest_ms(lambda: naive_greedy(model, one, opts30), 5)}
    if cpu_has_native_bf16():
        model.encoder.to(torch.bfloat16)  # what Captioner.load does at --precision auto
    result.update({"b1_greedy_ms": fastest_ms(lambda: greedy(model, one, opts), 10),
                   "b32_greedy_ms": fastest_ms(lambda: greedy(model, batch, opts), 4),
                   "b32_beam3_ms": fastest_ms(lambda: beam_search(model, batch, opts, beam=3), 3)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
