"""Decoding steps on fixed memory, replayed from CUDA graphs where there is a GPU.

A batch-1 decoding step of a 6-layer decoder launches ~100 small kernels, and on a GPU those launches,
not the arithmetic, set its speed. A CUDA graph records the launches once and replays them as one. A
replay reads and writes the memory it was recorded with, so a recorded step runs on a static state
(fixed-size caches, its position in a tensor: `TransformerDecoder.start(capacity=...)`), and each
decoding call copies its images' keys/values and its tokens into that memory.

`StepGraphs` keeps a model's recorded steps, one per shape, and reuses them from call to call. On the
CPU nothing is recorded: the same static states run eagerly, which is how the tests hold this path to the
growing-cache one, token for token.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from captioner.models.decoder import DecoderState, TransformerDecoder

WARMUP_STEPS = 2  # steps run before recording, on a side stream: cuBLAS and friends set up lazily
KEPT = 4  # recorded shapes kept per model; each holds its caches and the images' keys/values
# A static state's step: tokens (rows,), state -> (logits (rows, V), None); the state advances in place.
StepFn = Callable[[torch.Tensor, DecoderState], tuple[torch.Tensor, torch.Tensor | None]]


class Stepper:
    """One decoding call's steps (from `CaptionModel.begin`): `step(tokens)` advances every row by one token.

    With growing caches it is `decoder.step` on a fresh state. With a static state it copies the tokens
    into the state's own buffer and runs the step eagerly or replays its graph; the logits it returns then
    live in that memory too, so read them before the next step.
    """

    def __init__(self, decoder: TransformerDecoder, state: DecoderState, *, tokens: torch.Tensor | None = None,
                 graph: torch.cuda.CUDAGraph | None = None, logits: torch.Tensor | None = None,
                 run: StepFn | None = None) -> None:
        self.decoder, self.state = decoder, state
        self.tokens = tokens  # static states: the step's input buffer (rows,)
        self.graph, self.logits = graph, logits  # the recorded step and the memory it writes its logits to
        self.run = run or decoder.step  # a static state's step: eager, or under torch.compile

    def step(self, tokens: torch.Tensor, *,
             need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row (rows,) -> (logits (rows, V), cross weights (L, rows, H, N) | None)."""
        assert tokens.dim() == 1 and tokens.dtype == torch.long, \
            f"step takes one token id per row, a (rows,) torch.long tensor, got {tokens.dtype} {tuple(tokens.shape)}"
        if self.tokens is None:
            return self.decoder.step(tokens, self.state, need_weights=need_weights)
        assert not need_weights, "static steps return no attention weights: decode with growing caches"
        self.tokens.copy_(tokens)
        if self.graph is None:
            logits, _ = self.run(self.tokens, self.state)
        else:
            self.graph.replay()
            logits = self.logits
        self.state.position += 1  # the step advanced state.index on the device; the Python-side count follows
        return logits, None

    def reorder(self, index: torch.Tensor) -> None:
        """Continue row r from row index[r] (beam search's pruning)."""
        self.state.reorder(index)


class StepGraphs:
    """A model's static decoding states (and, on CUDA, their recorded steps), reused across calls of one shape.

    A recording reads the decoder's weights and position table where they lie, so the key holds their
    addresses: weights updated in place (an optimiser step) are read as they are, and weights moved or
    replaced (`.to(dtype)`, a new table) get a new recording. A copy of the model starts with none.
    """

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple, Stepper] = OrderedDict()
        self._compiled: StepFn | None = None  # the decoder's step under torch.compile, made on first use
        self._compile_failed = False  # then later shapes decode eagerly without trying (and warning) again

    def __deepcopy__(self, memo: dict) -> StepGraphs:
        return StepGraphs()  # recordings point at the original's memory

    def clear(self) -> None:
        self._kept.clear()

    def stepper(self, decoder: TransformerDecoder, memory: torch.Tensor, *, per_image: int, capacity: int,
                record: bool, compiled: bool = False) -> Stepper:
        """A static stepper for memory (B, N, D) at position 0, recorded as a CUDA graph when `record`, its step
        under torch.compile when `compiled` (compiled once per shape; the compiled code is cached on disk)."""
        key = _key(decoder, memory, per_image, capacity, record, compiled)
        kept = self._kept.get(key)
        if kept is None:
            state = decoder.start(memory, per_image=per_image, capacity=capacity)
            tokens = torch.zeros(state.batch_size, dtype=torch.long, device=memory.device)
            run = self._compiled_step(decoder, state, tokens) if compiled else decoder.step
            kept = _new(decoder, memory, state, tokens, run, record)
            self._kept[key] = kept
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(key)
            _restart(decoder, kept.state, memory)
        return kept

    def _compiled_step(self, decoder: TransformerDecoder, state: DecoderState, tokens: torch.Tensor) -> StepFn:
        """The step under torch.compile, compiled for this state's shape now (not inside a search); the eager
        step if it cannot be compiled (no C++ compiler, an op the compiler refuses)."""
        if self._compile_failed:
            return decoder.step
        if self._compiled is None:
            self._compiled = torch.compile(decoder.step, dynamic=False)  # shapes are fixed per state
        try:
            self._compiled(tokens, state)
            state.index.zero_()  # stay inside the capacity, however small, for a recording's warm-up
        except Exception as e:  # noqa: BLE001 (whatever the compiler raises: the same step, eager)
            warnings.warn(f"decoding without torch.compile: compiling the step failed ({type(e).__name__}: {e})",
                          stacklevel=3)
            self._compile_failed = True
            return decoder.step
        return self._compiled


def _key(decoder: TransformerDecoder, memory: torch.Tensor, per_image: int, capacity: int, record: bool,
         compiled: bool) -> tuple:
    autocast = (torch.is_autocast_enabled(memory.device.type), torch.get_autocast_dtype(memory.device.type)) \
        if memory.device.type in ("cuda", "cpu") else None
    addresses = tuple(p.data_ptr() for p in decoder.parameters())
    return (tuple(memory.shape), memory.dtype, memory.device, per_image, capacity, record, compiled, autocast,
            addresses, decoder.position_table(capacity, memory).data_ptr())


def _new(decoder: TransformerDecoder, memory: torch.Tensor, state: DecoderState, tokens: torch.Tensor, run: StepFn,
         record: bool) -> Stepper:
    """A stepper of a fresh static state whose step is `run`, recorded as a CUDA graph when `record`."""
    graph = logits = None
    if record:
        try:
            graph, logits = _record(run, state, tokens)
        except RuntimeError as e:  # an op this torch or driver cannot record: the same step, launched op by op
            warnings.warn(f"decoding without a CUDA graph: recording the step failed ({e})", stacklevel=3)
    _restart(decoder, state, memory)  # a compile's or a recording's warm-up steps wrote into the caches
    return Stepper(decoder, state, tokens=tokens, graph=graph, logits=logits, run=run)


def _restart(decoder: TransformerDecoder, state: DecoderState, memory: torch.Tensor) -> None:
    """Reuse a static state for new images of the same shape: their K/V into its memory, position 0."""
    for layer, cache in zip(decoder.layers, state.cross_caches, strict=True):
        k, v = layer.cross_attn.project_kv(memory, memory)
        cache.k.copy_(k)  # frozen caches hold whole tensors (no spare capacity): k is all of it
        cache.v.copy_(v)
    for cache in state.self_caches:
        cache.clear()
    state.index.zero_()
    state.position = 0


def _record(run: StepFn, state: DecoderState, tokens: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Record one step of `state` on `tokens` (the buffer later steps copy into); returns the graph and its logits."""
    with _no_cast_cache(tokens.device):
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                run(tokens, state)
                state.index.zero_()  # stay inside the capacity, however small
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, _ = run(tokens, state)
    return graph, logits


def _no_cast_cache(device: torch.device) -> AbstractContextManager:
    """Under autocast (SCST samples under it), the same autocast without its cache of cast weights.

    With the cache, the warm-up steps' casts would be reused while recording, so the graph would read
    those cast copies, which are freed when the autocast region ends, instead of casting the weights itself.
    """
    if not torch.is_autocast_enabled(device.type):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)
