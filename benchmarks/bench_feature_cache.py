"""The frozen-feature cache: a training epoch that recomputes a frozen ResNet-50 against one served from the cache.

Writes N JPEGs (640 x 480, quality 90: smooth random scenes with a few shapes) with a caption naming their
shapes and colours, builds a captioner with a ResNet-50 backbone at 224 px, frozen, and a decoder of the
matched size (common.MATCHED: width 256, 3 layers), then times:
- image epoch: one training epoch (forward, backward, AdamW) over CaptionDataset batches of un-augmented
  images, the backbone recomputed on every decoded, preprocessed image;
- build: `feature_cache.cached_dataset` into an empty cache folder (each image decoded and through the
  backbone once), and reopen: the same call again (only the checks on open);
- cache epoch: the same epoch from the same initial weights, over the same batches, from the cache.
Both epochs use the same loader settings. It checks that the two epochs' losses agree step by step, and that
with one set of weights the teacher-forced logits and greedy captions from cached features match those from
images (float16 rounding of the stored features aside).

The backbone has random weights: the time of a convolution does not depend on its values, and a cache keys
ImageNet weights the same way (a digest of the state dict). Training on real data normally augments its
images; a cache cannot (see captioner/feature_cache.py), so both epochs here see the same un-augmented images.

    python benchmarks/bench_feature_cache.py                  # 2,000 images, 2 threads
    CAPTIONER_BENCH_THREADS=1 python benchmarks/bench_feature_cache.py --n 300   # a shared, busy machine
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MATCHED, TOKENS, machine, setup_threads  # noqa: E402

from captioner import feature_cache  # noqa: E402
from captioner.config import ModelConfig  # noqa: E402
from captioner.data.dataset import CaptionDataset, make_loader  # noqa: E402
from captioner.data.images import Preprocess  # noqa: E402
from captioner.data.sources import Sample  # noqa: E402
from captioner.data.vocab import Vocabulary  # noqa: E402
from captioner.decoding import greedy, search_options  # noqa: E402
from captioner.models.captioner import CaptionModel  # noqa: E402

SIZE = 224
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
SHAPES = ("square", "circle")


def write_images(folder: Path, n: int) -> list[Sample]:
    """N JPEGs of 640 x 480: a smooth random background and one or two shapes; captions name them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = folder / f"img{i:05d}.jpg"
        background = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480),
                                                                                               Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(background)
        words = []
        for _ in range(int(rng.integers(1, 3))):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            x, y, r = int(rng.integers(80, 560)), int(rng.integers(80, 400)), int(rng.integers(30, 80))
            (draw.rectangle if shape == "square" else draw.ellipse)((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
            words.append(f"a {colour} {shape}")
        if not path.exists():
            background.save(path, quality=90)
        samples.append(Sample(f"img{i:05d}", [" and ".join(words)], "train", path))
    return samples


def build_model(vocab: Vocabulary) -> CaptionModel:
    decoder = {k: MATCHED[k] for k in ("d_model", "n_heads", "n_layers", "d_ff", "dropout", "attn_dropout")}
    config = ModelConfig(encoder="cnn", cnn_arch="resnet50", cnn_stride=32, image_size=SIZE, freeze_backbone=True,
                         vocab_size=len(vocab), pad_id=vocab.pad_id, **decoder)
    torch.manual_seed(0)
    return CaptionModel(config)


def train_epoch(model: CaptionModel, loader: torch.utils.data.DataLoader, pad_id: int) -> tuple[float, list[float]]:
    """Seconds of one epoch of teacher-forced steps (forward, backward, AdamW), and each step's loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameter_groups(0.01), lr=3e-4)
    losses = []
    t0 = time.perf_counter()
    for batch in loader:
        logits = model(batch.images, batch.inputs, pad_mask=batch.pad_mask, from_features=batch.holds_features)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return time.perf_counter() - t0, losses


class FromFeatures:
    """A CaptionModel seen by the decoding functions as one whose 'images' are cached backbone features."""

    def __init__(self, model: CaptionModel) -> None:
        self.model = model

    def encode(self, features: torch.Tensor, **kw):
        return self.model.encode(features, from_features=True, **kw)

    def begin(self, memory: torch.Tensor, **kw):
        return self.model.begin(memory, **kw)


def parity(model: CaptionModel, images_set: CaptionDataset, cached: feature_cache.FeatureDataset,
           vocab: Vocabulary, n: int) -> dict[str, float]:
    """Teacher-forced logits and greedy captions of n images from pixels vs from the cache, one set of weights."""
    model.eval()
    items = [(images_set[i], cached[i]) for i in range(n)]
    images = torch.stack([a.image for a, _ in items])
    features = torch.stack([b.image for _, b in items])
    inputs = torch.nn.utils.rnn.pad_sequence([a.inputs[0] for a, _ in items], batch_first=True,
                                             padding_value=vocab.pad_id)
    opts = search_options(vocab, TOKENS)
    with torch.no_grad():
        want = model(images, inputs)
        got = model(features, inputs, from_features=True)
    from_images = [h.tokens for h in greedy(model, images, opts)]
    from_cache = [h.tokens for h in greedy(FromFeatures(model), features, opts)]
    return {"logits_max_abs_diff": float((got - want).abs().max()), "logits_std": float(want.std()),
            "greedy_same": sum(a == b for a, b in zip(from_images, from_cache, strict=True)) / n,
            "distinct_captions": len({tuple(t) for t in from_images})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images in the training set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="loader processes, the same for both epochs and the build (training's default)")
    parser.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "captioner_bench_fc",
                        help="folder for the generated JPEGs (kept, reused by the next run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    setup_threads()
    t0 = time.perf_counter()
    samples = write_images(args.images, args.n)
    print(f"{args.n} images ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    vocab = Vocabulary.build([c for s in samples for c in s.captions])
    preprocess = Preprocess(SIZE)
    images_set = CaptionDataset(samples, vocab, preprocess)
    model = build_model(vocab)
    start = copy.deepcopy(model.state_dict())

    def loader(dataset: torch.utils.data.Dataset) -> torch.utils.data.DataLoader:
        return make_loader(dataset, args.batch_size, shuffle=True, workers=args.workers, seed=0, drop_last=True)

    image_s, image_losses = train_epoch(model, loader(images_set), vocab.pad_id)
    print(f"image epoch {image_s:.1f} s", file=sys.stderr)
    model.load_state_dict(start)
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        cached = feature_cache.cached_dataset(model, images_set, preprocess, cache_dir=cache_dir,
                                              batch_size=args.batch_size, workers=args.workers)
        build_s = time.perf_counter() - t0
        print(f"build {build_s:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        cached = feature_cache.cached_dataset(model, images_set, preprocess, cache_dir=cache_dir)
        reopen_s = time.perf_counter() - t0
        assert cached.store.rebuilt is None, cached.store.rebuilt
        cache_mb = cached.store.path.stat().st_size / 2**20
        cache_s, cache_losses = train_epoch(model, loader(cached), vocab.pad_id)
        print(f"cache epoch {cache_s:.1f} s", file=sys.stderr)
        check = parity(model, images_set, cached, vocab, min(64, args.n))
        del cached
    steps = len(image_losses)
    report = {
        "images": args.n, "source": "640x480 JPEG q90", "backbone": "resnet50 (random weights), 224 px, frozen",
        "batch_size": args.batch_size, "workers": args.workers, "steps": steps,
        "image_epoch_s": round(image_s, 1), "build_s": round(build_s, 1), "reopen_s": round(reopen_s, 2),
        "cache_epoch_s": round(cache_s, 1), "speedup": round(image_s / cache_s, 1),
        "first_epoch_with_build_vs_image_epoch": round((build_s + cache_s) / image_s, 2),
        "cache_mb": round(cache_mb), "loss_max_abs_diff": max(abs(a - b) for a, b in zip(image_losses, cache_losses,
                                                                                       strict=True)),
        "loss_first_last": [round(image_losses[0], 4), round(image_losses[-1], 4)], **check, "machine": machine(),
    }
    print(f"\n| | seconds | images/s |\n|---|---|---|\n"
          f"| epoch recomputing the backbone | {image_s:.1f} | {steps * args.batch_size / image_s:.1f} |\n"
          f"| building the cache | {build_s:.1f} | {args.n / build_s:.1f} |\n"
          f"| reopening it (checks only) | {reopen_s:.2f} | |\n"
          f"| epoch from the cache | {cache_s:.1f} | {steps * args.batch_size / cache_s:.1f} |\n"
          f"speed-up of a cached epoch: {image_s / cache_s:.1f}x; cache {cache_mb:.0f} MB; "
          f"loss max |diff| over {steps} steps {report['loss_max_abs_diff']:.2e}; logits max |diff| "
          f"{check['logits_max_abs_diff']:.2e} (std {check['logits_std']:.2f}); greedy captions identical "
          f"{check['greedy_same']:.0%}", file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
