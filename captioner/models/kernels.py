"""Kernel policy: which attention path runs, decided in this one place.

A `Kernels` value is a frozen setting owned by whoever holds the model (`CaptionModel.use_kernels`);
the attention layers ask it and never pick a path themselves. Every decision is a pure function of the
policy and the tensors at hand (their device, dtype, shape, and whether autograd is recording). Linear
layers are plain `nn.Linear`.

Attention: F.scaled_dot_product_attention (fused) computes only the dot and scaled-dot scores and
returns no weights; where it may run, it does unless the explicit path is the faster one: bfloat16 on
the CPU (SDPA's CPU bf16 kernel is slow, with or without autograd), and float32 inference of a few
queries over many rows (decoding steps of a batch or of beams), where batched matrix products tie or
win. CUDA always keeps the fused kernel.

The figures behind these choices, and the commands that reproduce them: benchmarks/NOTES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Scores that F.scaled_dot_product_attention computes itself (dot is scaled_dot with scale 1), so
# only these can take the fused path; general and additive always go through the explicit path.
FUSED_SCORES = ("dot", "scaled_dot")
ATTENTION_PATHS = ("auto", "fused", "explicit")


@dataclass(frozen=True)
class Kernels:
    """Which attention path the model's layers run; set on a model with `CaptionModel.use_kernels`."""

    # auto: fused SDPA unless the explicit path is the faster one for these queries (module docstring).
    # fused / explicit: that path wherever it can compute the result (benchmarks, tests).
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {self.attention!r}")

    def fused_attention(self, q: torch.Tensor, *, score: str, need_weights: bool) -> bool:
        """Whether queries q (B, H, Tq, Dh) take F.scaled_dot_product_attention rather than the explicit path."""
        if need_weights or score not in FUSED_SCORES or self.attention == "explicit":
            return False  # SDPA returns no weights and knows no other score
        if self.attention == "fused" or q.device.type != "cpu":
            return True
        # auto on the CPU: explicit in bf16, and for float32 inference of a few queries over many rows.
        if q.dtype == torch.bfloat16:
            return False
        B, H, Tq, _ = q.shape
        return q.requires_grad or Tq > 4 or B * H < 64


def use_kernels(module: nn.Module, kernels: Kernels) -> None:
    """Give `kernels` to `module` and every submodule that asks a policy (those holding a `kernels` attribute)."""
    for m in module.modules():
        if isinstance(getattr(m, "kernels", None), Kernels):
            m.kernels = kernels

