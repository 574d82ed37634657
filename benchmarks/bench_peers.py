"""captioner vs Hugging Face transformers' VisionEncoderDecoderModel, side by side, at two model sizes.

Sizes (`--size`, default both):
  matched    our ViT on 96 px images, 8 px patches, width 256, 4 encoder and 3 decoder layers, 4 heads,
             vocabulary 1000 (common.MATCHED), against ViTModel + GPT-2 of the same sizes;
  realistic  ViT-B/16 at 224 px (torchvision's body on our side, ViTModel of the ViT-B/16 config on the
             peer's) and a decoder of width 512, 6 layers, 8 heads, d_ff 2048, vocabulary 10,000
             (common.REALISTIC); VisionEncoderDecoderModel adds the 768 -> 512 projection itself.
Both sides have random weights and no dropout, and generate exactly 20 tokens (no <eos>), so the work is equal.

Rows of each size: decoding captions/s (greedy at batch 1 and 32, beam 3 at batch 32) and training images/s
(forward, loss, backward, AdamW; batch 32, or 8 for the realistic size on a CPU), at three precisions:
  fp32                both whole models in float32;
  bf16                the same split on both sides: whole models in bf16 for decoding, bf16 autocast for
                      training (only where bf16 is native, as `--precision auto` decides);
  default_vs_default  default vs default, NOT equal precision: ours as shipped (`--precision auto`: bf16
                      encoder + float32 decoder, bf16 autocast training) against the peer's float32.
In every row our runs and the peer's are called in turns (ours, peer, ours, peer, ...), the same number
each, and each side's fastest run counts: on a shared machine a burst of load then slows both alike.
On a busy CPU set CAPTIONER_BENCH_THREADS=1 (common.setup_threads): with 2 threads, one descheduled
OpenMP thread stalls every operator, and batch-1 figures swing tenfold.

And, per size: `ceilings` (our encoder + 20 steps of nothing but the decoder's matrix products, against the
peer's generate: the most any decoding loop could reach), `step_b1` (where our batch-1 greedy step's time
goes, from torch.profiler), `train_ceiling` (our training step's matrix products and attention alone,
against the peer's float32 step) and `cached_vs_naive` (30 tokens, batch 1).

Static decoding (`greedy(..., static=True)`: a preallocated KV cache, replayed from a CUDA graph on CUDA) is
timed where `captioner.decoding` has the keyword: against the growing cache (static=False) at batch-1 greedy
on the CPU, in every decoding row on CUDA; where it has not, those rows say "unavailable".

    pip install -e '.[bench]'
    python benchmarks/bench_peers.py [--size matched|realistic|both] [--device cpu|cuda] [--quick] [--out FILE]
    python benchmarks/bench_peers.py --markdown FILE   # a saved result's tables, as in the README

JSON goes to stdout (and to --out), a short table of the ratios to stderr. bash benchmarks/gpu_bench.sh
runs it on a GPU in one go.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reference.py: the naive decoding loop
from common import MATCHED, REALISTIC, TOKENS, machine, setup_threads, time_in_turns  # noqa: E402

from captioner.config import ModelConfig  # noqa: E402
from captioner.decoding import SearchOptions, beam_search, greedy  # noqa: E402
from captioner.models.captioner import CaptionModel  # noqa: E402
from captioner.runtime import precision_plan  # noqa: E402
from captioner.training import caption_loss  # noqa: E402
from tests.reference import naive_greedy  # noqa: E402

UNAVAILABLE = "unavailable"

# What each precision row runs: printed with the figures, so that no ratio is read without its precision.
PRECISIONS = {
    "fp32": "both whole models in float32",
    "default_vs_default": "default vs default, not equal precision: ours at --precision auto (bf16 encoder + "
                          "float32 decoder for decoding, bf16 autocast for training) against the peer's float32",
    "bf16": "equal precision in bf16: both whole models in bf16 for decoding, bf16 autocast for training",
}
CASES = {"b1_greedy": (1, 1), "b32_greedy": (32, 1), "b32_beam3": (32, 3)}  # decoding case: (batch, beam)
NAIVE_TOKENS = 30  # the cached-vs-naive target is stated at 30 tokens, batch 1
PROFILED_CAPTIONS = 3  # 20-token captions profiled for the batch-1 step's breakdown
PROFILED_TRAIN_STEPS = 2  # fp32 training steps profiled for the training ceiling (the faster one counts)


# ----------------------------------------------------------------------------------------------------------
# The two sizes, on both sides


@dataclass(frozen=True)
class Size:
    """One model size on both sides: our ModelConfig fields and the peer's ViTConfig / GPT2Config fields."""

    ours: dict[str, Any]
    peer_encoder: dict[str, Any]
    peer_decoder: dict[str, Any]
    train_batch: dict[str, int]  # device type -> training batch
    runs: dict[str, int]  # device type -> timed runs of every row (the same on both sides)

    @property
    def image_size(self) -> int:
        return self.ours["image_size"]

    @property
    def never(self) -> int:
        """An <eos> id outside the vocabulary: every caption runs its full length on our side."""
        return self.ours["vocab_size"] + 7


def gpt2_fields(ours: dict[str, Any]) -> dict[str, Any]:
    """GPT2Config fields of the decoder that our fields `ours` describe (GPT-2 learns its positions)."""
    return dict(vocab_size=ours["vocab_size"], n_embd=ours["d_model"], n_layer=ours["n_layers"],
                n_head=ours["n_heads"], n_inner=ours["d_ff"], resid_pdrop=ours["dropout"],
                embd_pdrop=ours["dropout"], attn_pdrop=ours["attn_dropout"])


def vit_fields(image_size: int, patch_size: int, hidden: int, layers: int, heads: int, mlp: int) -> dict[str, Any]:
    """ViTConfig fields of a ViT encoder (no dropout, as ours)."""
    return dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=mlp, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


SIZES = {
    "matched": Size(
        ours=MATCHED,
        peer_encoder=vit_fields(MATCHED["image_size"], MATCHED["patch_size"], MATCHED["d_model"],
                                MATCHED["enc_layers"], MATCHED["n_heads"], MATCHED["d_ff"]),
        peer_decoder=gpt2_fields(MATCHED), train_batch={"cpu": 32, "cuda": 32}, runs={"cpu": 5, "cuda": 10}),
    # ViT-B/16: the config torchvision's vit_b_16 builds on our side (hidden 768, 12 layers, 12 heads, MLP 3072).
    # A training step of it at batch 32 takes tens of seconds on a 2-core CPU: batch 8 there.
    "realistic": Size(
        ours=REALISTIC, peer_encoder=vit_fields(224, 16, 768, 12, 12, 3072), peer_decoder=gpt2_fields(REALISTIC),
        train_batch={"cpu": 8, "cuda": 32}, runs={"cpu": 3, "cuda": 10}),
}


def build_ours(size: Size, device: torch.device) -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel(ModelConfig(**size.ours)).to(device).eval()


def build_peer(size: Size, device: torch.device):
    """VisionEncoderDecoderModel: ViTModel (no pooling layer) + GPT-2 with cross-attention, same sizes."""
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

    decoder = GPT2Config(**size.peer_decoder, n_positions=64, add_cross_attention=True, is_decoder=True,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(encoder=ViTModel(ViTConfig(**size.peer_encoder), add_pooling_layer=False),
                                      decoder=GPT2LMHeadModel(decoder))
    model.config.decoder_start_token_id = 1
    model.config.pad_token_id = 0
    model.config.eos_token_id = None  # no <eos>: every caption runs the full 20 tokens, as ours do
    model.generation_config.eos_token_id = None
    return model.to(device).eval()


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once


# ----------------------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Bench:
    """Where and how much to time. Both sides of a row get the same number of runs."""

    device: torch.device
    runs: int  # timed runs of each decoding and training row
    warmup: int  # untimed runs first (CUDA graphs are captured, caches filled)
    detail_runs: int  # timed runs of our own short measurements (a 20-step loop, a step's products)

    @classmethod
    def for_size(cls, size: Size, device: torch.device, *, quick: bool = False) -> Bench:
        if quick:
            return cls(device, runs=1, warmup=1, detail_runs=2)
        return cls(device, runs=size.runs[device.type], warmup=3 if device.type == "cuda" else 1, detail_runs=20)

    def turns(self, fns: dict[str, Callable[[], object]], *, runs: int | None = None) -> dict[str, float]:
        """Fastest seconds of each of `fns`, called in turns, the same number of runs each (common.time_in_turns);
        every timed run waits for the GPU's queued work."""
        return time_in_turns(fns, repeat=runs or self.runs, warmup=self.warmup, sync=self.sync)

    def time(self, fn: Callable[[], object], *, runs: int | None = None) -> float:
        return self.turns({"fn": fn}, runs=runs)["fn"]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def images(self, size: Size, batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, size.image_size, size.image_size, device=self.device)

    @property
    def precisions(self) -> list[str]:
        return precision_rows(self.device)


def auto_plan(device: torch.device):
    return precision_plan("auto", device)


def precision_rows(device: torch.device) -> list[str]:
    """fp32 always; bf16 and the defaults where --precision auto picks bf16 (where it is native)."""
    return ["fp32"] if auto_plan(device).dtype == torch.float32 else list(PRECISIONS)


def dtypes(precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(encoder, decoder) dtypes of our model at inference in a precision row."""
    if precision == "default_vs_default":
        plan = auto_plan(device)
        return plan.encoder, plan.decoder  # what Captioner.load does: bf16 encoder, float32 decoder
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return dtype, dtype


def set_ours(model: CaptionModel, encoder: torch.dtype, decoder: torch.dtype) -> None:
    # Weights round-trip through bf16 between rows: they are random anyway, and the time does not change.
    model.encoder.to(encoder)
    model.decoder.to(decoder)


def peer_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32  # the peer's default is float32


# ----------------------------------------------------------------------------------------------------------
# Decoding rows


def our_variants(device: torch.device, case: str) -> dict[str, bool | None]:
    """Our decoding rows of one case: row name -> the `static` argument (None: the call without it, which is
    the growing cache, what the CPU uses by default)."""
    if device.type == "cuda":  # the static cache's CUDA graph against the growing cache, in every case
        return {"ours_static": True, "ours_dynamic": False}
    if case == "b1_greedy":  # on the CPU the static path runs eagerly; batch 1 is where per-step costs show
        return {"ours": None, "ours_static": True, "ours_dynamic": False}
    return {"ours": None}


def our_search(beam: int, static: bool | None) -> Callable[..., object] | None:
    """greedy (beam 1) or beam_search, given `static` only if decoding takes it; None if static=True cannot run.

    The `static` keyword is new; older trees (and this script on them) decode with the growing cache only,
    so static=False there is simply the call without the keyword.
    """
    search = greedy if beam == 1 else beam_search
    kwargs: dict[str, Any] = {} if beam == 1 else {"beam": beam}
    if static is not None:
        if "static" in inspect.signature(search).parameters:
            kwargs["static"] = static
        elif static:
            return None
    return functools.partial(search, **kwargs)


def probe(search: Callable[..., object] | None, model: CaptionModel, images: torch.Tensor,
          opts: SearchOptions) -> str | None:
    """Why one of our searches cannot run here, or None. Only a static search may fail: it is new, and a
    path may not support every case yet; the search that has always worked must fail loudly."""
    if search is None:
        return f"{UNAVAILABLE}: captioner.decoding has no static keyword"
    if search.keywords.get("static") is not True:
        return None
    try:
        search(model, images, opts)
    except (NotImplementedError, RuntimeError, ValueError) as error:
        return f"{UNAVAILABLE}: {type(error).__name__}: {error}"
    return None


def peer_generate(peer, images: torch.Tensor, beam: int) -> Callable[[], object]:
    def generate() -> object:
        with torch.inference_mode():
            return peer.generate(pixel_values=images, max_new_tokens=TOKENS, min_new_tokens=TOKENS, num_beams=beam,
                                 do_sample=False)
    return generate


def decode_row(size: Size, ours: CaptionModel, peer, bench: Bench, case: str, precision: str) -> dict[str, Any]:
    """Captions/s of one case at one precision: our rows and the peer's, timed in turns."""
    batch, beam = CASES[case]
    images = bench.images(size, batch)
    opts = SearchOptions(bos_id=1, eos_id=size.never, max_len=TOKENS)
    set_ours(ours, *dtypes(precision, bench.device))
    row: dict[str, Any] = {}
    fns: dict[str, Callable[[], object]] = {}
    for name, static in our_variants(bench.device, case).items():
        search = our_search(beam, static)
        row[name] = probe(search, ours, images, opts)
        if row[name] is None:
            fns[name] = functools.partial(search, ours, images, opts)
    if peer is not None:
        dtype = peer_dtype(precision)
        peer.to(dtype)
        fns["peer"] = peer_generate(peer, images.to(dtype), beam)
    row.update({name: batch / seconds for name, seconds in bench.turns(fns).items()})
    return row


def decode_rows(size: Size, ours: CaptionModel, peer, bench: Bench) -> dict[str, dict[str, dict[str, Any]]]:
    """Captions/s as {case: {precision: {row: rate}}}.

    The default_vs_default row times our default against the peer's default (float32) once more, in turns.
    """
    rows = {case: {precision: decode_row(size, ours, peer, bench, case, precision) for precision in bench.precisions}
            for case in CASES}
    set_ours(ours, torch.float32, torch.float32)
    if peer is not None:
        peer.to(torch.float32)
    return rows


def ratios(rows: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """ours / peer for every row that has both figures, same shape as `rows` (captions/s or images/s)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for case, by_precision in rows.items():
        for precision, row in by_precision.items():
            peer = row.get("peer")
            for name, rate in row.items():
                if name != "peer" and isinstance(rate, float) and isinstance(peer, float):
                    out.setdefault(case, {}).setdefault(precision, {})[name] = rate / peer
    return out


def static_vs_dynamic(rows: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Speed-up of the static cache over the growing one, wherever both ran."""
    out: dict[str, dict[str, float]] = {}
    for case, by_precision in rows.items():
        for precision, row in by_precision.items():
            static, dynamic = row.get("ours_static"), row.get("ours_dynamic")
            if isinstance(static, float) and isinstance(dynamic, float):
                out.setdefault(case, {})[precision] = static / dynamic
    return out


# ----------------------------------------------------------------------------------------------------------
# How far decoding could go: the matrix products alone


def decoder_products(model: CaptionModel, rows: int) -> Callable[[], None]:
    """One decoding step's matrix products alone (7 a layer, and the output layer), with the model's own weights.

    No attention, norm, head split, cache write or Python: the least work a step of this decoder can do,
    in the decoder's dtype, on F.linear as the model's layers run them.
    """
    mats = [m for layer in model.decoder.layers for m in (
        layer.self_attn.to_q, layer.self_attn.to_kv, layer.self_attn.to_out, layer.cross_attn.to_q,
        layer.cross_attn.to_out, layer.ff.to_hidden, layer.ff.to_out)] + [model.decoder.head]
    weight = model.decoder.head.weight
    inputs = {m.in_features: torch.randn(rows, m.in_features, device=weight.device, dtype=weight.dtype) for m in mats}
    @torch.inference_mode()  # as in decoding
    def step() -> None:
        for m in mats:
            F.linear(inputs[m.in_features], m.weight, m.bias)
    return step


def ceilings(size: Size, ours: CaptionModel, peer, rows: dict, bench: Bench) -> dict[str, dict[str, Any]]:
    """Greedy at batch 1 and 32: our floor (encoder + 20 steps of the decoder's products alone) per precision,
    and the ratio the peer's measured generate over that floor: no decoding loop around these weights on
    this machine could beat the peer by more. `peer_encoder_share`: the peer's fp32 time in its encoder."""
    out: dict[str, dict[str, Any]] = {}
    for batch in (1, 32):
        images = bench.images(size, batch)
        encode: dict[torch.dtype, float] = {}
        products: dict[torch.dtype, float] = {}
        entry = out[f"b{batch}_greedy"] = {}
        for precision in bench.precisions:
            enc, dec = dtypes(precision, bench.device)
            set_ours(ours, enc, dec)
            if enc not in encode:
                with torch.inference_mode():
                    encode[enc] = bench.time(lambda x=images: ours.encode(x))
            if dec not in products:
                products[dec] = bench.time(decoder_products(ours, batch), runs=bench.detail_runs)
            floor = encode[enc] + TOKENS * products[dec]
            entry[precision] = {"floor_ms": floor * 1e3, "products_per_step_ms": products[dec] * 1e3}
            peer_rate = rows[f"b{batch}_greedy"][precision].get("peer")
            if isinstance(peer_rate, float):
                entry[precision]["ceiling_vs_peer"] = (batch / peer_rate) / floor
        if peer is not None:
            with torch.inference_mode():
                peer_encoder = bench.time(lambda x=images: peer.encoder(pixel_values=x))
            entry["peer_encoder_share_fp32"] = peer_encoder / (batch / rows[f"b{batch}_greedy"]["fp32"]["peer"])
    set_ours(ours, torch.float32, torch.float32)
    return out


def cached_vs_naive(size: Size, ours: CaptionModel, products_b1_ms: float, bench: Bench) -> dict[str, float]:
    """Our cached greedy against the naive one (the prefix re-run every step): 30 tokens, batch 1, float32.

    End to end, and for the decoding loop alone (encoder time taken off both); `ceiling_decoding_loop` puts
    the naive loop against 30 steps of matrix products alone, the least a cached loop could cost.
    """
    opts = SearchOptions(bos_id=1, eos_id=size.never, max_len=NAIVE_TOKENS)
    one = bench.images(size, 1)
    cached = bench.time(lambda: greedy(ours, one, opts))
    naive = bench.time(lambda: naive_greedy(ours, one, opts))
    with torch.inference_mode():
        encode = bench.time(lambda: ours.encode(one))
    return {"cached_ms": cached * 1e3, "naive_ms": naive * 1e3, "encode_ms": encode * 1e3,
            "end_to_end": naive / cached, "decoding_loop": (naive - encode) / (cached - encode),
            "ceiling_decoding_loop": (naive - encode) / (NAIVE_TOKENS * products_b1_ms / 1e3)}


# ----------------------------------------------------------------------------------------------------------
# Where the time goes: operators by category, from torch.profiler

OP_CATEGORIES = {  # aten operator -> category; an operator named nowhere here counts as "other_ops"
    "matrix_products": ("aten::mm", "aten::addmm", "aten::mv", "aten::addmv", "aten::dot",
                        "aten::mkldnn_convolution", "aten::convolution_backward",
                        "aten::cudnn_convolution", "aten::_convolution"),
    # bmm only runs in attention here (q k^T and weights v on the explicit path); SDPA's kernels by prefix.
    "attention": ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data",
                  "aten::scaled_dot_product_attention"),
    "layer_norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::layer_norm"),
    "elementwise": ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::div", "aten::div_", "aten::sub",
                    "aten::gelu", "aten::gelu_backward", "aten::where", "aten::masked_fill", "aten::masked_fill_",
                    "aten::fill_", "aten::zero_", "aten::neg", "aten::exp", "aten::tanh", "aten::addcmul_",
                    "aten::addcdiv_", "aten::sqrt", "aten::lerp_"),
    "cache_writes_indexing": ("aten::copy_", "aten::index_select", "aten::index", "aten::index_put_",
                              "aten::embedding", "aten::cat", "aten::_to_copy", "aten::clone"),
}
ATTENTION_PREFIXES = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")
ELEMENTWISE_PREFIXES = ("aten::_foreach_",)  # AdamW's multi-tensor updates


def category(op: str) -> str:
    if op.startswith(ATTENTION_PREFIXES):
        return "attention"
    if op.startswith(ELEMENTWISE_PREFIXES):
        return "elementwise"
    return next((name for name, ops in OP_CATEGORIES.items() if op in ops), "other_ops")


def op_seconds(fn: Callable[[], object], bench: Bench) -> tuple[dict[str, float], float]:
    """Self time (s) of each operator over one call of fn (device time on CUDA, CPU time on the CPU), and
    the call's wall time under the profiler.

    Self time excludes the operators an operator calls, so the figures add up without double counting.
    """
    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        bench.sync()
        wall = time.perf_counter() - start
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # a GPU kernel's time is also counted on the operator that launched it
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        seconds[event.key] = seconds.get(event.key, 0.0) + self_us / 1e6
    return seconds, wall


def by_category(seconds: dict[str, float]) -> dict[str, float]:
    out = {name: 0.0 for name in [*OP_CATEGORIES, "other_ops"]}
    for op, s in seconds.items():
        out[category(op)] += s
    return out


def step_b1(size: Size, ours: CaptionModel, bench: Bench) -> dict[str, Any]:
    """Where our batch-1 greedy decoding step goes (float32 decoder, as shipped; the growing cache).

    step_ms: a Stepper.step's wall time, the mean over a 20-token caption (fastest of detail_runs captions);
    products_only_ms: its matrix products alone (decoder_products). Then a few captions under the
    profiler: profiled_step_ms, their wall time a step; ops_ms, the self time of the step's operators by
    category; python_dispatch_overhead_ms = profiled_step_ms - all of ops_ms, the time no operator
    accounts for (Python, module glue, the dispatcher, launches). The profiler's own cost lands there
    too, so that is an upper bound; step_ms - all of ops_ms (..._unprofiled_ms) is a lower one, since
    the profiler also slows the operators a little. Greedy's token choice (log-softmax, argmax) is
    outside the step.
    """
    one = bench.images(size, 1)
    token = torch.ones(1, dtype=torch.long, device=bench.device)
    with torch.inference_mode():
        memory = ours.encode(one).memory

        def caption(steps) -> None:
            for _ in range(TOKENS):
                steps.step(token)

        times = []
        for _ in range(bench.warmup + bench.detail_runs):
            steps = ours.begin(memory)  # a fresh cache, not timed
            bench.sync()
            start = time.perf_counter()
            caption(steps)
            bench.sync()
            times.append(time.perf_counter() - start)
        step = min(times[bench.warmup:]) / TOKENS
        steppers = [ours.begin(memory) for _ in range(PROFILED_CAPTIONS)]
        seconds, wall = op_seconds(lambda: [caption(steps) for steps in steppers], bench)
    steps = PROFILED_CAPTIONS * TOKENS
    ops = {name: s / steps for name, s in by_category(seconds).items()}
    products = bench.time(decoder_products(ours, 1), runs=bench.detail_runs)
    return {"step_ms": step * 1e3, "products_only_ms": products * 1e3, "profiled_step_ms": wall / steps * 1e3,
            "ops_ms": {name: s * 1e3 for name, s in ops.items()},
            "python_dispatch_overhead_ms": (wall / steps - sum(ops.values())) * 1e3,
            "python_dispatch_overhead_unprofiled_ms": (step - sum(ops.values())) * 1e3}


# ----------------------------------------------------------------------------------------------------------
# Training rows


def training_step(loss_of: Callable[[], torch.Tensor], model: torch.nn.Module,
                  device: torch.device) -> Callable[[torch.dtype], None]:
    """One optimisation step (forward under autocast in `dtype` unless float32, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(dtype: torch.dtype) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def train_steps(size: Size, ours: CaptionModel, peer, bench: Bench) -> dict[str, Callable[[torch.dtype], None]]:
    """Both sides' training step on the same batch: one caption per image (the peer has no several-captions path)."""
    batch = size.train_batch[bench.device.type]
    images = bench.images(size, batch)
    tokens = torch.randint(4, size.ours["vocab_size"], (batch, TOKENS + 1), device=bench.device)
    ours.train()
    steps = {"ours": training_step(lambda: caption_loss(ours(images, tokens[:, :-1]), tokens[:, 1:], pad_id=0),
                                   ours, bench.device)}
    if peer is not None:
        peer.train()
        steps["peer"] = training_step(lambda: peer(pixel_values=images, labels=tokens[:, 1:]).loss, peer, bench.device)
    return steps


def train_rows(steps: dict[str, Callable[[torch.dtype], None]], batch: int,
               bench: Bench) -> dict[str, dict[str, float]]:
    """Images/s as {precision: {side: rate}}: fp32 and bf16 autocast timed in turns, the defaults reused."""
    rows: dict[str, dict[str, float]] = {}
    for precision in bench.precisions:
        if precision == "default_vs_default":
            continue
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        fns = {side: functools.partial(step, dtype) for side, step in steps.items()}
        rows[precision] = {side: batch / seconds for side, seconds in bench.turns(fns).items()}
    if "default_vs_default" in bench.precisions:  # ours at auto trains under its autocast dtype; the peer in fp32
        auto = "bf16" if auto_plan(bench.device).train_autocast == torch.bfloat16 else "fp32"
        rows["default_vs_default"] = {side: rows[auto if side == "ours" else "fp32"][side] for side in steps}
    return {p: rows[p] for p in bench.precisions}


def train_ceiling(steps: dict[str, Callable[[torch.dtype], None]], rows: dict[str, dict[str, float]], batch: int,
                  bench: Bench) -> dict[str, float]:
    """The most any float32 training step could reach against the peer's, at equal FLOPs.

    Our fp32 step's matrix products and attention alone (profiler self time of mm/addmm/bmm, SDPA and their
    backward, the patch convolution) as a share of the profiled step (the fastest of PROFILED_TRAIN_STEPS),
    applied to the step's unprofiled time: `ours_products_attention_ms`. `ceiling_vs_peer_fp32` = the peer's
    measured fp32 step over that: no step doing our products could beat the peer by more.
    """
    profiled = [op_seconds(functools.partial(steps["ours"], torch.float32), bench)
                for _ in range(1 if bench.runs == 1 else PROFILED_TRAIN_STEPS)]
    seconds, wall = min(profiled, key=lambda run: run[1])
    ops = by_category(seconds)
    share = (ops["matrix_products"] + ops["attention"]) / wall
    ours_step = batch / rows["fp32"]["ours"]
    out = {"ours_step_ms": ours_step * 1e3, "profiled_step_ms": wall * 1e3, "products_attention_share": share,
           "ours_products_attention_ms": share * ours_step * 1e3}
    if "peer" in rows["fp32"]:
        peer_step = batch / rows["fp32"]["peer"]
        out["peer_step_ms"] = peer_step * 1e3
        out["ceiling_vs_peer_fp32"] = peer_step / (share * ours_step)
    return out


# ----------------------------------------------------------------------------------------------------------
# One size, start to end


def note(text: str) -> None:
    """Progress, on stderr: stdout is the JSON."""
    print(text, file=sys.stderr, flush=True)


def measure(size: Size, bench: Bench, *, with_peer: bool = True) -> dict[str, Any]:
    """Every figure of one size (the peer's only if `with_peer`)."""
    note(f"building the models ({size.ours['d_model']} wide, {size.image_size} px)")
    ours = build_ours(size, bench.device)
    peer = build_peer(size, bench.device) if with_peer else None
    batch = size.train_batch[bench.device.type]
    result: dict[str, Any] = {
        "ours_config": size.ours, "peer_config": {"vit": size.peer_encoder, "gpt2": size.peer_decoder},
        "params": {"ours": parameters(ours), **({"peer": parameters(peer)} if peer is not None else {})},
        "runs_per_row": bench.runs, "warmup_runs": bench.warmup, "train_batch": batch}
    note(f"decoding rows: {', '.join(CASES)} x {', '.join(bench.precisions)}, {bench.runs} timed runs each")
    rows = decode_rows(size, ours, peer, bench)
    result["decode_captions_per_s"] = rows
    note("ceilings, the batch-1 step's breakdown, cached vs naive")
    result["ceilings"] = ceilings(size, ours, peer, rows, bench)
    result["step_b1"] = step_b1(size, ours, bench)
    products_b1 = result["ceilings"]["b1_greedy"]["fp32"]["products_per_step_ms"]
    result["cached_vs_naive"] = cached_vs_naive(size, ours, products_b1, bench)
    note(f"training rows at batch {batch}")
    steps = train_steps(size, ours, peer, bench)
    train = train_rows(steps, batch, bench)
    result["train_images_per_s"] = train
    result["train_ceiling"] = train_ceiling(steps, train, batch, bench)
    result["ratios_ours_over_peer"] = {**ratios(rows), **ratios({"train": train})}
    result["static_vs_dynamic"] = static_vs_dynamic(rows)
    return result


def rounded(value: Any) -> Any:
    """Floats to 4 significant digits, all the way down."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def summary(result: dict[str, Any]) -> str:
    """The rows as a few lines of text (stderr): case, precision, row, ours and the peer's rate, the ratio."""
    def shown(rate: object) -> str:
        return f"{rate:.2f}" if isinstance(rate, float) else str(rate)[:24]

    lines = []
    for name, figures in result["sizes"].items():
        lines.append(f"== {name} ({result['device']}): parameters {figures['params']}")
        rows = {**figures["decode_captions_per_s"], "train": figures["train_images_per_s"]}
        for case, by_precision in rows.items():
            for precision, row in by_precision.items():
                peer = row.get("peer")
                for side, rate in row.items():
                    if side != "peer":
                        ratio = f"{rate / peer:.2f}x" if isinstance(rate, float) and isinstance(peer, float) else "-"
                        lines.append(f"  {case:<10} {precision:<18} {side:<12} {shown(rate):>8} vs peer "
                                     f"{shown(peer):>8}  {ratio}")
    return "\n".join(lines)


CASE_NAMES = {"b1_greedy": "greedy, batch 1", "b32_greedy": "greedy, batch 32", "b32_beam3": "beam 3, batch 32"}
ROW_NAMES = {"ours": "", "ours_static": ", static cache", "ours_dynamic": ", growing cache"}
COLUMN_NAMES = {"fp32": "fp32: ours / peer", "bf16": "bf16: ours / peer",
                "default_vs_default": "default vs default (not equal precision): ours / peer"}


def markdown(result: dict[str, Any]) -> str:
    """One Markdown table per size of a saved result (--markdown): rates, ours / peer = ratio."""
    def cell(rate: object, peer: object) -> str:
        if not isinstance(rate, float):
            return str(rate).split(":")[0]  # "unavailable"
        if not isinstance(peer, float):
            return f"{rate:.3g}"
        return f"{rate:.3g} / {peer:.3g} = **{rate / peer:.2f}x**"

    tables = []
    for name, figures in result["sizes"].items():
        columns = [c for c in COLUMN_NAMES if c in figures["train_images_per_s"]]  # equal precision first
        where = result["machine"].get("gpu") or f"{result['machine']['cpu']}, {result['machine']['threads']} threads"
        lines = [f"{name}, {result['device']} ({result['machine']['date']}, {where}; {figures['runs_per_row']} "
                 f"timed runs a side; parameters {figures['params']})", "",
                 "| captions/s (training: images/s) | " + " | ".join(COLUMN_NAMES[c] for c in columns) + " |",
                 "|---" * (len(columns) + 1) + "|"]
        rows = {**figures["decode_captions_per_s"], "train": figures["train_images_per_s"]}
        for case, by_precision in rows.items():
            label = CASE_NAMES.get(case, f"training, batch {figures['train_batch']}")
            for side in [side for side in by_precision[columns[0]] if side != "peer"]:
                cells = [cell(by_precision[c][side], by_precision[c].get("peer")) for c in columns]
                lines.append(f"| {label}{ROW_NAMES.get(side, '')} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("matched", "realistic", "both"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="one timed run per row: a smoke run, not figures")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="measure nothing: print a saved result's tables")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    setup_threads()
    device = torch.device(args.device)
    try:
        import transformers
    except ImportError:
        transformers = None
        print("transformers is not installed (pip install -e '.[bench]'): our side only", file=sys.stderr)
    result: dict[str, Any] = {"machine": machine(), "device": args.device, "quick": args.quick, "tokens": TOKENS,
                              "transformers": getattr(transformers, "__version__", None),
                              "static_keyword": "static" in inspect.signature(greedy).parameters,
                              "precisions": {p: PRECISIONS[p] for p in precision_rows(device)},
                              "sizes": {}}
    if device.type == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name(device)
        result["machine"]["cuda"] = torch.version.cuda
    for name in ("matched", "realistic") if args.size == "both" else (args.size,):
        size = SIZES[name]
        note(f"== {name} size on {args.device}")
        started = time.perf_counter()
        result["sizes"][name] = measure(size, Bench.for_size(size, device, quick=args.quick),
                                        with_peer=transformers is not None)
        result["sizes"][name]["seconds"] = time.perf_counter() - started
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(rounded(result), indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(summary(result), file=sys.stderr)


if __name__ == "__main__":
    main()
