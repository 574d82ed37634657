"""The physical limit and the CLI's own costs, in one JSON object.

- matmul FLOP/s of this machine (2 threads) and the share of it our training step and our batch-32
  greedy decoding reach at the matched size (model FLOPs counted with torch's FlopCounterMode);
- `captioner --help` and `captioner caption` start-up time (median of 5 runs, a fresh process each);
- peak memory (max RSS) of `captioner caption` on 100 images.

    python benchmarks/bench_system.py
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MATCHED, TOKENS, machine, setup_threads, time_it  # noqa: E402

from captioner import checkpoint  # noqa: E402
from captioner.config import ModelConfig, preset  # noqa: E402
from captioner.data.images import Preprocess  # noqa: E402
from captioner.data.synthetic import write_synthetic  # noqa: E402
from captioner.data.vocab import Vocabulary  # noqa: E402
from captioner.decoding import SearchOptions, greedy  # noqa: E402
from captioner.models.captioner import CaptionModel  # noqa: E402
from captioner.training import caption_loss  # noqa: E402


def matmul_flops(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_it(lambda: a @ b, repeat=10, warmup=3)
    return 2 * n**3 / t


def count_flops(fn) -> int:
    """FLOPs of `fn()`, as torch's FLOP counter sees them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_efficiency(peak: float) -> dict[str, float]:
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(**MATCHED))
    B = 32
    images = torch.randn(B, 3, MATCHED["image_size"], MATCHED["image_size"])
    tokens = torch.randint(4, MATCHED["vocab_size"], (B, TOKENS + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        loss = caption_loss(model(images, tokens[:, :-1]), tokens[:, 1:], pad_id=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    train_flops = count_flops(train_step)
    train_t = time_it(train_step, repeat=5, warmup=2)
    model.eval()
    opts = SearchOptions(bos_id=1, eos_id=MATCHED["vocab_size"] + 7, max_len=TOKENS)
    decode_flops = count_flops(lambda: greedy(model, images, opts))
    decode_t = time_it(lambda: greedy(model, images, opts), repeat=3)
    return {
        "train_gflop_per_image": train_flops / B / 1e9,
        "train_flops_share": train_flops / train_t / peak,
        "decode_gflop_per_image": decode_flops / B / 1e9,
        "decode_flops_share": decode_flops / decode_t / peak,
    }


def startup(args: list[str], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "captioner", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def caption_costs() -> dict[str, float]:
    """Start-up and peak memory of `captioner caption` with the default tiny model (random weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_synthetic(tmp_path / "data", 100, split="test")
        captions = json.loads((tmp_path / "data" / "captions.json").read_text())["annotations"]
        vocab = Vocabulary.build([a["caption"] for a in captions])
        config = preset("tiny", vocab_size=len(vocab), pad_id=vocab.pad_id)
        run = tmp_path / "run"
        checkpoint.write_run_config(run, model_config=config.to_dict(), vocab=vocab.to_dict(),
                                    preprocess=Preprocess(image_size=config.image_size).to_dict(), train={},
                                    data={})
        checkpoint.save_weights(run / checkpoint.BEST, CaptionModel(config))
        images = str(tmp_path / "data" / "images")
        one = sorted(Path(images).iterdir())[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "captioner", "caption", images, "--model", str(run), "--json"],
                       check=True, capture_output=True)
        hundred = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {
            "help_seconds": startup(["--help"]),
            "caption_one_image_seconds": startup(["caption", str(one), "--model", str(run)], repeat=3),
            "caption_100_images_seconds": hundred,
            "caption_100_images_peak_rss_mb": max(peak_kb, before) / 1024,
        }


def main() -> None:
    setup_threads()
    peak = matmul_flops()
    result = {"machine": machine(), "matmul_gflops": peak / 1e9}
    result.update(model_efficiency(peak))
    result.update(caption_costs())
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
