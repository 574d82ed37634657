"""captioner vs Hugging Face transformers' VisionEncoderDecoderModel at the matched size, side by side.

Prints one JSON object: decoding captions/s (greedy batch 1 and 32, beam 3 batch 32; ours cached and
naive), training images/s at batch 32, and the ratios. Both models have random weights and generate
exactly 20 tokens (no early <eos>), so the work is equal. `ceilings` bounds what any decoding loop could
reach: our encoder plus 20 steps of nothing but the decoder's matrix products, against the peer's generate
(and `ratios.ceiling_cached_vs_naive_*`: the naive loop against 30 such steps).

Precision is reported three ways, so no ratio hides a precision change:
  default  each library as a user gets it: ours at `--precision auto` (on a CPU with AVX512-BF16/AMX:
           bf16 encoder for captioning, bf16 autocast for training), transformers in float32;
  fp32     both in float32;
  bf16     both reduced: transformers' whole model in bf16 for generate, bf16 autocast for training.

    pip install -e '.[bench]' && python benchmarks/bench_peers.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MATCHED, TOKENS, machine, setup_threads, time_it  # noqa: E402

from captioner.config import ModelConfig  # noqa: E402
from captioner.decoding import SearchOptions, beam_search, greedy, naive_greedy  # noqa: E402
from captioner.models.captioner import CaptionModel  # noqa: E402
from captioner.runtime import cpu_has_native_bf16  # noqa: E402
from captioner.training import caption_loss  # noqa: E402

NEVER = MATCHED["vocab_size"] + 7  # an <eos> id outside the vocabulary: every caption runs 20 tokens


def ours() -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel(ModelConfig(**MATCHED))


def peer():
    """VisionEncoderDecoderModel: ViT encoder + GPT-2 decoder with cross-attention, same sizes."""
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

    enc = ViTConfig(image_size=MATCHED["image_size"], patch_size=MATCHED["patch_size"],
                    hidden_size=MATCHED["d_model"], num_hidden_layers=MATCHED["enc_layers"],
                    num_attention_heads=MATCHED["n_heads"], intermediate_size=MATCHED["d_ff"],
                    hidden_dropout_prob=MATCHED["dropout"], attention_probs_dropout_prob=MATCHED["attn_dropout"])
    dec = GPT2Config(vocab_size=MATCHED["vocab_size"], n_embd=MATCHED["d_model"], n_layer=MATCHED["n_layers"],
                     n_head=MATCHED["n_heads"], n_inner=MATCHED["d_ff"], n_positions=64, add_cross_attention=True,
                     is_decoder=True, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                     resid_pdrop=MATCHED["dropout"], embd_pdrop=MATCHED["dropout"], attn_pdrop=MATCHED["attn_dropout"])
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(encoder=ViTModel(enc, add_pooling_layer=False), decoder=GPT2LMHeadModel(dec))
    model.config.decoder_start_token_id = 1
    model.config.pad_token_id = 0
    model.config.eos_token_id = None  # no <eos>: every caption runs the full 20 tokens, as ours do
    model.generation_config.eos_token_id = None
    return model


def timed_decode(model: CaptionModel, hf, dtypes: list[torch.dtype], out: dict[str, float]) -> None:
    """Captions/s of ours (encoder in each dtype, decoder float32: what Captioner.load does) and of HF (all dtype).

    For each batch/beam setting every precision of both sides runs back to back, so the ratios (the
    default one included: ours in bf16 against HF in fp32) compare figures taken seconds apart.
    """
    opts = SearchOptions(bos_id=1, eos_id=NEVER, max_len=TOKENS)
    for batch, beam in ((1, 1), (32, 1), (32, 3)):
        images = torch.randn(batch, 3, MATCHED["image_size"], MATCHED["image_size"])
        for dtype in dtypes:
            model.encoder.to(dtype)
            tag = "bf16" if dtype == torch.bfloat16 else "fp32"
            name = f"b{batch}_{'greedy' if beam == 1 else f'beam{beam}'}_{tag}"
            if beam == 1:
                t = time_it(lambda x=images: greedy(model, x, opts), repeat=5, min_seconds=2)
            else:
                t = time_it(lambda x=images, k=beam: beam_search(model, x, opts, beam=k), repeat=3, min_seconds=2)
            out[f"ours_{name}"] = batch / t
            if hf is not None:
                hf.to(dtype)
                with torch.inference_mode():
                    t = time_it(lambda x=images.to(dtype), k=beam: hf.generate(
                        pixel_values=x, max_new_tokens=TOKENS, min_new_tokens=TOKENS, num_beams=k, do_sample=False),
                        repeat=3, min_seconds=2)
                out[f"hf_{name}"] = batch / t
    model.encoder.to(torch.float32)
    if hf is not None:
        hf.to(torch.float32)


def decode_rates(model: CaptionModel, hf, bf16: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    timed_decode(model, hf, [torch.float32, torch.bfloat16] if bf16 else [torch.float32], out)
    # The cached-vs-naive target is stated at 30 tokens, batch 1: the same float32 model both ways,
    # end to end (encoder included) and for the decoding loop alone (the same memory given to both).
    opts30 = SearchOptions(bos_id=1, eos_id=NEVER, max_len=30)
    one = torch.randn(1, 3, MATCHED["image_size"], MATCHED["image_size"])
    out["ours_b1_greedy_30tok"] = 1 / time_it(lambda: greedy(model, one, opts30), repeat=5, min_seconds=2)
    out["ours_naive_b1_greedy_30tok"] = 1 / time_it(lambda: naive_greedy(model, one, opts30), repeat=3,
                                                     min_seconds=2)
    with torch.inference_mode():
        encode = time_it(lambda: model.encode(one), repeat=10, min_seconds=1)
    out["encode_b1_s"] = encode
    return out


def decoder_products(model: CaptionModel, rows: int) -> Callable[[], None]:
    """One decoding step's matrix products alone (22 at the matched size), with the model's own weights.

    No attention, norm, head split, cache write or Python: the least work a step of this decoder can do.
    """
    layers = model.decoder.layers
    mats = [m for layer in layers for m in (layer.self_attn.to_q, layer.self_attn.to_kv, layer.self_attn.to_out,
                                            layer.cross_attn.to_q, layer.cross_attn.to_out,
                                            layer.ff.to_hidden, layer.ff.to_out)] + [model.decoder.head]
    inputs = {m.in_features: torch.randn(rows, m.in_features) for m in mats}
    kernels = model.kernels

    def step() -> None:
        for m in mats:
            kernels.linear(inputs[m.in_features], m.weight, m.bias)  # on the kernel the model's policy picks
    return step


def ceilings(model: CaptionModel, hf, bf16: bool) -> dict[str, float]:
    """How fast our greedy decoding could be at best, against the peer's measured generate, side by side.

    Best case = our encoder at the default precision + TOKENS steps that do nothing but the decoder's
    matrix products (float32 weights, as Captioner.load keeps the decoder). A ratio target above
    `ceiling_*` cannot be met by any decoding loop around this float32 decoder on this machine (lower
    precision weights would move the floor); `hf_encoder_share_*` is the peer's time spent in its encoder.
    """
    out: dict[str, float] = {}
    dtype = torch.bfloat16 if bf16 else torch.float32
    for batch in (1, 32):
        images = torch.randn(batch, 3, MATCHED["image_size"], MATCHED["image_size"])
        with torch.inference_mode():
            hf_total = time_it(lambda x=images: hf.generate(pixel_values=x, max_new_tokens=TOKENS,
                                                            min_new_tokens=TOKENS, do_sample=False),
                               repeat=3, min_seconds=2)
            hf_encoder = time_it(lambda x=images: hf.encoder(pixel_values=x), repeat=5, min_seconds=1)
            model.encoder.to(dtype)
            encode = time_it(lambda x=images: model.encode(x), repeat=5, min_seconds=1)
            model.encoder.to(torch.float32)
            products = time_it(decoder_products(model, batch), repeat=20, min_seconds=1)
        floor = encode + TOKENS * products
        out[f"hf_encoder_share_b{batch}"] = hf_encoder / hf_total
        out[f"ours_floor_b{batch}_ms"] = floor * 1e3
        out[f"ours_floor_b{batch}_products_per_step_ms"] = products * 1e3
        out[f"ceiling_vs_hf_b{batch}_greedy_default"] = hf_total / floor
    return out


def train_rate(step_fn, batch: int = 32) -> float:
    return batch / time_it(step_fn, repeat=5, warmup=2, min_seconds=3)


def train_rates(hf, bf16: bool) -> dict[str, float]:
    B = 32
    images = torch.randn(B, 3, MATCHED["image_size"], MATCHED["image_size"])
    tokens = torch.randint(4, MATCHED["vocab_size"], (B, TOKENS + 1))
    model = ours().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def ours_step(dtype: torch.dtype = torch.float32) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(images, tokens[:, :-1])
        loss = caption_loss(logits, tokens[:, 1:], pad_id=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {"ours_fp32": train_rate(ours_step)}
    if bf16:
        out["ours_bf16"] = train_rate(lambda: ours_step(torch.bfloat16))
    if hf is not None:
        hf.train()
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)

        def hf_step(dtype: torch.dtype = torch.float32) -> None:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = hf(pixel_values=images, labels=tokens[:, 1:]).loss
            hf_opt.zero_grad(set_to_none=True)
            loss.backward()
            hf_opt.step()

        out["hf_fp32"] = train_rate(hf_step)
        if bf16:
            out["hf_bf16"] = train_rate(lambda: hf_step(torch.bfloat16))
    return out


def main() -> None:
    setup_threads()
    try:
        hf = peer().eval()
    except ImportError:
        hf = None
    model = ours().eval()
    bf16 = cpu_has_native_bf16()  # what --precision auto picks on this CPU
    result: dict[str, object] = {"machine": machine(), "matched": MATCHED, "tokens": TOKENS, "native_bf16": bf16,
                                 "params_ours": sum(p.numel() for p in model.parameters())}
    if hf is not None:
        import transformers

        result["transformers"] = transformers.__version__
        result["params_hf"] = sum(p.numel() for p in hf.parameters())
    decode = decode_rates(model, hf, bf16)
    bounds = ceilings(model, hf, bf16) if hf is not None else {}
    if bounds:
        result["ceilings"] = {k: round(v, 3) for k, v in bounds.items()}
    train = train_rates(hf, bf16)
    result["decode_captions_per_s"] = {k: round(v, 2) for k, v in decode.items() if not k.endswith("_s")}
    result["train_images_per_s"] = {k: round(v, 2) for k, v in train.items()}
    naive_loop = 1 / decode["ours_naive_b1_greedy_30tok"] - decode["encode_b1_s"]
    cached_loop = 1 / decode["ours_b1_greedy_30tok"] - decode["encode_b1_s"]
    ratios = {"cached_vs_naive_b1_30tok": decode["ours_b1_greedy_30tok"] / decode["ours_naive_b1_greedy_30tok"],
              "cached_vs_naive_b1_30tok_decoding_loop": naive_loop / cached_loop}
    if bounds:  # the naive loop against the least a cached loop could cost: 30 steps of matrix products alone
        ratios["ceiling_cached_vs_naive_b1_30tok_decoding_loop"] = naive_loop / (
            30 * bounds["ours_floor_b1_products_per_step_ms"] / 1e3)
    default = "bf16" if bf16 else "fp32"
    if hf is not None:
        for tag in ("b1_greedy", "b32_greedy", "b32_beam3"):
            ratios[f"vs_hf_decode_{tag}_default"] = decode[f"ours_{tag}_{default}"] / decode[f"hf_{tag}_fp32"]
            ratios[f"vs_hf_decode_{tag}_fp32"] = decode[f"ours_{tag}_fp32"] / decode[f"hf_{tag}_fp32"]
            if bf16:
                ratios[f"vs_hf_decode_{tag}_bf16"] = decode[f"ours_{tag}_bf16"] / decode[f"hf_{tag}_bf16"]
        ratios["vs_hf_train_default"] = train[f"ours_{default}"] / train["hf_fp32"]
        ratios["vs_hf_train_fp32"] = train["ours_fp32"] / train["hf_fp32"]
        if bf16:
            ratios["vs_hf_train_bf16"] = train["ours_bf16"] / train["hf_bf16"]
    result["ratios"] = {k: round(v, 2) for k, v in ratios.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
