"""Attention written from its formulas: four scoring functions, masked softmax, multi-head attention, KV caches.

Conventions of this module:
    score   the logit of query i for key j before the softmax; `Score` picks one of four ways to compute it.
    mask    bool, True = query may attend to key (the convention of F.scaled_dot_product_attention),
            broadcastable to the scores (B, H, Tq, Tk). `causal_mask` and `padding_mask` build the usual ones.
Decoder self-attention has Tq = Tk = T; cross-attention has Tk = N image regions.
Which path computes the attention (fused SDPA or explicit) is the `Kernels` switch's call (kernels.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import SCORES
from captioner.models.kernels import Kernels

# ----------------------------------------------------------------------------------------------------------
# Scoring functions: (..., Tq, Dq) queries and (..., Tk, Dk) keys -> (..., Tq, Tk) logits


def dot_score(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dot-product score (Luong et al. "dot"): q . k."""
    return q @ k.transpose(-2, -1)  # (..., Tq, Tk)


def scaled_dot_score(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product score (Vaswani et al.): q . k / sqrt(d).

    With unit-variance entries q . k has variance d; dividing by sqrt(d) keeps the logits at unit scale
    so the softmax does not saturate (and its gradient vanish) as heads get wider.
    """
    # Scaling q rather than the product is the same score and touches Dh instead of Tk numbers per query.
    return (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (..., Tq, Tk)


def general_score(q: torch.Tensor, k: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Luong et al.'s "general" (bilinear) score: q^T W k, one W per head.

    q (B, H, Tq, Dq), k (B, H, Tk, Dk), weight (H, Dq, Dk): queries and keys may differ in width.
    """
    return (q @ weight) @ k.transpose(-2, -1)  # (B, H, Tq, Dk) @ (B, H, Dk, Tk) -> (B, H, Tq, Tk)


def additive_score(q: torch.Tensor, k: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                   w: torch.Tensor) -> torch.Tensor:
    """Bahdanau et al.'s additive score: w^T tanh(W_q q + W_k k), one set of weights per head.

    q (B, H, Tq, Dq), k (B, H, Tk, Dk), w_q (H, Dq, A), w_k (H, Dk, A), w (H, A); A is the hidden width.
    Every (query, key) pair gets its own hidden vector, so this costs (B, H, Tq, Tk, A) memory.
    """
    H, A = w.shape
    hidden = torch.tanh((q @ w_q).unsqueeze(-2) + (k @ w_k).unsqueeze(-3))  # (B, H, Tq, 1, A) + (B, H, 1, Tk, A)
    return (hidden @ w.view(H, 1, A, 1)).squeeze(-1)  # (B, H, Tq, Tk, A) @ (H, 1, A, 1) -> (B, H, Tq, Tk)


class Score(nn.Module):
    """One scoring function chosen by name, holding its parameters (general: W; additive: W_q, W_k, w)."""

    def __init__(self, name: str, *, n_heads: int, d_q: int, d_k: int, d_attn: int | None = None) -> None:
        super().__init__()
        if name not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {name!r}")
        self.name = name
        if name == "general":
            self.weight = nn.Parameter(torch.empty(n_heads, d_q, d_k))
        elif name == "additive":
            d_attn = d_attn or d_k
            self.w_q = nn.Parameter(torch.empty(n_heads, d_q, d_attn))
            self.w_k = nn.Parameter(torch.empty(n_heads, d_k, d_attn))
            self.w = nn.Parameter(torch.empty(n_heads, d_attn))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """General starts as the scaled dot product (W = I / sqrt(d)); additive with unit-scale hidden units."""
        with torch.no_grad():
            if self.name == "general":
                H, d_q, d_k = self.weight.shape
                self.weight.copy_(torch.eye(d_q, d_k).expand(H, d_q, d_k) / math.sqrt(d_k))
            elif self.name == "additive":
                # W_q q + W_k k sums two unit-variance terms; 1/sqrt(2 d) keeps tanh out of saturation.
                nn.init.normal_(self.w_q, std=1.0 / math.sqrt(2 * self.w_q.shape[1]))
                nn.init.normal_(self.w_k, std=1.0 / math.sqrt(2 * self.w_k.shape[1]))
                nn.init.normal_(self.w, std=1.0 / math.sqrt(self.w.shape[1]))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Logits (B, H, Tq, Tk) for queries (B, H, Tq, Dq) and keys (B, H, Tk, Dk)."""
        return score(self.name, q, k, module=self)

    def extra_repr(self) -> str:
        return self.name


def score(name: str, q: torch.Tensor, k: torch.Tensor, *, module: Score | None = None) -> torch.Tensor:
    """Attention logits (..., Tq, Tk) of the named scoring function; `module` holds general/additive weights."""
    if name == "dot":
        return dot_score(q, k)
    if name == "scaled_dot":
        return scaled_dot_score(q, k)
    if name not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {name!r}")
    if module is None:
        raise ValueError(f"the {name!r} score has parameters: pass the Score module that holds them")
    if name == "general":
        return general_score(q, k, module.weight)
    return additive_score(q, k, module.w_q, module.w_k, module.w)


# ----------------------------------------------------------------------------------------------------------
# Masks and the masked softmax


def causal_mask(T: int, device: torch.device | str | None = None, *, past: int = 0) -> torch.Tensor:
    """Causal mask (T, past + T), True on and below the diagonal: query i sees keys up to past + i.

    `past` > 0 is for queries that continue a sequence whose first `past` keys sit in a cache.
    """
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Keep-mask (B, T) from valid lengths (B,): True for the first lengths[b] positions of row b."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis in which masked keys get exactly zero weight and zero gradient.

    `mask` is bool broadcastable to `scores` (True = keep), or integer valid lengths (B,) that keep the
    first lengths[b] keys of every row of batch item b, or None. A row with every key masked returns
    zeros, never NaN.
    """
    if mask is None:
        return scores.softmax(dim=-1)
    if mask.dtype != torch.bool:
        B, Tk = mask.shape[0], scores.shape[-1]
        mask = padding_mask(mask, Tk).view(B, *([1] * (scores.dim() - 2)), Tk)  # (B, 1, .., 1, Tk)
    # The dtype's lowest finite value, not -inf: a fully masked row then softmaxes to a harmless uniform
    # row (which the second fill zeroes) instead of NaN that would also poison every gradient. In a row
    # with any real key, exp(lowest - max) underflows to exactly 0.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1).masked_fill(~mask, 0.0)


# ----------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values (B, H, T, Dh) of one attention layer, kept across decoding steps.

    A self-attention cache starts empty and `append` adds the new positions at every step. A
    cross-attention cache is `frozen`: the image memory's K/V, computed once by
    `MultiHeadAttention.precompute` and read at every step.

    Growing caches preallocate capacity and write in place (doubling when full) rather than
    concatenating, which copies the whole prefix every step; benchmarks/bench_attention.py measures both.
    Under autograd they fall back to concatenation, since writing into a tensor that earlier steps
    saved for backward would invalidate it.
    """

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *, frozen: bool = False,
                 preallocate: bool = True) -> None:
        assert (k is None) == (v is None), "give both keys and values, or neither"
        assert not frozen or k is not None, "a frozen cache needs its keys and values"
        self._k, self._v = k, v  # storage (B, H, capacity, Dh); positions >= length are unused
        self.length = 0 if k is None else k.shape[2]
        self.frozen = frozen
        self.preallocate = preallocate

    @property
    def k(self) -> torch.Tensor | None:
        """Cached keys (B, H, length, Dh), or None while empty."""
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor | None:
        """Cached values (B, H, length, Dh), or None while empty."""
        return None if self._v is None else self._v[:, :, : self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new positions (B, H, t, Dh); return all keys and values so far (B, H, length, Dh)."""
        assert not self.frozen, "cross-attention K/V are fixed per image: nothing to append"
        assert k.shape == v.shape and k.dim() == 4, f"expected k, v (B, H, t, Dh), got {k.shape} {v.shape}"
        end = self.length + k.shape[2]
        tracked = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        if not self.preallocate or tracked:
            self._k = k if self.length == 0 else torch.cat([self.k, k], dim=2)  # (B, H, end, Dh)
            self._v = v if self.length == 0 else torch.cat([self.v, v], dim=2)
        else:
            if self._k is None or end > self._k.shape[2]:
                self._grow(k, v, capacity=max(2 * end, 32))  # captions rarely pass 32 tokens: one allocation
            self._k[:, :, self.length:end] = k
            self._v[:, :, self.length:end] = v
        self.length = end
        return self.k, self.v

    def _grow(self, k: torch.Tensor, v: torch.Tensor, *, capacity: int) -> None:
        B, H, _, Dh = k.shape
        new_k, new_v = k.new_empty(B, H, capacity, Dh), v.new_empty(B, H, capacity, v.shape[-1])
        if self.length:
            new_k[:, :, : self.length] = self.k
            new_v[:, :, : self.length] = self.v
        self._k, self._v = new_k, new_v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B',) of the batch, in that order; rows may repeat (beams of one image)."""
        if self._k is not None and self.length:
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)


class StaticKVCache:
    """A self-attention cache of fixed rows and capacity, written at a position held in a tensor.

    Every step then has the same shapes and reads and writes the same memory, which is what a CUDA
    graph needs to replay it (captioner/models/graphs.py). `append` returns all `capacity` slots: the
    decoder's mask hides the slots past `position`, and they start at zero, never NaN, because a zero
    attention weight times a NaN value would still be NaN.
    """

    frozen = False

    def __init__(self, rows: int, heads: int, capacity: int, d_head: int, *, position: torch.Tensor,
                 dtype: torch.dtype, device: torch.device) -> None:
        assert position.shape == (1,) and position.dtype == torch.long, "position must be a (1,) LongTensor"
        self.k = torch.zeros(rows, heads, capacity, d_head, dtype=dtype, device=device)  # (B, H, capacity, Dh)
        self.v = torch.zeros_like(self.k)
        self.position = position  # the slot the next key goes to; shared with the decoder state, which advances it

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new position (B, H, 1, Dh) at `position`; return every slot (B, H, capacity, Dh)."""
        assert k.shape[2] == 1, "a static cache takes one position per step"
        self.k.index_copy_(2, self.position, k)
        self.v.index_copy_(2, self.position, v)
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Rows `index` (B,) of the batch, in that order, written in place so the memory stays where it was."""
        assert index.shape[0] == self.k.shape[0], "a static cache keeps its number of rows"
        self.k.copy_(self.k.index_select(0, index))
        self.v.copy_(self.v.index_select(0, index))

    def clear(self) -> None:
        self.k.zero_()
        self.v.zero_()


# ----------------------------------------------------------------------------------------------------------
# Modules


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al.): per-head Q, K, V projections, heads in parallel, concat, W_O.

    Self- and cross-attention are this one module: keys and values may come from another sequence of
    another length and width `d_kv` (the image memory). Two paths give one result: fused
    F.scaled_dot_product_attention, or explicit scores -> masked softmax -> weighted sum, which can
    return per-head weights; the `kernels` switch picks one (kernels.py).
    """

    def __init__(self, *, d_model: int, n_heads: int, dropout: float = 0.0, score: str = "scaled_dot",
                 d_kv: int | None = None) -> None:
        super().__init__()
        assert d_model % n_heads == 0, f"d_model ({d_model}) must be divisible by n_heads ({n_heads})"
        d_kv = d_kv or d_model
        self.n_heads, self.d_head, self.dropout = n_heads, d_model // n_heads, dropout
        self.kernels = Kernels()  # the attention path's switch; `kernels.use_kernels` replaces it
        self.to_q = nn.Linear(d_model, d_model)
        # W_K and W_V stacked in one (2D, d_kv) matrix: keys and values are projections of the same sequence,
        # so one matrix product gives both (rows :D are W_K, rows D: are W_V).
        self.to_kv = nn.Linear(d_kv, 2 * d_model)
        self.score = Score(score, n_heads=n_heads, d_q=self.d_head, d_k=self.d_head)
        self.to_out = nn.Linear(d_model, d_model)  # W_O: mixes the concatenated heads back into D

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (B, H, Tk, Dh) = key W_K and values (B, H, Tk, Dh) = value W_V, in one product when key is value."""
        B, Tk, _ = key.shape
        if key is value:
            kv = self.to_kv(key).view(B, Tk, 2, self.n_heads, self.d_head)  # (B, Tk, 2, H, Dh)
            # unbind, not two selects: its backward stacks the two gradients in one copy, where each
            # select's backward would zero-fill a whole (B, Tk, 2, H, Dh) tensor and then add them.
            k, v = kv.unbind(2)
            return k.transpose(1, 2), v.transpose(1, 2)
        D = self.n_heads * self.d_head
        w, b = self.to_kv.weight, self.to_kv.bias  # keys and values of two sequences: each half on its own
        return self._split_heads(F.linear(key, w[:D], b[:D])), self._split_heads(F.linear(value, w[D:], b[D:]))

    def precompute(self, memory: torch.Tensor) -> KVCache:
        """Cross-attention keys and values of `memory` (B, N, d_kv), computed once per image and reused."""
        k, v = self.project_kv(memory, memory)  # (B, H, N, Dh), strided views of one (B, N, 2, H, Dh) product
        # Contiguous once here, or the explicit path's matrix products would copy them at every step.
        return KVCache(k.contiguous(), v.contiguous(), frozen=True)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None, *,
                mask: torch.Tensor | None = None, need_weights: bool = False,
                cache: KVCache | StaticKVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from query (B, Tq, D) to key/value (B, Tk, d_kv): (out (B, Tq, D), weights (B, H, Tq, Tk)|None).

        `mask` is bool broadcastable to (B, H, Tq, Tk), True = attend. With a growing `cache` the new
        keys/values are appended and the queries attend to everything cached (a decoding step); with a
        frozen cache (from `precompute`) key and value are ignored and may be None.
        """
        B, Tq, D = query.shape
        assert D == self.n_heads * self.d_head, f"query width {D} != d_model {self.n_heads * self.d_head}"
        assert mask is None or mask.dtype == torch.bool, f"mask must be bool (True = attend), got {mask.dtype}"
        q = self._split_heads(self.to_q(query))  # (B, H, Tq, Dh)
        if cache is not None and cache.frozen:
            k, v = cache.k, cache.v  # (B, H, N, Dh), computed once per image
        else:
            assert key is not None and value is not None, "key and value are needed unless a frozen cache has them"
            k, v = self.project_kv(key, value)  # (B, H, Tk, Dh)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, H, past + Tk, Dh)
        out, weights = self._attend(q, k, v, mask, need_weights)
        out = out.transpose(1, 2).reshape(B, Tq, D)  # (B, Tq, H*Dh): heads concatenated
        return self.to_out(out), weights

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, Tq, Dh) over k, v (Bk, H, Tk, Dh) with Bk dividing B -> (out (B, H, Tq, Dh), weights | None)."""
        B, _, Tq, _ = q.shape
        Bk = k.shape[0]
        assert B % Bk == 0, f"queries have batch {B} but keys/values have {Bk}"
        R = B // Bk
        if R > 1:
            # Rows that share one image's K/V (its beams or samples, adjacent): its R rows become R x Tq
            # queries of that one image, so the K/V are read once, never copied per row.
            assert mask is None, "a mask is not supported when rows share keys/values"
            q = q.view(Bk, R, self.n_heads, Tq, self.d_head).transpose(1, 2).reshape(Bk, self.n_heads, R * Tq, -1)

        weights = None
        if self.kernels.fused_attention(score=self.score.name, need_weights=need_weights):
            out = self._fused(q, k, v, mask)
        else:
            out, weights = self._explicit(q, k, v, mask)
        if R > 1:  # back to one row per query: (Bk, H, R*Tq, .) -> (B, H, Tq, .)
            def ungroup(t: torch.Tensor) -> torch.Tensor:
                return t.view(Bk, self.n_heads, R, Tq, -1).transpose(1, 2).reshape(B, self.n_heads, Tq, -1)

            out = ungroup(out)
            weights = None if weights is None else ungroup(weights)
        return out, (weights if need_weights else None)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        weights = masked_softmax(self.score(q, k), mask)  # (B, H, Tq, Tk)
        # Dropout acts on the weights that mix values; the returned weights are the undropped ones,
        # which sum to 1 and are what the overlays show.
        out = F.dropout(weights, p=self.dropout, training=self.training) @ v  # (B, H, Tq, Dh)
        return out, weights

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scale = 1.0 if self.score.name == "dot" else None  # None = SDPA's own 1/sqrt(Dh)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)  # (B, H, Tq, Dh)
        # What SDPA returns for a query with no key allowed depends on backend and version (NaN on
        # some). Let such rows attend to everything, then zero their output: the same result as
        # masked_softmax's all-zero weights, on every backend.
        empty = ~mask.any(dim=-1, keepdim=True)  # (.., Tq, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, dropout_p=dropout_p, scale=scale)
        return out.masked_fill(empty, 0.0)  # (B, H, Tq, Dh)


class FeedForward(nn.Module):
    """Position-wise feed-forward block of encoder and decoder layers: Linear -> GELU -> dropout -> Linear."""

    def __init__(self, *, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.to_hidden = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), each position on its own."""
        return self.to_out(self.dropout(F.gelu(self.to_hidden(x))))
