"""The Transformer decoder: token embedding + positions, layers of masked self-attention, cross-attention
to the image memory and feed-forward, and an output layer tied to the embedding.

One code path, two uses: `forward` decodes whole prefixes under a causal mask (training), and with a
`DecoderState` continues sequences against KV caches; `start` + `step` are that cached forward one token
at a time, which inference reaches through `CaptionModel.begin` (a `Stepper`, models/graphs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from captioner.config import ModelConfig
from captioner.models.attention import FeedForward, KVCache, MultiHeadAttention, StaticKVCache, causal_mask
from captioner.models.positional import sinusoidal_1d


@dataclass
class DecoderState:
    """Incremental decoding state: each layer's self-attention cache and precomputed cross-attention K/V.

    The cross-attention K/V keep one row per image however many rows decode it (beams, samples): the
    rows of an image stay adjacent, and attention reads its K/V once for all of them rather than from
    copies (see MultiHeadAttention.forward).
    """

    self_caches: list[KVCache] | list[StaticKVCache]  # one row per decoded sequence
    cross_caches: list[KVCache]  # frozen: the image memory's K/V, computed once, one row per image
    position: int = 0  # absolute position of the next token (for its positional encoding)
    batch_size: int = 0  # rows being decoded (changes with reorder): a multiple of the images
    images: int = 0  # rows of the cross caches
    # Static caches (`start(capacity=...)`): the position again, as a (1,) tensor on the model's device that
    # the step itself advances, so a step captured in a CUDA graph finds it in the same memory every time.
    index: torch.Tensor | None = None

    def reorder(self, index: torch.Tensor) -> None:
        """Continue row r from old row index[r] (B',); rows may repeat but must stay with their own image.

        Images x beams: index = image * K + beam, so rows r and index[r] belong to the same image.
        """
        assert index.dim() == 1 and index.dtype == torch.long, f"index must be a 1-D LongTensor, got {index.shape}"
        rows = index.shape[0]
        assert rows % self.images == 0, f"{rows} rows cannot be split evenly over {self.images} images"
        old_per, new_per = self.batch_size // self.images, rows // self.images
        assert torch.equal(index // old_per, torch.arange(rows, device=index.device) // new_per), \
            "reorder may only move rows among the rows of their own image"
        assert self.index is None or rows == self.batch_size, "static caches keep their number of rows"
        for cache in self.self_caches:
            cache.reorder(index)
        self.batch_size = rows

    @property
    def capacity(self) -> int | None:
        """Positions a static state holds (None: the caches grow)."""
        return None if self.index is None else self.self_caches[0].k.shape[2]


class DecoderLayer(nn.Module):
    """Masked self-attention -> cross-attention to the memory -> feed-forward, each with residual + LayerNorm.

    Pre-LN (`norm_first`, the default) normalises each sublayer's input and keeps the residual stream
    untouched, which trains stably without warm-up tricks; post-LN normalises after each residual sum
    as in Vaswani et al.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, H = config.d_model, config.n_heads
        self.norm_first = config.norm_first
        self.self_attn = MultiHeadAttention(d_model=D, n_heads=H, dropout=config.attn_dropout)
        self.cross_attn = MultiHeadAttention(d_model=D, n_heads=H, dropout=config.attn_dropout,
                                             score=config.cross_score)
        self.ff = FeedForward(d_model=D, d_ff=config.d_ff, dropout=config.dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.dropout = nn.Dropout(config.dropout)

    def _input(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """A sublayer's input: normalised (pre-LN) or the residual stream as is (post-LN)."""
        return norm(x) if self.norm_first else x

    def _add(self, norm: nn.LayerNorm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual sum x + dropout(out), normalised after (post-LN) or left as is (pre-LN)."""
        x = x + self.dropout(out)
        return x if self.norm_first else norm(x)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, *, mask: torch.Tensor | None = None,
                self_cache: KVCache | None = None, cross_cache: KVCache | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D), memory (B, N, D) -> (x (B, T, D), cross-attention weights (B, H, T, N) | None).

        `mask` (broadcastable to (B, H, T, T)) is the self-attention mask; memory may be None when
        `cross_cache` holds its keys and values. With caches, x continues the cached sequences.
        """
        h = self._input(self.norm1, x)
        x = self._add(self.norm1, x, self.self_attn(h, h, h, mask=mask, cache=self_cache)[0])
        out, weights = self.cross_attn(self._input(self.norm2, x), memory, memory, cache=cross_cache,
                                       need_weights=need_weights)
        x = self._add(self.norm2, x, out)
        x = self._add(self.norm3, x, self.ff(self._input(self.norm3, x)))
        return x, weights


class TransformerDecoder(nn.Module):
    """Token embedding (x sqrt(D)) + sinusoidal positions -> DecoderLayers -> LayerNorm -> tied output layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D = config.d_model
        self.d_model = D
        self.embed = nn.Embedding(config.vocab_size, D, padding_idx=config.pad_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        # Pre-LN leaves the residual stream unnormalised, so it needs a final norm; post-LN already ends on one.
        self.norm = nn.LayerNorm(D) if config.norm_first else nn.Identity()
        # Tied output layer (Press & Wolf): the logit of word v is the similarity of the state to v's embedding.
        self.head = nn.Linear(D, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self._positions = torch.empty(0)  # sinusoidal_1d rows computed so far: a decoding step reads one

    def positions(self, offset: int, T: int, like: torch.Tensor) -> torch.Tensor:
        """Sinusoidal encodings (T, D) of positions offset .. offset+T-1, from a table that grows on demand."""
        end = offset + T
        table = self._positions
        if table.shape[0] < end or table.device != like.device:
            with torch.inference_mode(False):  # a plain tensor, even when first built while decoding
                table = sinusoidal_1d(max(end, 2 * table.shape[0], 64), self.d_model, device=like.device)
            self._positions = table
        return table[offset:end].to(like.dtype)

    def position_table(self, capacity: int, like: torch.Tensor) -> torch.Tensor:
        """The whole table, at least `capacity` rows on like's device: what a static step indexes."""
        self.positions(0, capacity, like)
        return self._positions

    def _embed(self, tokens: torch.Tensor, *, offset: int | torch.Tensor) -> torch.Tensor:
        """Token embeddings plus the positions from `offset` on (an int, or a static state's (1,) tensor)."""
        B, T = tokens.shape
        # x sqrt(D) as in Vaswani et al.: the tied embedding's rows stay small (they are also the output
        # layer), and the scaling lets the token signal keep up with the unit-scale positions.
        x = self.embed(tokens) * math.sqrt(self.d_model)  # (B, T, D)
        if isinstance(offset, torch.Tensor):  # a static step: the table was grown to capacity by `start`
            x = x + self._positions.index_select(0, offset).to(x.dtype)
        else:
            x = x + self.positions(offset, T, x)
        return self.dropout(x)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor | None, *, pad_mask: torch.Tensor | None = None,
                need_weights: bool = False,
                state: DecoderState | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (B, T), memory (M, N, D) -> logits (B, T, V), cross weights (L, B, H, T, N) | None.

        Without `state`: whole prefixes from position 0 under a causal mask. M = B, or fewer images each
        decoded by B / M adjacent rows (several captions of one image in training): the rows of an image
        share its memory's keys and values, computed once.
        With `state` (from `start`): the tokens continue the sequences at state.position, attending to
        the cached positions too; the cross caches hold the memory's K/V (memory may be None), and the
        state advances by T.
        """
        assert tokens.dtype == torch.long, f"tokens must be token ids (torch.long), got {tokens.dtype}"
        B, T = tokens.shape
        if state is None:
            assert memory is not None and memory.dim() == 3 and B % memory.shape[0] == 0, \
                f"memory must be (M, N, D) with M dividing B={B}, got {None if memory is None else tuple(memory.shape)}"
            mask = causal_mask(T, tokens.device)  # (T, T): position t sees 0..t
            self_caches = cross_caches = [None] * len(self.layers)
            offset = 0
        else:
            assert B == state.batch_size, \
                f"state holds {state.batch_size} rows but {B} were given (reorder the state?)"
            assert pad_mask is None, "a decoding state continues unpadded sequences: pass no pad_mask"
            self_caches, cross_caches = state.self_caches, state.cross_caches
            if state.index is not None:  # static caches: the slots up to this position, counted on the device
                assert T == 1, "static caches take one token per step"
                mask = torch.arange(state.capacity, device=tokens.device).view(1, -1) <= state.index  # (1, capacity)
                offset = state.index
            else:
                # One new token sees every cached position, all in its past: no mask. Several need the offset one.
                mask = None if T == 1 else causal_mask(T, tokens.device, past=state.position)  # (T, past + T)
                offset = state.position
        if pad_mask is not None:
            assert pad_mask.shape == (B, T) and pad_mask.dtype == torch.bool, \
                f"pad_mask must be bool {(B, T)} (True = padding), got {pad_mask.dtype} {tuple(pad_mask.shape)}"
            mask = mask & ~pad_mask[:, None, None, :]  # (B, 1, T, T): padding is never a key
        x = self._embed(tokens, offset=offset)  # (B, T, D)
        crosses = []
        for layer, self_cache, cross_cache in zip(self.layers, self_caches, cross_caches, strict=True):
            x, weights = layer(x, memory, mask=mask, self_cache=self_cache, cross_cache=cross_cache,
                               need_weights=need_weights)
            crosses.append(weights)
        if state is not None and state.index is None:
            state.position += T
        elif state is not None:  # static: on the device, in place, so a recorded or compiled step has no Python side
            state.index += T  # effect; the Stepper keeps state.position
        logits = self.head(self.norm(x))  # (B, T, V)
        return logits, (torch.stack(crosses) if need_weights else None)  # (L, B, H, T, N)

    def start(self, memory: torch.Tensor, *, per_image: int = 1, capacity: int | None = None) -> DecoderState:
        """A decoding state for memory (B, N, D): every layer's cross-attention K/V computed once, empty caches.

        per_image: rows decoded per image (beams, samples), adjacent. capacity: positions of fixed-size
        static self-attention caches (a CUDA graph's step needs them); None: caches that grow.
        """
        assert memory.dim() == 3 and memory.shape[-1] == self.d_model, \
            f"memory must be (B, N, D={self.d_model}), got {tuple(memory.shape)}"
        images = memory.shape[0]
        state = DecoderState(self_caches=[KVCache() for _ in self.layers],
                             cross_caches=[layer.cross_attn.precompute(memory) for layer in self.layers],
                             batch_size=images * per_image, images=images)
        if capacity is not None:
            self.position_table(capacity, memory)  # grown here once, not inside a recorded step
            state.index = torch.zeros(1, dtype=torch.long, device=memory.device)
            heads, d_head = self.layers[0].self_attn.n_heads, self.layers[0].self_attn.d_head
            state.self_caches = [StaticKVCache(state.batch_size, heads, capacity, d_head, position=state.index,
                                               dtype=memory.dtype, device=memory.device) for _ in self.layers]
        return state

    def step(self, tokens: torch.Tensor, state: DecoderState, *,
             need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per row: tokens (B,) -> (logits (B, V), cross weights (L, B, H, N) | None); state advances.

        `forward` with the state, for a prefix of one token.
        """
        assert not self.training, "step is for inference: train on whole prefixes (forward)"
        logits, cross = self(tokens[:, None], None, state=state, need_weights=need_weights)
        return logits[:, 0], (None if cross is None else cross[:, :, :, 0])  # (B, V), (L, B, H, N)
