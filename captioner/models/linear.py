"""The model's linear layers, with the faster CPU kernel picked for inference.

PyTorch sends a float32 `F.linear` on the CPU to MKL's sgemm. On this project's benchmark CPU (an AMD
EPYC) oneDNN's float32 matrix product is the faster one from two rows up, and MKL's matrix-vector
product stays the faster one for a single row (greedy decoding of one image). Side by side, calls
interleaved (`python benchmarks/bench_attention.py`, "linear_kernels"): a decoder step's 19 products
at 3 rows 0.77-0.89 of MKL's time, at 32 rows 0.93-0.95, at 96 rows 0.87-0.98, and an encoder product over
4608 rows 0.82-0.89; the whole 20-step decoding loop at 3 / 32 / 96 rows 1.15x / 1.12x / 1.02x faster.
Both are float32 and agree to rounding (~1e-6 relative). In bfloat16 (the encoder at `--precision
auto`) both already run oneDNN; calling it directly lets GELU be fused into the product, which at the
encoder's 4608 rows takes 7.0 instead of 12.5 ms for Linear + GELU.

So `linear` takes oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU
backend emits for linear layers) when no gradient is recorded, no autocast is active, and input and
weight are on the CPU in float32 with at least two rows, or in bfloat16; everything else (training,
autocast, CUDA, one float32 row) is plain `F.linear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = True


@contextlib.contextmanager
def onednn_linear(enabled: bool) -> Iterator[None]:
    """Turn the oneDNN path on or off inside the block (benchmarks compare both in one run)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Cheapest tests first: this runs for every product of every decoding step.
    if not (_enabled and _ONEDNN) or x.dtype != weight.dtype or x.device.type != "cpu":
        return False
    if x.dtype == torch.float32:
        if x.numel() < 2 * x.shape[-1]:  # one row: MKL's matrix-vector product
            return False
    elif x.dtype != torch.bfloat16:
        return False
    return (not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           gelu: bool = False) -> torch.Tensor:
    """x W^T + b (then GELU if asked), (..., in) -> (..., out), on the faster kernel (module docstring)."""
    if _takes_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
