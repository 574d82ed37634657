"""How fast can an encoder alone learn a dataset's photos? The concept task without a decoder.

Trains the encoder and the concept head only (which words the image's captions contain: captioner/concepts.py)
on training photos preloaded in memory, and prints the training and validation concept loss as it goes. A
validation loss that stays near the word prior's says the encoder has not yet learned to tell the photos
apart, whatever the decoder would make of it. Figures: benchmarks/NOTES.md, "Real photographs".

    python benchmarks/encoder_probe.py --data ../shared/data/flickr8k/Flickr8k.token.txt \\
        --images ../shared/data/flickr8k/images --encoder cnn --image-size 96 --lr 2e-3 --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch

from captioner.concepts import concept_loss_sum, concept_words
from captioner.config import preset
from captioner.data.images import Preprocess, load_image
from captioner.data.sources import load_samples
from captioner.data.vocab import Vocabulary
from captioner.models.captioner import CaptionModel


def preload(samples, vocab: Vocabulary, preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, S, S) and every caption token of each image, padded with <pad> (n, L)."""
    images = torch.stack([preprocess(load_image(s.path, min_side=preprocess.image_size)) for s in samples])
    tokens = [torch.tensor([i for c in s.captions for i in vocab.encode(c)]) for s in samples]
    words = torch.full((len(samples), max(len(t) for t in tokens)), vocab.pad_id, dtype=torch.long)
    for row, t in enumerate(tokens):
        words[row, : len(t)] = t
    return images, words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", default=None)
    parser.add_argument("--encoder", choices=("cnn", "vit"), default="cnn")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    samples = load_samples(args.data, image_dir=args.images)
    train = [s for s in samples if s.split == "train"][: args.train_images]
    val = [s for s in samples if s.split == "val"][: args.val_images]
    vocab = Vocabulary.build([c for s in train for c in s.captions], min_count=2)
    allowed = concept_words([s.captions for s in train], vocab)
    preprocess = Preprocess(args.image_size)
    started = time.perf_counter()
    train_x, train_y = preload(train, vocab, preprocess)
    val_x, val_y = preload(val, vocab, preprocess)
    print(f"{len(train)} train / {len(val)} val photos loaded in {time.perf_counter() - started:.0f} s")

    model = CaptionModel(preset("tiny", encoder=args.encoder, vocab_size=len(vocab), image_size=args.image_size,
                                concept_head=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    words = model.decoder.embed.weight  # the concept head scores against the tied word embeddings

    def concept_loss(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return concept_loss_sum(model.concepts(model.encode(images).memory, words), tokens, allowed) / len(images)

    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(train), (32,))
        loss = concept_loss(train_x[batch], train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            model.eval()
            with torch.no_grad():
                val_loss = float(concept_loss(val_x, val_y))
            model.train()
            print(f"step {step}: train {loss.item():.3f}  val {val_loss:.3f}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
