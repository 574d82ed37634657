"""captioner.models.kernels: the kernel policy. oneDNN's linear for CPU inference (float32 from two rows,
bfloat16) and F.linear elsewhere; fused or explicit attention; set on a model by the caller, never global."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from captioner.models import kernels as kernels_module
from captioner.models.attention import MultiHeadAttention, causal_mask
from captioner.models.captioner import CaptionModel
from captioner.models.kernels import Kernels, Linear, use_kernels

from .conftest import tiny_model_config

needs_onednn = pytest.mark.skipif(not kernels_module.ONEDNN_AVAILABLE, reason="this torch build has no oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the inputs that reached oneDNN's linear."""
    calls: list[tuple[int, ...]] = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            if name != "_linear_pointwise":
                return getattr(torch.ops.mkldnn, name)
            return lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a)

    monkeypatch.setattr(kernels_module.torch.ops, "mkldnn", Spy(), raising=False)
    return calls


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[torch.dtype]:
    """Dtypes of the queries that reached F.scaled_dot_product_attention."""
    calls: list[torch.dtype] = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    return calls


# ------------------------------------------------------------------------------------------------
# Linear


@needs_onednn
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_path_equals_f_linear(onednn_calls, gelu: bool, bias: bool) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), (torch.randn(48) if bias else None)
    x = torch.randn(3, 5, 32)
    strided = torch.randn(5, 3, 32).transpose(0, 1)  # not contiguous
    kernels = Kernels()
    with torch.inference_mode():
        for inp in (x, strided, x[0]):
            reference = F.linear(inp, w, b)
            reference = F.gelu(reference) if gelu else reference
            torch.testing.assert_close(kernels.linear(inp, w, b, gelu=gelu), reference, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(Kernels(onednn_linear=False).linear(inp, w, b, gelu=gelu), reference)
    assert onednn_calls == [(3, 5, 32), (3, 5, 32), (5, 32)]


@needs_onednn
def test_bfloat16_inference_takes_onednn_with_gelu_fused(onednn_calls) -> None:
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 32).bfloat16(), torch.randn(48).bfloat16(), torch.randn(1, 32).bfloat16()
    with torch.inference_mode():
        fused = Kernels().linear(x, w, b, gelu=True)  # one row too: in bf16 both kernels are oneDNN's
    reference = F.gelu(F.linear(x.float(), w.float(), b.float()))
    assert fused.dtype == torch.bfloat16 and onednn_calls == [(1, 32)]
    torch.testing.assert_close(fused.float(), reference, rtol=2e-2, atol=2e-2)


@needs_onednn
def test_only_inference_outside_autocast_takes_onednn(onednn_calls) -> None:
    torch.manual_seed(0)
    layer = Linear(8, 4)
    rows = torch.randn(6, 8)
    out = layer(rows)  # autograd records the weights' gradient: plain F.linear
    out.sum().backward()
    assert layer.weight.grad is not None
    with torch.inference_mode():
        layer(torch.randn(1, 8))  # one row: MKL's matrix-vector product is the faster one
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(rows).dtype == torch.bfloat16  # autocast keeps its say
        use_kernels(layer, Kernels(onednn_linear=False))
        layer(rows)
        assert onednn_calls == []
        use_kernels(layer, Kernels())
        layer(rows)
    with torch.no_grad():
        layer(rows)
    assert onednn_calls == [(6, 8), (6, 8)]


def test_linear_keeps_nn_linear_parameters_and_state_dict() -> None:
    plain, ours = torch.nn.Linear(8, 4), Linear(8, 4)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    with torch.inference_mode():
        x = torch.randn(7, 8)
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_model_trains_on_f_linear_and_decodes_on_the_policys_kernel(onednn_calls, encoder: str) -> None:
    """Training, in float32 or under autocast, never takes oneDNN; decoding does unless the policy says no."""
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(encoder)).train()
    images, tokens = torch.randn(3, 3, 48, 48), torch.randint(1, 40, (3, 5))
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(images, tokens)
        logits.float().sum().backward()
    assert onednn_calls == []
    model.eval()
    with torch.inference_mode():
        memory = model.encode(images).memory
        state = model.start(memory)
        on = [model.step(tokens[:, t], state)[0] for t in range(3)]
        assert onednn_calls  # 3 rows: every product of the step qualifies
        onednn_calls.clear()
        off_model = model.use_kernels(Kernels(onednn_linear=False))
        state = off_model.start(memory)
        off = [model.step(tokens[:, t], state)[0] for t in range(3)]
    assert off_model is model and onednn_calls == []
    torch.testing.assert_close(torch.stack(on), torch.stack(off), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The policy: a frozen value set by its owner, reaching every layer


def test_kernels_is_a_frozen_value_with_checked_words() -> None:
    kernels = Kernels()
    with pytest.raises(dataclasses.FrozenInstanceError):
        kernels.onednn_linear = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="attention must be one of"):
        Kernels(attention="flash")
    assert Kernels() == Kernels(onednn_linear=True, attention="auto")


def test_use_kernels_reaches_every_layer_and_only_that_model() -> None:
    model, other = CaptionModel(tiny_model_config("vit")), CaptionModel(tiny_model_config("cnn"))
    chosen = Kernels(onednn_linear=False, attention="explicit")
    model.use_kernels(chosen)
    holders = [m for m in model.modules() if isinstance(m, (Linear, MultiHeadAttention))]
    assert len(holders) > 10 and all(m.kernels is chosen for m in holders)
    assert model.kernels is chosen and model.decoder.head.kernels is chosen
    assert all(m.kernels == Kernels() for m in other.modules() if hasattr(m, "kernels"))  # no shared switch


# ------------------------------------------------------------------------------------------------
# Attention path


def test_auto_attention_is_explicit_where_it_is_faster() -> None:
    def q(B: int, Tq: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
        return torch.zeros(B, 4, Tq, 8, dtype=dtype, requires_grad=grad)

    auto = Kernels()

    def explicit(q: torch.Tensor) -> bool:
        return not auto.fused_attention(q, score="scaled_dot", need_weights=False)

    assert explicit(q(1, 1, torch.bfloat16)) and explicit(q(32, 20, torch.bfloat16, True))  # SDPA's slow CPU bf16
    assert explicit(q(16, 1)) and explicit(q(16, 4))  # float32 inference: many rows, few queries
    assert not explicit(q(1, 1)) and not explicit(q(16, 12))  # few rows; a whole prefix
    assert not explicit(q(16, 1, grad=True))  # training keeps SDPA in float32
    assert not auto.fused_attention(q(1, 1), score="scaled_dot", need_weights=True)  # SDPA returns no weights
    assert not auto.fused_attention(q(1, 1), score="general", need_weights=False)  # nor other scores
    assert not Kernels(attention="explicit").fused_attention(q(1, 1), score="dot", need_weights=False)
    assert Kernels(attention="fused").fused_attention(q(16, 1, torch.bfloat16), score="dot", need_weights=False)
    assert not Kernels(attention="fused").fused_attention(q(1, 1), score="additive", need_weights=False)


# (images, beams per image, SDPA calls per decoding step under `auto`) for the tiny model (2 heads, 1 layer:
# one self- and one cross-attention per step). 32 and 64 images are the default batches of `caption` and
# `evaluate`; with 3 beams the cross-attention rows of an image share its keys and values (3 queries each).
CACHED_STEP_CASES = [
    (3, 1, 2),  # 6 rows x heads: both fused
    (32, 1, 0),  # 64 rows x heads: both explicit
    (64, 1, 0),
    (3, 3, 2),  # 18 self-attention rows, 6 cross: both fused
    (16, 3, 1),  # 96 self-attention rows (explicit), 32 cross rows of 3 queries (fused)
    (32, 3, 0),
]


@pytest.mark.parametrize(("images", "beams", "auto_calls"), CACHED_STEP_CASES)
def test_cached_steps_take_the_policys_attention_path_and_match_the_full_pass(sdpa_calls, images: int, beams: int,
                                                                           auto_calls: int) -> None:
    """Every path a decoding step can take (fused, explicit, both in one step) reproduces the whole-prefix pass."""
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config("vit")).eval()
    rows = torch.arange(images).repeat_interleave(beams)  # image of each decoded row, beams adjacent
    tokens = torch.randint(4, 40, (images * beams, 5))
    with torch.inference_mode():
        memory = model.encode(torch.randn(images, 3, 48, 48)).memory
        want, _ = model.decode(memory[rows], tokens)  # (B, T, V): every row against its own copy of the memory
        for path, per_step in (("auto", auto_calls), ("fused", 2), ("explicit", 0)):
            model.use_kernels(Kernels(attention=path))
            state = model.start(memory)
            state.reorder(rows)
            sdpa_calls.clear()
            got = torch.stack([model.step(tokens[:, t], state)[0] for t in range(5)], dim=1)
            assert len(sdpa_calls) == 5 * per_step, path
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_attention_paths_give_the_auto_result(sdpa_calls, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=32, n_heads=4).eval().to(dtype)
    x = torch.randn(3, 6, 32, dtype=dtype)
    results = {}
    with torch.inference_mode():
        for path in ("auto", "fused", "explicit"):
            use_kernels(mha, Kernels(attention=path))
            sdpa_calls.clear()
            results[path] = mha(x, x, x, mask=causal_mask(6))[0].float()
            assert len(sdpa_calls) == {"auto": int(dtype == torch.float32), "fused": 1, "explicit": 0}[path]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results["fused"], results["auto"], rtol=tol, atol=tol)
    torch.testing.assert_close(results["explicit"], results["auto"], rtol=tol, atol=tol)
