"""Slow reference paths the fast ones are held to (tests and benchmarks import them; the library never does).

They use only the model's whole-prefix API (`encode`, `decode`) and no captioner type, so the benchmarks can
run them against older trees too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Decoded:
    """A reference caption: token ids without <bos>/<eos>, and their summed log-probability."""

    tokens: list[int]
    logprob: float


@torch.inference_mode()
def naive_greedy(model: Any, images: torch.Tensor, opts: Any) -> list[Decoded]:
    """Greedy decoding without caches: every step re-decodes the whole prefix with `model.decode`.

    opts: a `captioner.decoding.SearchOptions` (bos_id, eos_id, max_len, banned()).
    """
    B = images.shape[0]
    memory = model.encode(images).memory  # (B, N, D)
    banned = opts.banned()
    prefix = torch.full((B, 1), opts.bos_id, dtype=torch.long, device=images.device)
    logprob = torch.zeros(B, device=images.device)
    ended = torch.zeros(B, dtype=torch.bool, device=images.device)
    for _ in range(opts.max_len):
        logits, _ = model.decode(memory, prefix)  # (B, T, V): all positions recomputed
        logits = logits[:, -1].float()
        logits[:, banned] = float("-inf")
        best_logp, tokens = torch.log_softmax(logits, dim=-1).max(dim=-1)  # (B,)
        tokens[ended] = opts.eos_id
        logprob += best_logp.masked_fill(ended, 0.0)
        prefix = torch.cat([prefix, tokens[:, None]], dim=1)
        ended |= tokens == opts.eos_id
        if ended.all():
            break
    captions = []
    for row, lp in zip(prefix[:, 1:].tolist(), logprob.tolist(), strict=True):
        length = row.index(opts.eos_id) if opts.eos_id in row else len(row)
        captions.append(Decoded(row[:length], lp))
    return captions
