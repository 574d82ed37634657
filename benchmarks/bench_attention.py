"""Attention speed at decoder shapes, as one JSON object (2 threads; CPU unless --device is given).

- fused (F.scaled_dot_product_attention) vs explicit (scores -> masked softmax -> weights @ V) path of
  MultiHeadAttention, for cross-attention (T tokens over N regions) and causal self-attention: the
  attention core alone (inference), and the whole module with its projections (inference, and a
  training forward+backward);
- the attention core in bfloat16, forward + backward (what training under CPU autocast runs), at the
  tiny preset's shapes and at the matched size (which path is faster depends on the CPU: NOTES.md);
- the attention core at inference in the shapes captioning runs (decoding steps of 1 to 96 rows, and
  the encoder's 144-token self-attention), float32 and bfloat16;
- the explicit path of each scoring function (general and additive have no fused form);
- KV-cache growth while decoding one token at a time: preallocated capacity written in place vs
  concatenating a new tensor every step.

Times are milliseconds, the fastest of --repeat runs. The candidates of one comparison run in turns
(a, b, a, b, ...), so a neighbour's load on a shared machine slows both alike and ratios stay fair.

    python benchmarks/bench_attention.py [--device cuda] [--repeat 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, setup_threads, time_in_turns  # noqa: E402

from captioner.models.attention import KVCache, MultiHeadAttention, causal_mask  # noqa: E402
from captioner.models.kernels import Kernels, use_kernels  # noqa: E402

B, H, T, N, D = 32, 4, 20, 64, 256  # a batch of 32 captions of 20 tokens over an 8x8 grid, width 256


def compare(candidates: dict[str, Callable[[], object]], *, repeat: int, device: str,
            warmup: int = 3) -> dict[str, float]:
    """Fastest time (ms) of each candidate, running them in turns; plus the ratio of the others to the first."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    best = time_in_turns(candidates, repeat=repeat, warmup=warmup, sync=sync)
    row = {f"{name}_ms": round(t * 1e3, 3) for name, t in best.items()}
    first, *others = candidates
    row.update({f"{name}_over_{first}": round(best[name] / best[first], 2) for name in others})
    return row


def core(device: str, *, repeat: int) -> dict[str, dict[str, float]]:
    """The attention core alone (no Q/K/V/O projections): the module's two paths on (B, H, T, Dh) inputs."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=D, n_heads=H).to(device)
    Dh = D // H
    q = torch.randn(B, H, T, Dh, device=device)
    memory_kv, self_kv = torch.randn(B, H, N, Dh, device=device), torch.randn(B, H, T, Dh, device=device)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    padded = causal_mask(T, device) & (torch.arange(T, device=device) < lengths[:, None])[:, None, None, :]
    shapes = {
        f"cross B={B} H={H} T={T} N={N} Dh={Dh}": (memory_kv, None),
        f"self causal B={B} H={H} T={T} Dh={Dh}": (self_kv, causal_mask(T, device)),
        f"self causal+padding B={B} H={H} T={T} Dh={Dh}": (self_kv, padded),
    }
    out = {}
    with torch.inference_mode():
        for name, (kv, mask) in shapes.items():
            out[name] = compare({"fused": lambda kv=kv, mask=mask: mha._fused(q, kv, kv, mask),
                                 "explicit": lambda kv=kv, mask=mask: mha._explicit(q, kv, kv, mask)},
                                repeat=repeat, device=device)
    return out


def core_train_bf16(device: str, *, repeat: int) -> dict[str, dict[str, float]]:
    """The two core paths in bfloat16 with autograd (forward + backward), where SDPA's CPU kernel varies most."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=D, n_heads=H).to(device)
    shapes = {  # name: (B, H, Tq, Tk, Dh, causal)
        "tiny self B=32 H=4 T=36 Dh=32": (32, 4, 36, 36, 32, False),
        "tiny causal B=32 H=4 T=13 Dh=32": (32, 4, 13, 13, 32, True),
        "tiny cross B=32 H=4 T=13 N=36 Dh=32": (32, 4, 13, 36, 32, False),
        f"matched self B={B} H={H} T=144 Dh={D // H}": (B, H, 144, 144, D // H, False),
        f"matched cross B={B} H={H} T={T} N=144 Dh={D // H}": (B, H, T, 144, D // H, False),
    }
    out = {}
    for name, (b, h, tq, tk, dh, causal) in shapes.items():
        def leaf(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=True)

        q, k, v = leaf(b, h, tq, dh), leaf(b, h, tk, dh), leaf(b, h, tk, dh)
        mask = causal_mask(tq, device) if causal else None

        def run(path: Callable, q=q, k=k, v=v, mask=mask) -> None:
            out = path(q, k, v, mask)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()

        out[name] = compare({"fused": lambda run=run: run(mha._fused), "explicit": lambda run=run: run(mha._explicit)},
                            repeat=repeat, device=device)
    return out


def core_decode(device: str, *, repeat: int) -> dict[str, dict[str, float]]:
    """The two core paths at inference, in the shapes captioning runs at the matched size (4 heads, Dh 64)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=D, n_heads=H).to(device).eval()
    shapes = {  # name: (rows, Tq, Tk)
        "step, 1 image, cross over 144 regions": (1, 1, 144),
        "step, 32 images, cross over 144 regions": (32, 1, 144),
        "step, 32 images x 3 beams grouped, cross over 144 regions": (32, 3, 144),
        "step, 32 images, self over 20 cached": (32, 1, 20),
        "step, 96 beams, self over 20 cached": (96, 1, 20),
        "encoder self-attention, 32 images x 144 patches": (32, 144, 144),
    }
    out = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for name, (rows, tq, tk) in shapes.items():
                q = torch.randn(rows, H, tq, D // H, device=device, dtype=dtype)
                kv = torch.randn(rows, H, tk, D // H, device=device, dtype=dtype)
                out[f"{str(dtype).removeprefix('torch.')} {name}"] = compare(
                    {"fused": lambda q=q, kv=kv: mha._fused(q, kv, kv, None),
                     "explicit": lambda q=q, kv=kv: mha._explicit(q, kv, kv, None)},
                    repeat=repeat, device=device)
    return out


def module(device: str, *, repeat: int) -> dict[str, dict[str, float]]:
    """The whole MultiHeadAttention (projections included) on each path, inference and training."""
    torch.manual_seed(0)
    paths = {"fused": MultiHeadAttention(d_model=D, n_heads=H).to(device)}
    paths["explicit"] = copy.deepcopy(paths["fused"])  # the same weights, on the other path
    for path, mha in paths.items():
        use_kernels(mha, Kernels(attention=path))
    x, memory = torch.randn(B, T, D, device=device), torch.randn(B, N, D, device=device)
    shapes = {
        f"cross B={B} H={H} T={T} N={N} D={D}": (x, memory, None),
        f"self causal B={B} H={H} T={T} D={D}": (x, x, causal_mask(T, device)),
    }

    def inference(mha: MultiHeadAttention, query: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> None:
        with torch.inference_mode():
            mha(query, kv, kv, mask=mask)

    def train(mha: MultiHeadAttention, query: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> None:
        out, _ = mha(query.detach().requires_grad_(), kv, kv, mask=mask)
        out.sum().backward()

    result = {}
    for name, (query, kv, mask) in shapes.items():
        for mode, fn in (("inference", inference), ("train", train)):
            result[f"{name} {mode}"] = compare(
                {path: lambda fn=fn, mha=mha, query=query, kv=kv, mask=mask: fn(mha, query, kv, mask)
                 for path, mha in paths.items()},
                repeat=repeat, device=device)
    return result


def scores(device: str, *, repeat: int) -> dict[str, float]:
    """Cross-attention inference on the explicit path, per scoring function."""
    torch.manual_seed(0)
    query, memory = torch.randn(B, T, D, device=device), torch.randn(B, N, D, device=device)
    modules = {name: MultiHeadAttention(d_model=D, n_heads=H, score=name).to(device)
               for name in ("scaled_dot", "dot", "general", "additive")}
    with torch.inference_mode():
        return compare({name: lambda m=m: m(query, memory, memory, need_weights=True) for name, m in modules.items()},
                       repeat=repeat, device=device)


def caches(device: str, *, repeat: int) -> dict[str, dict[str, float]]:
    """Decode one token at a time through self-attention: preallocated cache vs torch.cat every step."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=D, n_heads=H).to(device).eval()

    def decode(x: torch.Tensor, preallocate: bool) -> None:
        cache = KVCache(preallocate=preallocate)
        for t in range(x.shape[1]):
            mha(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache)

    out = {}
    with torch.inference_mode():
        for rows, steps in ((B, T), (B * 5, T), (B, 100)):  # greedy batch; 5 beams each; a long sequence
            x = torch.randn(rows, steps, D, device=device)
            out[f"rows={rows} steps={steps}"] = compare(
                {"preallocated": lambda x=x: decode(x, True), "cat": lambda x=x: decode(x, False)},
                repeat=repeat, device=device, warmup=1)
    return out


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    setup_threads(2)
    report = {
        "machine": {**machine(), "device": args.device},
        "core": core(args.device, repeat=args.repeat),
        "core_train_bf16": core_train_bf16(args.device, repeat=max(5, args.repeat // 3)),
        "core_decode": core_decode(args.device, repeat=args.repeat),
        "module": module(args.device, repeat=args.repeat),
        "explicit_by_score": scores(args.device, repeat=args.repeat),
        "kv_cache": caches(args.device, repeat=max(5, args.repeat // 3)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
