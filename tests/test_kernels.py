"""captioner.models.kernels: the one attention switch (fused SDPA or explicit), set on a model by its owner,
never global; and model code that calls its modules plainly, so hooks see every call."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from captioner.models.attention import MultiHeadAttention, causal_mask
from captioner.models.captioner import CaptionModel
from captioner.models.kernels import Kernels, use_kernels

from .conftest import tiny_model_config

MODELS = Path(__file__).resolve().parents[1] / "captioner" / "models"


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[torch.dtype]:
    """Dtypes of the queries that reached F.scaled_dot_product_attention."""
    calls: list[torch.dtype] = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    return calls


# ------------------------------------------------------------------------------------------------
# Plain module calls and public APIs


def _fired(model: nn.Module, run) -> set[str]:
    """Names of the submodules of `model` whose forward hooks fired while `run()` ran."""
    fired: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, name=name: fired.add(name)) for name, m in model.named_modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return fired


@pytest.mark.parametrize("path", ["fused", "explicit"])
@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_hooks_see_every_module_of_training_and_of_decoding_steps(encoder: str, path: str) -> None:
    """No module's forward is called past its __call__: a hook on any layer sees the work it does."""
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(encoder, n_layers=2)).use_kernels(Kernels(attention=path))
    images, tokens = torch.randn(2, 3, 48, 48), torch.randint(4, 40, (2, 4))
    linears_and_norms = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))}
    assert linears_and_norms - _fired(model.train(), lambda: model(images, tokens)) == set()

    model.eval()
    with torch.inference_mode():
        memory = model.encode(images).memory
        steps = model.begin(memory)
        stepped = _fired(model.decoder, lambda: [steps.step(tokens[:, t]) for t in range(3)])
    # Every decoder module but the layer list (a container) and the cross-attention K/V projections (run
    # once by `start`); the scores are the explicit path's (the fused path computes them inside SDPA).
    never = {"layers"} | {f"layers.{i}.cross_attn.to_kv" for i in range(2)}
    if path == "fused":
        never |= {f"layers.{i}.{attn}.score" for i in range(2) for attn in ("self_attn", "cross_attn")}
    assert stepped == {name for name, _ in model.decoder.named_modules()} - never


def test_model_code_calls_modules_and_public_torch_only() -> None:
    """The static half of the hook test: no `.forward(` call and no private torch op anywhere in captioner.models."""
    for file in sorted(MODELS.glob("*.py")):
        code = file.read_text(encoding="utf-8")
        code_only = re.sub(r"#[^\n]*|\"\"\".*?\"\"\"", "", code, flags=re.S)  # comments and docstrings out
        assert not re.search(r"(?<!def )\bforward\(", code_only), file
        assert not re.search(r"torch\.ops\.|torch\._(?!_)", code), file


def test_linear_layers_are_nn_linear_with_the_checkpoint_keys() -> None:
    """Plain nn.Linear, under the names old runs saved their weights as."""
    model = CaptionModel(tiny_model_config("vit"))
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    keys = set(model.state_dict())
    layer = "decoder.layers.0."
    assert {f"{layer}self_attn.to_q.weight", f"{layer}self_attn.to_kv.bias", f"{layer}cross_attn.to_out.weight",
            f"{layer}ff.to_hidden.weight", f"{layer}ff.to_out.bias", "decoder.head.weight",
            "encoder.layers.0.attn.to_kv.weight", "encoder.layers.0.ff.to_hidden.bias"} <= keys


# ------------------------------------------------------------------------------------------------
# The switch: a frozen value set by its owner, reaching every layer


def test_kernels_is_a_frozen_value_with_checked_words() -> None:
    kernels = Kernels()
    with pytest.raises(dataclasses.FrozenInstanceError):
        kernels.attention = "explicit"  # type: ignore[misc]
    for word in ("flash", "auto"):
        with pytest.raises(ValueError, match="attention must be one of"):
            Kernels(attention=word)
    assert Kernels() == Kernels(attention="fused")


def test_use_kernels_reaches_every_layer_and_only_that_model() -> None:
    model, other = CaptionModel(tiny_model_config("vit")), CaptionModel(tiny_model_config("cnn"))
    chosen = Kernels(attention="explicit")
    assert model.use_kernels(chosen) is model
    holders = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(holders) == 3 and all(m.kernels is chosen for m in holders)  # decoder self + cross, encoder self
    assert model.kernels is chosen
    assert all(m.kernels == Kernels() for m in other.modules() if hasattr(m, "kernels"))  # no shared switch


# ------------------------------------------------------------------------------------------------
# Attention path


def test_the_switch_alone_picks_the_path() -> None:
    """Fused wherever SDPA can compute the result; never a choice by shape, dtype or device."""
    fused, explicit = Kernels(), Kernels(attention="explicit")
    assert fused.fused_attention(score="scaled_dot", need_weights=False)
    assert fused.fused_attention(score="dot", need_weights=False)
    assert not fused.fused_attention(score="scaled_dot", need_weights=True)  # SDPA returns no weights
    assert not fused.fused_attention(score="general", need_weights=False)  # nor other scores
    assert not fused.fused_attention(score="additive", need_weights=False)
    assert not explicit.fused_attention(score="dot", need_weights=False)


# (images, beams per image) for the tiny model (2 heads, 1 layer: one self- and one cross-attention per step).
# 32 and 64 images are the default batches of `caption` and `evaluate`; with 3 beams the cross-attention rows
# of an image share its keys and values (3 queries each).
CACHED_STEP_CASES = [(3, 1), (32, 1), (64, 1), (3, 3), (16, 3), (32, 3)]


@pytest.mark.parametrize(("images", "beams"), CACHED_STEP_CASES)
def test_cached_steps_on_either_path_match_the_full_pass(sdpa_calls, images: int, beams: int) -> None:
    """Decoding steps on the fused and on the explicit path reproduce the whole-prefix pass, beams grouped or not."""
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config("vit")).eval()
    rows = torch.arange(images).repeat_interleave(beams)  # image of each decoded row, beams adjacent
    tokens = torch.randint(4, 40, (images * beams, 5))
    with torch.inference_mode():
        memory = model.encode(torch.randn(images, 3, 48, 48)).memory
        want, _ = model.decode(memory[rows], tokens)  # (B, T, V): every row against its own copy of the memory
        for path, per_step in (("fused", 2), ("explicit", 0)):
            model.use_kernels(Kernels(attention=path))
            steps = model.begin(memory)
            steps.reorder(rows)
            sdpa_calls.clear()
            got = torch.stack([steps.step(tokens[:, t])[0] for t in range(5)], dim=1)
            assert len(sdpa_calls) == 5 * per_step, path
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_give_one_result(sdpa_calls, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=32, n_heads=4).eval().to(dtype)
    x = torch.randn(3, 6, 32, dtype=dtype)
    results = {}
    with torch.inference_mode():
        for path in ("fused", "explicit"):
            use_kernels(mha, Kernels(attention=path))
            sdpa_calls.clear()
            results[path] = mha(x, x, x, mask=causal_mask(6))[0].float()
            assert len(sdpa_calls) == {"fused": 1, "explicit": 0}[path]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results["explicit"], results["fused"], rtol=tol, atol=tol)


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_model_trains_alike_on_either_path_in_float32_and_under_cpu_bf16_autocast(sdpa_calls, encoder: str) -> None:
    """The switch alone picks the path, in training too; both give the same loss and gradients."""
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(encoder)).train()
    images, tokens = torch.randn(3, 3, 48, 48), torch.randint(1, 40, (3, 5))
    attention_layers = sum(isinstance(m, MultiHeadAttention) for m in model.modules())
    for dtype in (torch.float32, torch.bfloat16):
        grads = {}
        for path in ("fused", "explicit"):
            model.use_kernels(Kernels(attention=path)).zero_grad()
            sdpa_calls.clear()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                logits = model(images, tokens)
            logits.float().square().mean().backward()
            assert len(sdpa_calls) == (attention_layers if path == "fused" else 0), (dtype, path)
            grads[path] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        fused, explicit = grads["fused"], grads["explicit"]
        assert (explicit - fused).norm() / fused.norm() < (1e-4 if dtype == torch.float32 else 3e-2), dtype
