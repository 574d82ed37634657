"""The Python API: load a run, caption images. The CLI's `caption`, `attend` and `evaluate` use it too.

    from captioner import Captioner
    c = Captioner.load("runs/demo")
    print(c.caption("photo.jpg")[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from captioner.decoding import SearchOptions, beam_search, greedy, sample
from captioner.errors import ConfigError, ImageError

if TYPE_CHECKING:
    from PIL import Image

    from captioner.checkpoint import LoadedRun
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import CaptionModel


@dataclass
class Caption:
    """A caption of one image: its words, its log-probability, and optionally where it looked."""

    text: str
    words: list[str]
    logprob: float
    score: float  # what the search ranked by (equals logprob unless a length penalty was used)
    cross: torch.Tensor | None = None  # (T, L, H, N) decoder cross-attention per word (+ <eos> step)
    grid: tuple[int, int] | None = None  # (h, w): N = h*w regions of the encoder


@dataclass
class DecodeSettings:
    """How to search for captions; validated before any work starts."""

    beam: int = 1
    max_len: int = 30
    length_penalty: float = 0.0
    no_repeat_ngram: int = 0
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.beam <= 64:
            raise ConfigError(f"--beam must be between 1 and 64, got {self.beam}")
        if not 1 <= self.max_len <= 500:
            raise ConfigError(f"--max-len must be between 1 and 500, got {self.max_len}")
        if self.no_repeat_ngram < 0:
            raise ConfigError(f"--no-repeat-ngram must be >= 0, got {self.no_repeat_ngram}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


class Captioner:
    """A trained captioning model with its vocabulary and preprocessing, ready to caption images."""

    def __init__(self, run: LoadedRun, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.run = run
        # Reduced precision goes where it pays: the encoder, whose convolutions and matrix products are
        # compute-bound at any batch size (bf16: 3x faster on an AVX512-BF16 CPU). The decoder stays
        # float32: a decoding step of a few rows is bound by reading the weights, where this CPU's bf16
        # matrix-vector product is slower than float32's (benchmarks/bench_peers.py), and the word choice
        # keeps full precision. Converted once, so no step pays for a cast.
        self.model = run.model
        self.model.encoder.to(dtype)
        self.vocab = run.vocab
        self.preprocess = run.preprocess
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, run_dir: str | Path | None = None, *, device: str = "auto", which: str = "best",
             precision: str = "auto") -> Captioner:
        """Load a run directory (default: the newest under ./runs) for inference.

        precision: auto (bf16 where the GPU or CPU computes it natively, else fp32), fp32, bf16 or fp16 (CUDA).
        """
        from captioner.checkpoint import load_run
        from captioner.training import resolve_device, resolve_precision

        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        return cls(load_run(run_dir, which=which, device=str(dev)), dev, dtype)

    def to_tensor(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Open (via the one image loader) and preprocess images into a batch (B, 3, S, S)."""
        from captioner.data.images import load_image, to_tensor_batch

        pils = [load_image(im) if isinstance(im, (str, Path)) else im.convert("RGB") for im in images]
        return to_tensor_batch(pils, self.preprocess).to(self.device)

    def caption_tensor(self, batch: torch.Tensor, settings: DecodeSettings | None = None, *,
                       need_weights: bool = False) -> list[Caption]:
        """Caption an already preprocessed batch (B, 3, S, S)."""
        return decode_batch(self.model, self.vocab, batch.to(self.device), settings, need_weights=need_weights)

    def caption(self, images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
                settings: DecodeSettings | None = None, *, need_weights: bool = False,
                batch_size: int = 32) -> list[Caption]:
        """Caption one image or many (PIL images or paths), in batches of `batch_size`."""
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = [images]
        results: list[Caption] = []
        for i in range(0, len(images), batch_size):
            batch = self.to_tensor(images[i:i + batch_size])
            results.extend(self.caption_tensor(batch, settings, need_weights=need_weights))
        return results

    def caption_files(self, paths: Sequence[Path], settings: DecodeSettings | None = None, *,
                      batch_size: int = 32, need_weights: bool = False
                      ) -> tuple[list[tuple[Path, Caption]], list[ImageError]]:
        """Caption files in batches; a file that cannot be read is returned as an error, not raised."""
        from captioner.data.images import load_image

        results: list[tuple[Path, Caption]] = []
        failures: list[ImageError] = []
        for i in range(0, len(paths), batch_size):
            loaded = []
            for path in paths[i:i + batch_size]:
                try:
                    loaded.append((path, self.preprocess(load_image(path))))
                except ImageError as err:
                    failures.append(err)
            if loaded:
                batch = torch.stack([t for _, t in loaded])
                captions = self.caption_tensor(batch, settings, need_weights=need_weights)
                results.extend(zip([p for p, _ in loaded], captions, strict=True))
        return results, failures



def search_options(vocab: Vocabulary, max_len: int) -> SearchOptions:
    """Search options with the vocabulary's named specials (<bos> starts, <eos> ends, <pad>/<unk> banned)."""
    return SearchOptions(bos_id=vocab.bos_id, eos_id=vocab.eos_id, max_len=max_len, pad_id=vocab.pad_id,
                         unk_id=vocab.unk_id)


def decode_batch(model: CaptionModel, vocab: Vocabulary, batch: torch.Tensor,
                 settings: DecodeSettings | None = None, *, need_weights: bool = False) -> list[Caption]:
    """The one place that turns settings into a search: sampling, greedy, or beam search over a batch."""
    settings = settings or DecodeSettings()
    opts = search_options(vocab, settings.max_len)
    if settings.sample:
        g = torch.Generator(device=batch.device).manual_seed(settings.seed)
        hyps = [h[0] for h in sample(model, batch, opts, temperature=settings.temperature, top_k=settings.top_k,
                                     top_p=settings.top_p, generator=g)]
    elif settings.beam == 1 and settings.no_repeat_ngram == 0:
        hyps = greedy(model, batch, opts, need_weights=need_weights)
    else:
        hyps = beam_search(model, batch, opts, beam=settings.beam, length_penalty=settings.length_penalty,
                           no_repeat_ngram=settings.no_repeat_ngram, need_weights=need_weights)
    captions = []
    for h in hyps:
        text = vocab.decode(h.tokens)  # specials are never generated, so words align with h.cross
        captions.append(Caption(text, text.split(), h.logprob, h.score, h.cross, h.grid))
    return captions


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def collect_images(patterns: Sequence[str]) -> tuple[list[Path], list[ImageError]]:
    """Expand files, directories (their image files, sorted) and glob patterns into a list of paths.

    A pattern that matches nothing is reported as an ImageError; the caller decides whether to go on.
    """
    import glob

    paths: list[Path] = []
    problems: list[ImageError] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(ImageError(path, "directory holds no image files"))
            paths.extend(found)
        elif path.exists():
            paths.append(path)  # whatever it is, the image loader gives the precise reason if it is unusable
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(ImageError(pattern, "no image files match this pattern"))
            paths.extend(found)
        else:
            problems.append(ImageError(path, "file not found"))
    return list(dict.fromkeys(paths)), problems
