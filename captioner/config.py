"""Configuration dataclasses: the model's shape, stored in every checkpoint so loading never asks again."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from captioner.errors import ConfigError


# The choices of every option that has a fixed set, defined once: the CLI shows them as `--x [a|b]`,
# the dataclasses below validate against them.
class Encoder(str, Enum):
    vit = "vit"
    cnn = "cnn"


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"


class Score(str, Enum):
    dot = "dot"
    scaled_dot = "scaled_dot"
    general = "general"
    additive = "additive"


class Schedule(str, Enum):
    cosine = "cosine"
    inverse_sqrt = "inverse_sqrt"


class Format(str, Enum):
    auto = "auto"
    coco = "coco"
    karpathy = "karpathy"
    flickr8k = "flickr8k"
    csv = "csv"
    jsonl = "jsonl"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


# The one description of the precision words; `train`, `caption`, `attend` and `evaluate --help`
# show it, runtime.PrecisionPlan implements it.
PRECISION_HELP = ("fp32: everything in float32. bf16/fp16: matrix products in that type, where they pay: "
                  "training autocasts the model (weights and optimiser stay float32; fp16 adds a loss "
                  "scaler, CUDA only); inference stores the encoder in it and decodes in float32, so the "
                  "word choice keeps full precision. auto: bf16 where the GPU or CPU computes it natively, "
                  "else fp32.")


class Split(str, Enum):
    train = "train"
    val = "val"
    test = "test"


class Which(str, Enum):  # which weights of a run: kept by validation, or the latest
    best = "best"
    last = "last"


class Baseline(str, Enum):
    mean = "mean"
    greedy = "greedy"


def _values(choices: type[Enum]) -> tuple[str, ...]:
    return tuple(c.value for c in choices)


ENCODERS, PRESET_NAMES, SCORES, SCHEDULES = _values(Encoder), _values(Preset), _values(Score), _values(Schedule)
FORMATS, DEVICES, PRECISIONS, BASELINES = _values(Format), _values(Device), _values(Precision), _values(Baseline)
SPLITS = _values(Split)
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
# tiny's encoders are the ones that learned the built-in world fastest per CPU second, and it has no
# dropout since that world's data is plentiful (benchmarks/NOTES.md, "The tiny preset").
PRESETS: dict[str, dict[str, Any]] = {
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


# Training options saved under an earlier name by older runs, so they still resume: old name -> new name.
RENAMED = {"images": "image_dir"}

# Model fields that are not options: the vocabulary sets them when a run starts.
FROM_VOCABULARY = ("vocab_size", "pad_id")


@dataclass
class TrainConfig:
    """Options of one training run; stored in the run directory so a resume repeats them exactly."""

    preset: str = "tiny"
    encoder: str = "vit"
    data: str | None = None  # None = the built-in synthetic world
    image_dir: str | None = None  # image folder for datasets whose annotations hold relative paths (--images)
    format: str = "auto"
    epochs: int | None = None  # None: DEFAULT_STEPS on the built-in world, 10 epochs on a dataset
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs when set)
    time_limit: float | None = None  # minutes; stop cleanly (validate, save) when reached. None: 9.5 on the world
    batch_size: int = 32  # images per step
    # Captions of each image per step, all decoded against one encoding of it (capped at the most any
    # training image has): the encoder dominates a step, so more references per image come cheap.
    captions_per_image: int = 5
    lr: float = 2e-3
    weight_decay: float = 0.01  # AdamW decay on weight matrices only; norms and biases are exempt
    # Linear warm-up (the seeds' schedule), long enough that Adam's early, poorly estimated steps stay
    # small: at 200 steps some runs stalled on the built-in world (benchmarks/NOTES.md).
    warmup_steps: int = 500
    schedule: str = "cosine"  # "cosine" (warm-up then half a cosine to 0) or "inverse_sqrt" (then 1/sqrt(step))
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # one meaning in training and inference: PRECISION_HELP
    compile: bool = False
    val_every: int | None = None  # validate every N steps; None = once per epoch
    early_stop: int | None = None  # stop after this many validations without a CIDEr improvement
    scheduled_sampling: float = 0.0  # final probability of feeding the model's own token (ramped linearly)
    # Scenes in the built-in world's splits: enough training scenes that the default runs cannot learn
    # them by heart before the schedule ends.
    synth_train: int = 30000
    synth_val: int = 200
    synth_test: int = 500
    synth_max_objects: int = 3  # 1 gives the one-object world (used to check attention grounding)
    min_count: int = 1
    max_len: int = 30
    workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # model config overrides (field=value)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse any value that could fail later in the run, naming the option and what it allows."""
        for name, allowed in (("preset", PRESET_NAMES), ("encoder", ENCODERS), ("format", FORMATS),
                              ("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {self.device!r}")
        at_least = dict(batch_size=1, captions_per_image=1, warmup_steps=0, min_count=1, max_len=1, workers=0,
                        epochs=1, max_steps=1, val_every=1, early_stop=1, synth_train=1, synth_val=0,
                        synth_test=0, synth_max_objects=1)
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, low, high in (("lr", 0.0, 1.0), ("weight_decay", 0.0, 10.0), ("grad_clip", 0.0, 1e9),
                                ("label_smoothing", 0.0, 0.99), ("scheduled_sampling", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
        if self.time_limit is not None and (not isinstance(self.time_limit, (int, float)) or self.time_limit <= 0):
            raise ConfigError(f"time_limit must be a positive number of minutes, got {self.time_limit!r}")
        self.model_config()  # the model options must build a model too

    def model_config(self, *, vocab_size: int = 64, pad_id: int = 0) -> ModelConfig:
        """The model these options describe: preset, encoder, then the overrides in `extra`."""
        if not isinstance(self.extra, dict):
            raise ConfigError(f"model options must be a table of field = value, got {self.extra!r}")
        for name in FROM_VOCABULARY:
            if name in self.extra:
                raise ConfigError(f"model option {name} is set from the vocabulary; drop it")
        if "encoder" in self.extra:
            raise ConfigError("choose the encoder with --encoder (or `encoder` at the top of a config file), "
                              "not as a model option")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.extra) - known)
        if unknown:
            raise ConfigError(f"unknown model options: {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known - set(FROM_VOCABULARY) - {'encoder'}))})")
        try:
            return preset(self.preset, encoder=self.encoder, vocab_size=vocab_size, pad_id=pad_id, **self.extra)
        except TypeError as err:  # a value of the wrong type (a string where a number belongs)
            raise ConfigError(f"model options: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict of options; unknown keys are an error, not silently dropped."""
        data = {RENAMED.get(k, k): v for k, v in data.items()}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown training options: {', '.join(unknown)}")
        return cls(**data)

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


@dataclass
class SCSTConfig:
    """What self-critical fine-tuning adds to the training options (which it shares: steps, lr, batch ...)."""

    samples: int = 5  # captions sampled per image (K)
    baseline: str = "mean"  # "mean" of the image's other samples, or its "greedy" caption's reward
    temperature: float = 1.0  # of the sampling distribution

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.samples < 2 and self.baseline == "mean":
            raise ConfigError("the mean baseline needs at least 2 samples per image")
        if self.samples < 1 or self.temperature <= 0:
            raise ConfigError(f"SCST needs samples >= 1 and temperature > 0, got {self.samples}, {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)


# Training options SCST starts from when the command line does not give them: the model is already good,
# so a small constant learning rate only re-ranks what it can say.
SCST_DEFAULTS: dict[str, Any] = dict(epochs=2, max_steps=None, batch_size=16, lr=2e-5, warmup_steps=0,
                                     weight_decay=0.0, val_every=None, time_limit=None, early_stop=None,
                                     scheduled_sampling=0.0, label_smoothing=0.0, compile=False)
# The training options SCST reads; anything else on its command line is refused rather than ignored.
SCST_OPTIONS = ("epochs", "max_steps", "batch_size", "lr", "grad_clip", "seed", "device", "precision",
                "val_every", "max_len", "time_limit", "workers")


# ----------------------------------------------------------------------------- resolve


def read_options_file(path: Path) -> dict[str, Any]:
    """A TOML or JSON file of training options (model options under a `model` table)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib  # only when a TOML file is given: start-up stays light

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options at the top level")
    return data


@dataclass
class Resolved:
    """The validated configuration of a run about to start: its options and its model."""

    train: TrainConfig
    model: ModelConfig  # vocabulary fields are placeholders until the data is read (fresh runs)
    scst: SCSTConfig | None = None


def resolve(*, cli: dict[str, Any], model_cli: dict[str, Any], config_file: Path | None = None,
            saved: dict[str, Any] | None = None, scst: dict[str, Any] | None = None) -> Resolved:
    """One place that merges options: defaults < the resumed run's < config file < command line.

    `cli` and `model_cli` hold the options given on the command line (None = not given); `saved` is the
    config.json of the run being resumed (or, with `scst`, of the run SCST fine-tunes), whose model is kept.
    """
    given = {k: (v.value if isinstance(v, Enum) else v) for k, v in cli.items() if v is not None}
    model_given = {k: (v.value if isinstance(v, Enum) else v) for k, v in model_cli.items() if v is not None}
    options = read_options_file(config_file) if config_file is not None else {}
    model_options = dict(options.pop("model", None) or {})
    model_options.update(options.pop("extra", None) or {})
    options.update(given)
    model_options.update(model_given)
    if scst is not None:
        return _resolve_scst(options, model_options, saved, scst)
    if saved is not None:
        if model_options:
            raise ConfigError("a resumed run keeps its model; drop the model options "
                              f"({', '.join(sorted(model_options))})")
        merged = {**saved.get("train", {}), **options}  # the command line may extend a run or change device
        return Resolved(TrainConfig.from_dict(merged), ModelConfig.from_dict(saved["model"]))
    cfg = TrainConfig.from_dict({**options, "extra": model_options})
    return Resolved(cfg, cfg.model_config())


def _resolve_scst(options: dict[str, Any], model_options: dict[str, Any], saved: dict[str, Any] | None,
                  scst: dict[str, Any]) -> Resolved:
    """SCST fine-tunes a trained run as it is: its data and model, with SCST's own defaults for the rest."""
    if saved is None:
        raise ConfigError("--scst fine-tunes a trained run: give it with --resume RUN_DIR")
    unused = sorted(k for k in options if k not in SCST_OPTIONS) + sorted(model_options)
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ConfigError(f"{flags}: not used by --scst, which fine-tunes the run as it is "
                          f"(its options: {', '.join('--' + k.replace('_', '-') for k in SCST_OPTIONS)})")
    merged = {**saved.get("train", {}), **SCST_DEFAULTS, **options}
    return Resolved(TrainConfig.from_dict(merged), ModelConfig.from_dict(saved["model"]),
                    SCSTConfig(**{k: v for k, v in scst.items() if v is not None}))
