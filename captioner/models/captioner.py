"""CaptionModel: an image encoder (CNN or ViT) and a Transformer decoder that attends to its memory."""

from __future__ import annotations

import math

import torch
from torch import nn

from captioner.config import ModelConfig
from captioner.models.decoder import DecoderState, TransformerDecoder
from captioner.models.encoders import Encoded, build_encoder
from captioner.models.graphs import StepGraphs, Stepper
from captioner.models.kernels import Kernels, use_kernels

__all__ = ["CaptionModel", "DecoderState", "Encoded", "Kernels", "Stepper"]

# Parameters that AdamW must not decay: scales and shifts of norms, and vectors looked up rather than
# multiplied (embeddings, positions, the CLS slot). Decaying them pulls them to zero for no benefit.
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)
NO_DECAY_NAMES = ("pos_embedding", "cls_token", "class_token")


class CaptionModel(nn.Module):
    """Image captioner: encode images to memory (B, N, D), decode tokens with cross-attention to it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # Convolutions (the CNN, the ViT's patch embedding) keep channels-last (NHWC) weights: the layout
        # oneDNN and cuDNN run fastest.
        self.encoder = build_encoder(config).to(memory_format=torch.channels_last)
        self.decoder = TransformerDecoder(config)
        self.concepts = ConceptHead(config.d_model) if config.concept_head else None
        self.kernels = Kernels()  # the attention path of every layer; change it with use_kernels
        self.step_graphs = StepGraphs()  # static decoding states (CUDA graphs on a GPU), kept across calls
        self._init_weights()

    def _init_weights(self) -> None:
        # nanoGPT-style: small normal weights and zero biases, with the residual projections (to_out)
        # scaled down by the number of residual sums they feed, so the stream's variance does not grow
        # with depth. The torchvision backbone keeps its own init (or the pretrained weights just loaded).
        cfg = self.config
        for name, module in self.named_modules():
            if name.startswith("encoder.backbone") or module is self.decoder.head:  # head: tied to the embedding
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # Small, like the rest: the tied output layer then starts with near-zero logits, so the
                # first loss is ln(V) (a uniform guess) rather than a confident wrong one.
                nn.init.normal_(module.weight, std=0.02)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
        for name, p in self.named_parameters():
            if name.endswith("to_out.weight") and not name.startswith("encoder.backbone"):
                sums = 3 * cfg.n_layers if name.startswith("decoder.") else 2 * max(cfg.enc_layers, 1)
                nn.init.normal_(p, std=0.02 / math.sqrt(sums))

    def use_kernels(self, kernels: Kernels) -> CaptionModel:
        """Run every attention layer on the path `kernels` picks (fused SDPA or explicit); returns self."""
        use_kernels(self, kernels)
        return self

    # -- the two halves ---------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, *, need_weights: bool = False, from_features: bool = False) -> Encoded:
        """Images (B, 3, S, S) -> Encoded(memory (B, N, D), grid (h, w)); ViT self-attention if need_weights.

        from_features: `images` holds the backbone's feature maps (B, C, h, w) from `encoder.backbone_features`
        (a frozen-feature cache, captioner/feature_cache.py), so only the encoder's part after the backbone runs.
        Inputs are cast to the encoder's weight dtype and the memory to the decoder's, so an encoder
        converted to bf16 for inference (`Captioner`) takes float32 batches and feeds a float32 decoder
        (and fp16 cached features feed a float32 encoder). Under training autocast both hold float32
        weights and only cached features are cast here.
        """
        enc_dtype, dec_dtype = next(self.encoder.parameters()).dtype, self.decoder.embed.weight.dtype
        encoder = self.encoder.from_backbone if from_features else self.encoder
        encoded = encoder(images.to(enc_dtype), need_weights=need_weights)
        if enc_dtype != dec_dtype:
            encoded.memory = encoded.memory.to(dec_dtype)
        return encoded

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor, *, pad_mask: torch.Tensor | None = None,
               need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Whole-prefix pass (the naive path): logits (B, T, V), cross-attention weights (L, B, H, T, N) | None."""
        return self.decoder(tokens, memory, pad_mask=pad_mask, need_weights=need_weights)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, *, pad_mask: torch.Tensor | None = None,
                from_features: bool = False, with_concepts: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: images (B, 3, S, S), decoder inputs (B*K, T) (<bos> + caption) -> logits (B*K, T, V).

        K >= 1 captions per image, image-major (rows b*K .. b*K+K-1 describe image b): each image is
        encoded once, however many of its captions are trained on. from_features: `images` holds cached
        backbone features (B, C, h, w) instead (see `encode`; a batch says so in `Batch.holds_features`).
        with_concepts: also the concept head's word logits (B, V), as a pair (logits, concept logits).
        """
        assert tokens.shape[0] % images.shape[0] == 0, \
            f"{tokens.shape[0]} token rows are not a whole number of captions for each of {images.shape[0]} images"
        memory = self.encode(images, from_features=from_features).memory  # (B, N, D)
        logits, _ = self.decode(memory, tokens, pad_mask=pad_mask)
        if not with_concepts:
            return logits
        assert self.concepts is not None, "this model has no concept head (ModelConfig.concept_head)"
        return logits, self.concepts(memory, self.decoder.embed.weight)

    # -- incremental decoding ---------------------------------------------------------------------------

    def begin(self, memory: torch.Tensor, *, per_image: int = 1, static_len: int | None = None,
              record: bool = False, compiled: bool = False) -> Stepper:
        """The one way into incremental decoding: a `Stepper` over memory (B, N, D), per_image rows per image.

        static_len: fixed-size caches of that many positions, reused across calls of the same shape
        (graphs.py); None: caches that grow, made afresh. With fixed-size caches, record: the step replayed
        from a CUDA graph (a GPU's memory only); compiled: the step under torch.compile.
        """
        if static_len is None:
            assert not (record or compiled), "only fixed-size steps are recorded or compiled: give static_len"
            return Stepper(self.decoder, self.decoder.start(memory, per_image=per_image))
        assert not record or memory.device.type == "cuda", "CUDA graphs record steps on a GPU only"
        return self.step_graphs.stepper(self.decoder, memory, per_image=per_image, capacity=static_len,
                                        record=record, compiled=compiled)

    # -- optimisation -------------------------------------------------------------------------------------

    def parameter_groups(self, weight_decay: float, backbone_lr: float | None = None) -> list[dict]:
        """AdamW groups: decay on weight matrices; none on norms, biases, embeddings, positions, CLS slots.

        With `backbone_lr`, the pretrained backbone's parameters form groups of their own at that rate:
        ImageNet features need smaller steps than the freshly initialised decoder, or fine-tuning erases them.
        """
        exempt: set[int] = set()
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                # dim < 2: biases and norm scales; a tied weight is exempt if any of its owners says so.
                if isinstance(module, NO_DECAY_MODULES) or name in NO_DECAY_NAMES or p.dim() < 2:
                    exempt.add(id(p))
        backbone = self.encoder.backbone
        in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None and backbone_lr else set()
        params = list(self.parameters())  # each shared parameter once
        rest = [p for p in params if id(p) not in in_backbone]
        body = [p for p in params if id(p) in in_backbone]
        groups = [{"params": [p for p in rest if id(p) not in exempt], "weight_decay": weight_decay},
                  {"params": [p for p in rest if id(p) in exempt], "weight_decay": 0.0}]
        if body:
            groups += [{"params": [p for p in body if id(p) not in exempt], "weight_decay": weight_decay,
                        "lr": backbone_lr},
                       {"params": [p for p in body if id(p) in exempt], "weight_decay": 0.0, "lr": backbone_lr}]
        return groups


class ConceptHead(nn.Module):
    """Which words the image's captions contain, from the mean of its regions (Fang et al. 2015).

    Scored against the tied word embeddings, like the decoder's output layer: the words an image shows
    and the words the decoder says then share one space, so the signal reaches the captions directly.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, memory: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """memory (B, N, D), word embeddings (V, D) -> word logits (B, V)."""
        pooled = self.proj(self.norm(memory.mean(dim=1)))  # (B, D)
        return pooled @ words.t()  # (B, V)
