"""The attention switch: which path computes attention, decided in this one module.

timm's way: one switch, held by every attention layer (here `Kernels`, a frozen value) and set for a
whole model by its owner (`CaptionModel.use_kernels`); no layer picks a path from shapes, dtypes or
thresholds measured on one machine. Linear layers are plain `nn.Linear`.

Two paths give one result. The fused path is F.scaled_dot_product_attention, which picks its own
kernel for the device; it computes only the dot and scaled-dot scores and returns no weights. The
explicit path (scores -> masked softmax -> weighted sum, `MultiHeadAttention._explicit`) computes every
score, returns the weights the overlays draw, and is the reference the fused path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Scores that F.scaled_dot_product_attention computes itself (dot is scaled_dot with scale 1), so
# only these can take the fused path; general and additive always go through the explicit path.
FUSED_SCORES = ("dot", "scaled_dot")
ATTENTION_PATHS = ("fused", "explicit")


@dataclass(frozen=True)
class Kernels:
    """Which attention path the model's layers run; set on a model with `CaptionModel.use_kernels`."""

    # fused: SDPA wherever it can compute the result, the explicit path elsewhere. explicit: the explicit
    # path everywhere (A/B benchmarks, tests, and a CPU whose SDPA kernel is the slower one in some dtype).
    attention: str = "fused"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {self.attention!r}")

    def fused_attention(self, *, score: str, need_weights: bool) -> bool:
        """Whether attention with this score takes F.scaled_dot_product_attention rather than the explicit path."""
        # SDPA returns no weights and knows no other score
        return self.attention == "fused" and not need_weights and score in FUSED_SCORES


def use_kernels(module: nn.Module, kernels: Kernels) -> None:
    """Give `kernels` to `module` and every submodule that asks a policy (those holding a `kernels` attribute)."""
    for m in module.modules():
        if isinstance(getattr(m, "kernels", None), Kernels):
            m.kernels = kernels
