"""Configuration dataclasses: the model's shape, stored in every checkpoint so loading never asks again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from captioner.errors import ConfigError

ENCODERS = ("vit", "cnn")
SCORES = ("dot", "scaled_dot", "general", "additive")
CNN_ARCHS = ("resnet_small", "resnet18", "resnet34", "resnet50")
VIT_STEM_STRIDES = {"linear": 1, "conv": 4, "resnet": 16}  # how far each ViT stem downsamples before the patches


@dataclass
class ModelConfig:
    """Everything needed to rebuild a CaptionModel with identical parameter shapes."""

    encoder: str = "vit"  # "vit" (patches) or "cnn" (ResNet feature map flattened to regions)
    image_size: int = 96  # square side the preprocessing resizes to; the synthetic world renders at this size
    d_model: int = 128  # width D shared by encoder memory and decoder, so cross-attention needs no adapter
    n_heads: int = 4  # heads in every attention block; d_model must divide by it
    n_layers: int = 2  # decoder layers (masked self-attn -> cross-attn -> FFN)
    d_ff: int = 512  # hidden width of the feed-forward blocks (4*D is the usual ratio)
    dropout: float = 0.1  # on residual branches and embeddings; off at eval
    attn_dropout: float = 0.0  # on attention weights; 0 lets the fused SDPA kernel run (dropout forces the slow path)
    vocab_size: int = 64  # set from the Vocabulary when a run starts; the output layer is tied to the embedding
    pad_id: int = 0  # the vocabulary's <pad> id, so the embedding can keep it at zero
    cross_score: str = "scaled_dot"  # scoring function of decoder cross-attention: dot|scaled_dot|general|additive
    norm_first: bool = True  # pre-LN (stable without warm-up tricks); False = post-LN as in Vaswani et al.
    # ViT encoder
    patch_size: int = 12  # kernel = stride of the patch embedding; image_size / patch_size = grid side
    enc_layers: int = 2  # ViT encoder layers (pre-LN self-attention + MLP)
    vit_pos: str = "sinusoidal"  # "sinusoidal" (any grid size) or "learned" (interpolated for other sizes)
    cls_token: bool = False  # prepend a learned CLS slot; it is dropped from the memory the decoder sees
    vit_backbone: str = "ours"  # "ours" or "vit_b_16" (torchvision ViT-B/16 body, local weights only)
    # How our ViT embeds a patch: "linear" (one linear map of its pixels, Dosovitskiy et al.), "conv" (two
    # stride-2 3x3 convolutions first, Xiao et al. 2021) or "resnet" (the hybrid: patches of a stride-16 CNN
    # feature map, Dosovitskiy et al. section 3.1; 1x1 patches at patch_size 16). Same patch grid for all three.
    vit_stem: str = "linear"
    # CNN encoder
    cnn_arch: str = "resnet18"  # ResNet whose last feature map becomes the region sequence (resnet_small: ours)
    cnn_stride: int = 16  # 32 = all four stages; 16 drops layer4 so small images still give a useful grid
    pretrained: bool = False  # start the backbone from torchvision ImageNet weights (cache or backbone_weights)
    backbone_weights: str | None = None  # local state-dict file for the backbone; never downloaded
    freeze_backbone: bool = False  # keep backbone weights fixed (decided here, applied once in the encoder)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values that could not build a model, naming the allowed range."""
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.cross_score not in SCORES:
            raise ConfigError(f"cross_score must be one of {', '.join(SCORES)}, got {self.cross_score!r}")
        if self.cnn_arch not in CNN_ARCHS:
            raise ConfigError(f"cnn_arch must be one of {', '.join(CNN_ARCHS)}, got {self.cnn_arch!r}")
        if self.cnn_stride not in (16, 32):
            raise ConfigError(f"cnn_stride must be 16 or 32, got {self.cnn_stride}")
        if self.vit_pos not in ("sinusoidal", "learned"):
            raise ConfigError(f"vit_pos must be sinusoidal or learned, got {self.vit_pos!r}")
        if self.vit_stem not in VIT_STEM_STRIDES:
            raise ConfigError(f"vit_stem must be one of {', '.join(VIT_STEM_STRIDES)}, got {self.vit_stem!r}")
        if self.vit_backbone not in ("ours", "vit_b_16"):
            raise ConfigError(f"vit_backbone must be ours or vit_b_16, got {self.vit_backbone!r}")
        for name in ("image_size", "d_model", "n_heads", "n_layers", "d_ff", "vocab_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0:
            raise ConfigError(f"enc_layers must be >= 0, got {self.enc_layers}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        stem_stride = VIT_STEM_STRIDES[self.vit_stem]
        if self.patch_size % stem_stride:
            raise ConfigError(f"the {self.vit_stem} stem downsamples by {stem_stride} before cutting patches: "
                              f"patch_size must be a multiple of {stem_stride}, got {self.patch_size}")
        if self.encoder == "vit" and self.vit_backbone == "ours" and self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


# Presets: `tiny` trains in minutes on a laptop CPU; `small` and `base` are for real datasets on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    # tiny has no dropout: it is for the built-in world, whose data is plentiful, and on a CPU dropout's
    # random masks cost about a sixth of the step time.
    # Its encoders are the ones that learned the world fastest per CPU second (1500-step runs, validation
    # caption accuracy, 1 thread): the compact ResNet 62 % (ResNet-18 costs 3.6x its FLOPs); for the ViT,
    # the hybrid with 1x1 patches of the stride-16 map 73.5 % (2x2 patches of the stride-8 map 40.5 %, one
    # Transformer layer instead of two 56 %), the conv stem 32 %, the conv stem on 16 px patches 27 %.
    "tiny": dict(d_model=128, n_heads=4, n_layers=2, d_ff=512, enc_layers=2, dropout=0.0, vit_stem="resnet",
                 patch_size=16, cnn_arch="resnet_small"),
    "small": dict(d_model=256, n_heads=4, n_layers=3, d_ff=1024, enc_layers=4),
    "base": dict(d_model=512, n_heads=8, n_layers=6, d_ff=2048, enc_layers=6, image_size=224, patch_size=16),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a named preset, with any field overridden."""
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass
class TrainConfig:
    """Options of one training run; stored in the run directory so a resume repeats them exactly."""

    preset: str = "tiny"
    encoder: str = "vit"
    data: str | None = None  # None = the built-in synthetic world
    images: str | None = None  # image folder for datasets whose annotations hold relative paths
    format: str = "auto"
    epochs: int | None = None  # None: DEFAULT_STEPS on the built-in world, 10 epochs on a dataset
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs when set)
    time_limit: float | None = None  # minutes; stop cleanly (validate, save) when reached. None: 9.5 on the world
    batch_size: int = 32  # images per step
    # Captions of each image per step, all decoded against one encoding of it (capped at the most any
    # training image has). The encoder dominates a step, so 5 references cost 1.3x (ViT) to 1.7x (CNN) one.
    captions_per_image: int = 5
    lr: float = 2e-3
    weight_decay: float = 0.01  # AdamW decay on weight matrices only; norms and biases are exempt
    # Linear warm-up (the seeds' schedule). 500 rather than 200: with 5 captions per image the ViT at 200
    # scored 84-90 % on the built-in world and 95 % at 500 (two seeds); at batch 64 and 200 one ViT stalled.
    warmup_steps: int = 500
    schedule: str = "cosine"  # "cosine" (warm-up then half a cosine to 0) or "inverse_sqrt" (then 1/sqrt(step))
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    val_every: int | None = None  # validate every N steps; None = once per epoch
    early_stop: int | None = None  # stop after this many validations without a CIDEr improvement
    scheduled_sampling: float = 0.0  # final probability of feeding the model's own token (ramped linearly)
    # Scenes in the built-in world's splits. 30 000 training scenes: with 10 000 the default CNN run peaked
    # at 89.5 % validation accuracy halfway and fell to ~80 % by the end as it learned the scenes by heart.
    synth_train: int = 30000
    synth_val: int = 200
    synth_test: int = 500
    synth_max_objects: int = 3  # 1 gives the one-object world (used to check attention grounding)
    min_count: int = 1
    max_len: int = 30
    workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # model config overrides (field=value)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    def resolved_steps(self, steps_per_epoch: int) -> int:
        """Total optimiser steps: --max-steps, else --epochs, else the default for the data."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        if self.data is None:
            return DEFAULT_STEPS[self.encoder]
        return 10 * steps_per_epoch

    def resolved_time_limit(self) -> float | None:
        """Minutes after which training stops cleanly (the built-in world's demo must end within 10)."""
        if self.time_limit is not None:
            return self.time_limit
        return 9.5 if self.data is None and self.max_steps is None and self.epochs is None else None


# Steps of a default run on the built-in world, sized so it ends within ~9 minutes on an idle 2-core CPU.
# On a slower or busier machine the time limit above fits the schedule to the minutes there are
# (training.TimeBudget), so the run still ends annealed rather than cut off mid-schedule.
DEFAULT_STEPS = {"vit": 4600, "cnn": 5500}
