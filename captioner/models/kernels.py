"""Kernel policy: which attention path and which linear kernel run, decided in this one place.

A `Kernels` value is a frozen setting owned by whoever holds the model (`CaptionModel.use_kernels`);
the layers ask it and never pick a kernel themselves. Every decision is a pure function of the policy
and the tensors at hand (their device, dtype, shape, and whether autograd or autocast is recording).

Linear: on the CPU, oneDNN's matrix product (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's
CPU backend emits) beats the MKL sgemm that a float32 `F.linear` calls from two rows up, while MKL's
matrix-vector product stays ahead for a single row; in bfloat16 both are oneDNN, and calling it
directly fuses GELU into the product. oneDNN is taken at inference only: training and autocast keep
`F.linear`, whose autograd and dtype rules they rely on. Both kernels agree to float32 rounding.

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
import torch.nn.functional as F
from torch import nn

# Whether this torch build has oneDNN's linear at all (a fact about the build, never changed).
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# Scores that F.scaled_dot_product_attention computes itself (dot is scaled_dot with scale 1), so
# only these can take the fused path; general and additive always go through the explicit path.
FUSED_SCORES = ("dot", "scaled_dot")
ATTENTION_PATHS = ("auto", "fused", "explicit")


@dataclass(frozen=True)
class Kernels:
    """Which kernels the model's layers run; set on a model with `CaptionModel.use_kernels`."""

    # oneDNN's linear for CPU inference where it is the faster kernel. Off: F.linear everywhere, for A/B
    # benchmarks and for FLOP counting (FlopCounterMode does not see oneDNN's op).
    onednn_linear: bool = True
    # auto: fused SDPA unless the explicit path is the faster one for these queries (module docstring).
    # fused / explicit: that path wherever it can compute the result (benchmarks, tests).
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {self.attention!r}")

    def takes_onednn(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `linear(x, weight)` runs oneDNN: CPU inference outside autocast, float32 from two rows, or bf16."""
        # Cheapest tests first: this runs for every product of every decoding step.
        if not (self.onednn_linear and ONEDNN_AVAILABLE) or x.dtype != weight.dtype or x.device.type != "cpu":
            return False
        if x.dtype == torch.float32:
            if x.numel() < 2 * x.shape[-1]:  # one row: MKL's matrix-vector product
                return False
        elif x.dtype != torch.bfloat16:
            return False
        return (not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                and not torch.is_autocast_enabled("cpu"))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               gelu: bool = False) -> torch.Tensor:
        """x W^T + b (then GELU if asked), (..., in) -> (..., out), on the kernel `takes_onednn` picks."""
        if self.takes_onednn(x, weight):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                      "none" if gelu else "")
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y

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


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs on the kernel its policy picks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 kernels: Kernels = Kernels()) -> None:  # a frozen value: safe as a shared default
        super().__init__(in_features, out_features, bias)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return self.kernels.linear(x, self.weight, self.bias)
