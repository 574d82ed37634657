"""Attention and positions: scores vs slow references, masking, fused == explicit, parity with
torch.nn.MultiheadAttention, KV caches, and property tests over random shapes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captioner.models.attention import (
    KVCache,
    MultiHeadAttention,
    Score,
    causal_mask,
    masked_softmax,
    padding_mask,
    score,
)
from captioner.models.kernels import Kernels, use_kernels
from captioner.models.positional import sinusoidal_1d, sinusoidal_2d

SCORE_NAMES = ["dot", "scaled_dot", "general", "additive"]


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values, so no test passes thanks to a special init (identity, zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


# ------------------------------------------------------------------------------------------------
# Slow references, written independently of the module: loops over every (batch, head, query, key)


def _reference_score(name: str, q: torch.Tensor, k: torch.Tensor, module: Score) -> torch.Tensor:
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    out = torch.zeros(B, H, Tq, Tk, dtype=torch.float64)
    q, k = q.double(), k.double()
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                for j in range(Tk):
                    qi, kj = q[b, h, i], k[b, h, j]
                    if name == "dot":
                        s = (qi * kj).sum()
                    elif name == "scaled_dot":
                        s = (qi * kj).sum() / math.sqrt(q.shape[-1])
                    elif name == "general":
                        W = module.weight[h].double()  # (Dq, Dk)
                        s = sum(qi[a] * W[a, c] * kj[c] for a in range(W.shape[0]) for c in range(W.shape[1]))
                    else:
                        hidden = torch.tanh(qi @ module.w_q[h].double() + kj @ module.w_k[h].double())
                        s = (module.w[h].double() * hidden).sum()
                    out[b, h, i, j] = s
    return out


def _reference_mha(mha: MultiHeadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention by einsum in float64 from the module's parameters; keep broadcasts to (B,H,Tq,Tk)."""
    H = mha.n_heads
    lin = {n: (getattr(mha, n).weight.double(), getattr(mha, n).bias.double()) for n in ("to_q", "to_kv", "to_out")}
    W_kv, b_kv = lin.pop("to_kv")
    D = W_kv.shape[0] // 2
    lin["to_k"], lin["to_v"] = (W_kv[:D], b_kv[:D]), (W_kv[D:], b_kv[D:])  # rows :D are W_K, rows D: are W_V

    def heads(x: torch.Tensor, name: str) -> torch.Tensor:
        W, b = lin[name]
        y = torch.einsum("btc,dc->btd", x.double(), W) + b
        return y.view(y.shape[0], y.shape[1], H, -1).permute(0, 2, 1, 3)  # (B, H, T, Dh)

    q, k, v = heads(query, "to_q"), heads(key, "to_k"), heads(value, "to_v")
    name = mha.score.name
    if name in ("dot", "scaled_dot"):
        s = torch.einsum("bhid,bhjd->bhij", q, k) / (math.sqrt(q.shape[-1]) if name == "scaled_dot" else 1.0)
    elif name == "general":
        s = torch.einsum("bhid,hde,bhje->bhij", q, mha.score.weight.double(), k)
    else:
        hidden = torch.tanh(torch.einsum("bhid,hda->bhia", q, mha.score.w_q.double())[:, :, :, None]
                            + torch.einsum("bhjd,hda->bhja", k, mha.score.w_k.double())[:, :, None])
        s = torch.einsum("bhija,ha->bhij", hidden, mha.score.w.double())
    if keep is None:
        weights = s.softmax(-1)
    else:
        keep = keep.expand_as(s)
        e = torch.where(keep, torch.exp(s - s.masked_fill(~keep, -1e300).amax(-1, keepdim=True)), 0.0)
        total = e.sum(-1, keepdim=True)
        weights = torch.where(total > 0, e / total.clamp_min(1e-300), 0.0)  # no key -> zero weights
    out = torch.einsum("bhij,bhjd->bhid", weights, v)
    out = out.permute(0, 2, 1, 3).reshape(query.shape[0], query.shape[1], -1)
    W, b = lin["to_out"]
    return out @ W.T + b, weights


# ------------------------------------------------------------------------------------------------
# Scoring functions


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_score_matches_slow_reference(name: str) -> None:
    torch.manual_seed(0)
    d_q, d_k = (5, 3) if name in ("general", "additive") else (4, 4)  # different widths where allowed
    module = _randomise(Score(name, n_heads=2, d_q=d_q, d_k=d_k))
    q, k = torch.randn(2, 2, 3, d_q), torch.randn(2, 2, 4, d_k)
    got = module(q, k)
    assert got.shape == (2, 2, 3, 4)
    torch.testing.assert_close(got.double(), _reference_score(name, q, k, module), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(name, q, k, module=module), got)


def test_score_errors_are_clear() -> None:
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="Score module"):
        score("general", q, q)
    with pytest.raises(ValueError, match="score must be one of"):
        Score("cosine", n_heads=1, d_q=4, d_k=4)


def test_general_score_starts_as_scaled_dot() -> None:
    module = Score("general", n_heads=2, d_q=8, d_k=8)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(module(q, k), score("scaled_dot", q, k))


# ------------------------------------------------------------------------------------------------
# Masks and masked softmax


def test_causal_mask() -> None:
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert torch.equal(m, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    # With 2 cached positions, query i sees keys 0 .. 2 + i.
    assert torch.equal(causal_mask(2, past=2), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))


def test_masked_softmax_zero_weight_and_zero_gradient() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 5, requires_grad=True)
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    weights = masked_softmax(scores, keep)
    assert torch.all(weights[~keep] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.tensor([1.0, 1.0, 0.0]))  # an empty row is all zeros
    # Same as a softmax over the kept entries only.
    torch.testing.assert_close(weights[0, [0, 1, 3]], scores[0, [0, 1, 3]].softmax(-1))
    (weights * torch.randn(3, 5)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.all(scores.grad[~keep] == 0)
    assert scores.grad[0, keep[0]].abs().sum() > 0


def test_masked_softmax_takes_valid_lengths() -> None:
    scores = torch.randn(3, 2, 4, 6)  # (B, H, Tq, Tk)
    lengths = torch.tensor([6, 2, 0])
    keep = padding_mask(lengths, 6)[:, None, None, :]  # (B, 1, 1, Tk)
    torch.testing.assert_close(masked_softmax(scores, lengths), masked_softmax(scores, keep))
    assert torch.all(masked_softmax(scores, lengths)[2] == 0)


def test_masked_softmax_half_precision_has_no_nan() -> None:
    scores = torch.randn(2, 4, dtype=torch.bfloat16)
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    weights = masked_softmax(scores, keep)
    assert not weights.isnan().any() and torch.all(weights[~keep] == 0)


# ------------------------------------------------------------------------------------------------
# MultiHeadAttention


def _masks(B: int, Tq: int, Tk: int) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, Tk + 1, (B,), generator=g)
    lengths[0] = 0  # one row with no key at all
    return {
        "none": None,
        "causal": causal_mask(Tq, past=Tk - Tq),
        "padding": padding_mask(lengths, Tk)[:, None, None, :],
        "random": torch.rand(B, 1, Tq, Tk, generator=g) > 0.5,
    }


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "random"])
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_mha_matches_reference_and_fused_equals_explicit(name: str, mask_kind: str) -> None:
    torch.manual_seed(0)
    B, Tq, Tk, D, d_kv = 3, 4, 6, 16, 12
    mha = _randomise(MultiHeadAttention(d_model=D, n_heads=4, score=name, d_kv=d_kv)).eval()
    query, memory = torch.randn(B, Tq, D), torch.randn(B, Tk, d_kv)
    mask = _masks(B, Tq, Tk)[mask_kind]
    explicit, weights = mha(query, memory, memory, mask=mask, need_weights=True)
    fast, none = mha(query, memory, memory, mask=mask)  # fused SDPA for dot / scaled_dot
    assert none is None and weights.shape == (B, 4, Tq, Tk)
    ref_out, ref_weights = _reference_mha(mha, query, memory, memory, mask)
    torch.testing.assert_close(weights.double(), ref_weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(explicit.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    assert not fast.isnan().any()


def test_bf16_on_cpu_gives_the_float32_result_on_either_path(monkeypatch) -> None:
    """Under CPU bf16 autocast, training and inference, the fused and the explicit path match float32."""
    torch.manual_seed(0)
    B, T, D = 4, 6, 32
    mha = MultiHeadAttention(d_model=D, n_heads=4)  # default init: softmaxes of moderate sharpness, as in training
    query = torch.randn(B, T, D)
    mask = causal_mask(T)

    def out_and_grad(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = query.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out, _ = mha(x, x, x, mask=mask)
        out.float().square().sum().backward()
        return out.float(), x.grad

    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    out, grad = out_and_grad(torch.float32)  # the reference: float32 on the fused path
    for path, sdpa in (("fused", 2), ("explicit", 0)):
        use_kernels(mha, Kernels(attention=path))
        calls.clear()
        bf16_out, bf16_grad = out_and_grad(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            inference, _ = mha(query, query, query, mask=mask)
        assert len(calls) == sdpa and inference.dtype == torch.bfloat16, path
        # Same results up to bf16 rounding (~3 significant digits), compared as relative norms.
        for ours, reference in ((bf16_out, out), (inference.float(), out), (bf16_grad, grad)):
            assert (ours - reference).norm() / reference.norm() < 2e-2, path


def test_float32_inference_takes_sdpa_at_every_row_count(monkeypatch) -> None:
    """Decoding steps of one row or many, a few queries or a whole prefix: SDPA, matching the reference."""
    torch.manual_seed(0)
    mha = _randomise(MultiHeadAttention(d_model=32, n_heads=4)).eval()
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape[0]) or real_sdpa(*a, **k))
    with torch.inference_mode():
        for rows, queries in ((1, 1), (16, 1), (16, 3), (16, 12)):
            query, memory = torch.randn(rows, queries, 32), torch.randn(rows, 9, 32)
            out, _ = mha(query, memory, memory)
            _, weights = mha(query, memory, memory, need_weights=True)  # explicit reference
            reference = _reference_mha(mha, query, memory, memory, None)[0]
            torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-4)
    assert calls == [1, 16, 16, 16]  # no shape sends float32 to the explicit path unless weights are asked


def _copy_into_torch_mha(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        D = ours.to_q.weight.shape[0]
        w_k, w_v = ours.to_kv.weight[:D], ours.to_kv.weight[D:]
        if theirs._qkv_same_embed_dim:
            theirs.in_proj_weight.copy_(torch.cat([ours.to_q.weight, w_k, w_v]))
        else:
            theirs.q_proj_weight.copy_(ours.to_q.weight)
            theirs.k_proj_weight.copy_(w_k)
            theirs.v_proj_weight.copy_(w_v)
        theirs.in_proj_bias.copy_(torch.cat([ours.to_q.bias, ours.to_kv.bias]))
        theirs.out_proj.weight.copy_(ours.to_out.weight)
        theirs.out_proj.bias.copy_(ours.to_out.bias)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_mha_equals_torch_multihead_attention(kind: str) -> None:
    torch.manual_seed(0)
    B, T, N, D, H = 3, 5, 7, 16, 4
    d_kv = D if kind == "self" else 10
    ours = _randomise(MultiHeadAttention(d_model=D, n_heads=H, d_kv=d_kv)).eval()
    theirs = nn.MultiheadAttention(D, H, batch_first=True, kdim=d_kv, vdim=d_kv).eval()
    _copy_into_torch_mha(ours, theirs)
    x = torch.randn(B, T, D)
    kv = x if kind == "self" else torch.randn(B, N, d_kv)
    Tk = kv.shape[1]
    key_padding = torch.zeros(B, Tk, dtype=torch.bool)
    key_padding[1, -2:] = True  # torch's convention: True = ignore
    key_padding[2, -1:] = True
    attn_mask = None
    keep = ~key_padding[:, None, None, :]  # ours: True = attend
    if kind == "self":
        attn_mask = ~causal_mask(T)  # torch: True = not allowed
        keep = keep & causal_mask(T)
    want, want_w = theirs(x, kv, kv, key_padding_mask=key_padding, attn_mask=attn_mask, need_weights=True,
                          average_attn_weights=False)
    got, got_w = ours(x, kv, kv, mask=keep, need_weights=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
    fused, _ = ours(x, kv, kv, mask=keep)
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
def test_masked_keys_get_zero_gradient_and_empty_rows_no_nan(need_weights: bool) -> None:
    torch.manual_seed(0)
    mha = _randomise(MultiHeadAttention(d_model=8, n_heads=2))
    query = torch.randn(2, 3, 8, requires_grad=True)
    memory = torch.randn(2, 5, 8, requires_grad=True)
    keep = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)[:, None, None, :]  # row 1: no key
    out, _ = mha(query, memory, memory, mask=keep, need_weights=need_weights)
    assert torch.isfinite(out).all()
    # A query with nothing to attend to gets a zero mix of values: only W_O's bias remains.
    torch.testing.assert_close(out[1], mha.to_out.bias.expand(3, 8))
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(memory.grad).all() and torch.isfinite(query.grad).all()
    assert torch.all(memory.grad[0, 3:] == 0) and torch.all(memory.grad[1] == 0)
    assert memory.grad[0, :3].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in mha.parameters())


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=8, n_heads=2, dropout=0.5)
    x = torch.randn(2, 6, 8)
    a, _ = mha.eval()(x, x, x)
    b, _ = mha(x, x, x)
    torch.testing.assert_close(a, b)
    c, _ = mha.train()(x, x, x)
    assert not torch.allclose(a, c)


# ------------------------------------------------------------------------------------------------
# Caches


@pytest.mark.parametrize("preallocate", [True, False])
def test_self_attention_steps_with_cache_equal_one_causal_pass(preallocate: bool) -> None:
    torch.manual_seed(0)
    B, T, D = 2, 40, 16  # more than the first capacity, so the cache also grows once
    mha = _randomise(MultiHeadAttention(d_model=D, n_heads=4)).eval()
    x = torch.randn(B, T, D)
    full, _ = mha(x, x, x, mask=causal_mask(T))
    cache = KVCache(preallocate=preallocate)
    with torch.no_grad():
        steps = [mha(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache)[0] for t in range(T)]
    assert cache.length == T and cache.k.shape == (B, 4, T, 4)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # A chunk of several new tokens after a cached prefix needs the offset causal mask.
    cache = KVCache(preallocate=preallocate)
    with torch.no_grad():
        head, _ = mha(x[:, :30], x[:, :30], x[:, :30], mask=causal_mask(30), cache=cache)
        tail, _ = mha(x[:, 30:], x[:, 30:], x[:, 30:], mask=causal_mask(T - 30, past=30), cache=cache)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_under_autograd_keeps_gradients_right() -> None:
    torch.manual_seed(0)
    mha = _randomise(MultiHeadAttention(d_model=8, n_heads=2))
    x = torch.randn(2, 5, 8, requires_grad=True)
    full, _ = mha(x, x, x, mask=causal_mask(5))
    (full.sum()).backward()
    want = x.grad.clone()
    x.grad = None
    cache = KVCache()
    steps = torch.cat([mha(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache)[0] for t in range(5)], 1)
    steps.sum().backward()
    torch.testing.assert_close(x.grad, want, atol=1e-5, rtol=1e-5)


def test_cross_attention_precompute_and_reorder() -> None:
    torch.manual_seed(0)
    mha = _randomise(MultiHeadAttention(d_model=16, n_heads=4, d_kv=12, score="additive")).eval()
    memory, query = torch.randn(3, 7, 12), torch.randn(3, 1, 16)
    cache = mha.precompute(memory)
    direct, w1 = mha(query, memory, memory, need_weights=True)
    cached, w2 = mha(query, None, None, cache=cache, need_weights=True)
    torch.testing.assert_close(cached, direct)
    torch.testing.assert_close(w2, w1)
    # Expanding images x beams: rows may repeat.
    index = torch.tensor([2, 2, 0, 1, 1, 1])
    cache.reorder(index)
    again, _ = mha(query[index], None, None, cache=cache)
    torch.testing.assert_close(again, direct[index])
    with pytest.raises(AssertionError, match="nothing to append"):
        cache.append(cache.k, cache.v)


def test_self_cache_reorder_follows_rows() -> None:
    torch.manual_seed(0)
    mha = _randomise(MultiHeadAttention(d_model=8, n_heads=2)).eval()
    x = torch.randn(3, 4, 8)
    index = torch.tensor([1, 1, 0])
    cache, ref = KVCache(), KVCache()
    with torch.no_grad():
        for t in range(3):
            mha(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache)
            mha(x[index, t:t + 1], x[index, t:t + 1], x[index, t:t + 1], cache=ref)
        cache.reorder(index)
        a, _ = mha(x[index, 3:], x[index, 3:], x[index, 3:], cache=cache)
        b, _ = mha(x[index, 3:], x[index, 3:], x[index, 3:], cache=ref)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# Property tests over random shapes


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 3), Dh=st.integers(1, 6), Tq=st.integers(1, 5),
       Tk=st.integers(1, 6), d_kv=st.integers(1, 9), name=st.sampled_from(SCORE_NAMES),
       seed=st.integers(0, 2**16))
def test_property_mha_any_shape(B: int, H: int, Dh: int, Tq: int, Tk: int, d_kv: int, name: str,
                                seed: int) -> None:
    torch.manual_seed(seed)
    D = H * Dh
    mha = _randomise(MultiHeadAttention(d_model=D, n_heads=H, score=name, d_kv=d_kv), seed).eval()
    query, memory = torch.randn(B, Tq, D), torch.randn(B, Tk, d_kv)
    keep = padding_mask(torch.randint(0, Tk + 1, (B,)), Tk)[:, None, None, :]  # lengths 0..Tk
    out, weights = mha(query, memory, memory, mask=keep, need_weights=True)
    fast, _ = mha(query, memory, memory, mask=keep)
    assert out.shape == (B, Tq, D) and weights.shape == (B, H, Tq, Tk)
    assert torch.isfinite(out).all() and torch.isfinite(fast).all()
    sums = weights.sum(-1)  # 1 where any key is kept, 0 where none is
    torch.testing.assert_close(sums, keep.any(-1).float().expand_as(sums), atol=1e-5, rtol=0)
    ref_out, _ = _reference_mha(mha, query, memory, memory, keep)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast, out, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 12), H=st.integers(1, 3), Dh=st.integers(1, 5), split=st.integers(0, 11),
       seed=st.integers(0, 2**16))
def test_property_cache_steps_equal_causal_pass(T: int, H: int, Dh: int, split: int, seed: int) -> None:
    """A prefix in one causal chunk, then one token at a time, equals one causal pass."""
    torch.manual_seed(seed)
    mha = _randomise(MultiHeadAttention(d_model=H * Dh, n_heads=H), seed).eval()
    x = torch.randn(2, T, H * Dh)
    full, _ = mha(x, x, x, mask=causal_mask(T))
    split = min(split, T - 1)
    cache = KVCache()
    with torch.no_grad():
        parts = [mha(x[:, :split + 1], x[:, :split + 1], x[:, :split + 1], mask=causal_mask(split + 1),
                     cache=cache)[0]]
        parts += [mha(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache)[0] for t in range(split + 1, T)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Positions


def test_sinusoidal_1d_matches_formula_and_offset() -> None:
    T, D = 7, 6
    pe = sinusoidal_1d(T, D)
    for pos in range(T):
        for i in range(D // 2):
            angle = pos / 10000 ** (2 * i / D)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    torch.testing.assert_close(sinusoidal_1d(3, D, offset=4), pe[4:7])
    odd = sinusoidal_1d(5, 7)  # an odd width ends on one more sine column
    assert odd.shape == (5, 7)
    torch.testing.assert_close(odd[:, 6], torch.sin(torch.arange(5.0) / 10000 ** (6 / 7)))
    long = sinusoidal_1d(5000, 32, dtype=torch.float16)
    assert long.dtype == torch.float16 and torch.isfinite(long).all()
    assert torch.unique(long[:, :4].float(), dim=0).shape[0] > 4000  # positions stay distinguishable


def test_sinusoidal_2d_is_row_major_half_rows_half_columns() -> None:
    h, w, D = 3, 5, 8
    pe = sinusoidal_2d(h, w, D)
    rows, cols = sinusoidal_1d(h, D // 2), sinusoidal_1d(w, D // 2)
    assert pe.shape == (h * w, D)
    for r in range(h):
        for c in range(w):
            torch.testing.assert_close(pe[r * w + c, : D // 2], rows[r])
            torch.testing.assert_close(pe[r * w + c, D // 2:], cols[c])
    # Any grid: no table to run out of.
    assert sinusoidal_2d(40, 3, 16).shape == (120, 16)


def test_distinct_key_and_value_sequences_use_their_own_halves_of_w_kv() -> None:
    # K and V share one stacked matrix; when keys and values come from different tensors, each must
    # still be projected by its own half (rows :D for keys, rows D: for values).
    torch.manual_seed(0)
    mha = _randomise(MultiHeadAttention(d_model=8, n_heads=2, d_kv=6)).eval()
    query, key, value = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    out, weights = mha(query, key, value, need_weights=True)
    ref_out, ref_weights = _reference_mha(mha, query, key, value, None)
    torch.testing.assert_close(weights.double(), ref_weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    same, _ = mha(query, key, key)
    ref_same, _ = _reference_mha(mha, query, key, key, None)
    torch.testing.assert_close(same.double(), ref_same, atol=1e-4, rtol=1e-4)
