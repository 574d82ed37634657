"""`captioner attend`: caption each image while recording where the decoder looked, then draw it.

The decoder's cross-attention of every generated word (T, L, H, N) is reduced to the chosen layer and
heads, folded onto the encoder grid (h, w), and handed to `overlay.write_attention`, which blends it over
the original, EXIF-upright image. For a ViT encoder the encoder's own view (attention rollout over its
self-attention layers) is added as one more panel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from captioner.api import Captioner, DecodeSettings
from captioner.errors import ImageError
from captioner.overlay import attention_rollout, check_layer, rollout_map, select_maps, write_attention


def encoder_rollout(captioner: Captioner, batch: torch.Tensor) -> np.ndarray | None:
    """The ViT encoder's attention rollout as an (h, w) map for a batch of one; None for a CNN."""
    if captioner.model.config.encoder != "vit":
        return None
    with torch.inference_mode():
        encoded = captioner.model.encode(batch, need_weights=True)
    if not encoded.attn or any(a is None for a in encoded.attn):
        return None
    layers = [a[0].float().cpu().numpy() for a in encoded.attn]  # per layer (H, N', N')
    return rollout_map(attention_rollout(layers), encoded.grid)


def explain_files(captioner: Captioner, paths: list[Path], settings: DecodeSettings, *, out: Path | None,
                  layer: int | str = -1, heads: str = "mean", rollout: bool = True
                  ) -> tuple[list[tuple[Path, str, dict[str, Path]]], list[ImageError]]:
    """Write attention overlays for each image; unreadable images are returned as errors, not raised.

    Output goes to `out` or, by default, to a folder named after each image beside it.
    """
    from captioner.data.images import load_image

    check_layer(layer, captioner.model.config.n_layers)  # before any image is decoded or file written
    written: list[tuple[Path, str, dict[str, Path]]] = []
    failures: list[ImageError] = []
    for path in paths:
        try:
            image = load_image(path)  # the original, EXIF-upright: overlays are drawn on this, not the squashed square
        except ImageError as err:
            failures.append(err)
            continue
        batch = captioner.preprocess(image)[None].to(captioner.device)  # (1, 3, S, S)
        caption = captioner.caption_tensor(batch, settings, need_weights=True)[0]
        words = caption.words
        assert caption.cross is not None and caption.grid is not None
        cross = caption.cross[: len(words)].numpy()  # (T, L, H, N): drop the <eos> step
        maps = select_maps(cross, caption.grid, layer=layer, heads=heads)  # (T, h, w) or (T, H, h, w)
        extra = {}
        if rollout:
            encoder_map = encoder_rollout(captioner, batch)
            if encoder_map is not None:
                extra["encoder rollout"] = encoder_map
        meta = {"image": str(path), "caption": caption.text, "logprob": caption.logprob, "layer": layer,
                "heads": heads, "beam": settings.beam, "model": str(captioner.run.run_dir)}
        target = out if out is not None else path.parent / f"{path.stem}_attention"
        files = write_attention(target, path.stem, image, words, maps, extra_panels=extra, meta=meta)
        written.append((path, caption.text, files))
    return written, failures
