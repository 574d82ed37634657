"""Configuration dataclasses: the model's shape, stored in every checkpoint so loading never asks again."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from captioner.errors import ConfigError


# The choices of every option that has a fixed set, defined once: the CLI shows them as `--x [a|b]`,
# the dataclasses below validate against them.
class EncoderChoice(str, Enum):  # `Encoder` is the model's module (models/encoders.py)
    vit = "vit"
    cnn = "cnn"


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"


class ScoreChoice(str, Enum):  # `Score` is the attention's module (models/attention.py)
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
                  "word choice keeps full precision. auto: bf16 where it is the faster (recent GPUs; CPUs "
                  "with AMX, or AMD's AVX512-BF16), else fp32.")


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


ENCODERS, PRESET_NAMES, SCORES = _values(EncoderChoice), _values(Preset), _values(ScoreChoice)
SCHEDULES = _values(Schedule)
FORMATS, DEVICES, PRECISIONS, BASELINES = _values(Format), _values(Device), _values(Precision), _values(Baseline)
SPLITS = _values(Split)
CNN_ARCHS = ("resnet_small", "resnet18", "resnet34", "resnet50")
TORCHVISION_CNN_ARCHS = CNN_ARCHS[1:]  # those torchvision publishes ImageNet weights for
VIT_STEM_STRIDES = {"linear": 1, "conv": 4, "resnet": 16}  # how far each ViT stem downsamples before the patches


# ----------------------------------------------------------------------------- checks shared by the configs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is a Python int: refuse it


def _is_number(value: Any) -> bool:
    # A huge int is finite (and math.isfinite would overflow on it); NaN and inf never are a setting.
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _allowed(low: float, high: float | None) -> str:
    return f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Refuse anything but an integer in [low, high] (high None: no upper bound), naming the field."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise ConfigError(f"{name} must be an integer {_allowed(low, high)}, got {value!r}")


def check_number(name: str, value: Any, low: float, high: float) -> None:
    """Refuse anything but a finite number in [low, high] (an integer counts), naming the field."""
    if not _is_number(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number {_allowed(low, high)}, got {value!r}")


def check_types(config: Any) -> None:
    """Refuse a str, bool or optional-str field holding another type: JSON and TOML can give any type anywhere."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "bool" and not isinstance(value, bool):  # "false" in a file is truthy: never guess
            raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        if f.type in ("str", "str | None") and not isinstance(value, str) and not (f.type != "str" and value is None):
            raise ConfigError(f"{f.name} must be a string{'' if f.type == 'str' else ' or null'}, got {value!r}")


@dataclass(frozen=True)
class OptionSpec:
    """What the command line and validation know of a config field, declared beside it by `option`."""

    help: str | None = None  # the --help text (None: the flag alone)
    low: float | None = None  # inclusive bounds of a number; high None = no upper bound
    high: float | None = None
    choices: type[Enum] | None = None  # the fixed set of values, shown as --x [a|b]
    flag: str | None = None  # the flag, where it is not the field's name (--images for image_dir)
    cli: bool = True  # False: no flag of its own in `captioner train` (a config file sets it; --set a model's)


def option(default: Any, help: str | None = None, **spec: Any) -> Any:
    """A config field declared once: its default, and the help, bounds and choices the CLI and validation use."""
    return field(default=default, metadata={"option": OptionSpec(help, **spec)})


def declared(config: Any) -> dict[str, OptionSpec]:
    """The `option` declarations of a config dataclass's fields, by field name."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(config) if "option" in f.metadata}


def check_bounds(config: Any) -> None:
    """Refuse a number outside the bounds its field declares; None passes where the field's type allows it."""
    for f in dataclasses.fields(config):
        spec, value, kind = f.metadata.get("option"), getattr(config, f.name), str(f.type)
        if spec is None or spec.low is None or (value is None and kind.endswith("| None")):
            continue
        check = check_int if kind.startswith("int") else check_number
        check(f.name, value, spec.low, spec.high)


@dataclass
class DecodeSettings:
    """How to search for captions: each option declared once (the CLI's flag, help and bounds); checked when made."""

    beam: int = option(1, "Beam size (1 = greedy).", low=1, high=64)
    max_len: int = option(30, "Longest caption in tokens.", low=1, high=500)
    length_penalty: float = option(0.0, "Beam search ranks by log p / length**this (0: log p, 1: per word).",
                                   low=0.0, high=5.0)
    no_repeat_ngram: int = option(0, "Never repeat an n-gram of this size (0: allowed).", low=0, high=10)
    sample: bool = option(False, "Sample instead of searching.")
    temperature: float = option(1.0, "Sampling temperature (< 1 sharper, > 1 flatter).", low=1e-3, high=100.0)
    top_k: int = option(0, "Sample among the K likeliest words only (0: all).", low=0)
    top_p: float = option(1.0, "Sample among the likeliest words whose probability reaches P.", low=1e-6, high=1.0)
    seed: int = option(0, "Seed of the sampling.")
    n_best: int = option(1, "Keep the N best captions of the beam per image (N <= --beam).", low=1, high=64)
    # Off is a way out should a driver refuse the recording: the step's kernels are then launched one by one.
    cuda_graph: bool = option(True, "On a GPU, replay each decoding step from a CUDA graph (same captions, fewer "
                                    "kernel launches).", flag="--cuda-graph/--no-cuda-graph")
    # Off by default: compiling costs seconds per batch shape, which only long jobs earn back (benchmarks/NOTES.md).
    compile: bool = option(False, "torch.compile the decoding step (fixed-size caches; the same captions): seconds "
                                  "to compile each batch shape (cached on disk), then faster or not by device and "
                                  "batch size (benchmarks/bench_compile.py).")

    def __post_init__(self) -> None:
        check_types(self)
        check_bounds(self)
        if self.n_best > self.beam or (self.n_best > 1 and self.sample):
            raise ConfigError(f"--n-best must be between 1 and --beam ({self.beam}) and needs beam search, "
                              f"got {self.n_best}")


MAX_PARAMETERS = 2e9  # 8 GB of float32 weights
MAX_GRID_SIDE = 128  # ViT patches a side: 16384 regions


@dataclass
class ModelConfig:
    """Everything needed to rebuild a CaptionModel with identical parameter shapes.

    The sizes declare their bounds (`option`): far beyond any captioner, yet a crafted config.json (a run
    directory from elsewhere) cannot make loading allocate a model the size of the machine. The fields
    with a flag of their own in `captioner train` declare its help too.
    """

    encoder: str = "vit"  # "vit" (patches) or "cnn" (ResNet feature map flattened to regions)
    # Square side the preprocessing resizes to; the synthetic world renders at this size.
    image_size: int = option(96, low=1, high=1024)
    # Width D shared by encoder memory and decoder, so cross-attention needs no adapter.
    d_model: int = option(128, low=1, high=8192, cli=False)
    n_heads: int = option(4, low=1, high=256, cli=False)  # heads in every attention block; d_model must divide by it
    n_layers: int = option(2, low=1, high=64, cli=False)  # decoder layers (masked self-attn -> cross-attn -> FFN)
    # Hidden width of the feed-forward blocks (4*D is the usual ratio).
    d_ff: int = option(512, low=1, high=65536, cli=False)
    dropout: float = 0.1  # on residual branches and embeddings; off at eval
    attn_dropout: float = 0.0  # on attention weights; 0 lets the fused SDPA kernel run (dropout forces the slow path)
    # Set from the Vocabulary when a run starts; the output layer is tied to the embedding.
    vocab_size: int = option(64, low=1, high=1_000_000, cli=False)
    pad_id: int = 0  # the vocabulary's <pad> id, so the embedding can keep it at zero
    # Scoring function of decoder cross-attention.
    cross_score: str = option("scaled_dot", "Cross-attention scoring function.", choices=ScoreChoice)
    norm_first: bool = True  # pre-LN (stable without warm-up tricks); False = post-LN as in Vaswani et al.
    # ViT encoder
    # Kernel = stride of the patch embedding; image_size / patch_size = grid side.
    patch_size: int = option(12, "ViT patch side (divides image size).", low=1, high=256)
    enc_layers: int = option(2, low=0, high=64, cli=False)  # ViT encoder layers (pre-LN self-attention + MLP)
    # "sinusoidal" (any grid size) or "learned" (interpolated for other sizes)
    vit_pos: str = option("sinusoidal", "ViT positions: sinusoidal or learned.")
    # Prepend a learned CLS slot; it is dropped from the memory the decoder sees.
    cls_token: bool = option(False, "ViT CLS slot.", flag="--cls-token/--no-cls-token")
    # "ours" or "vit_b_16" (torchvision ViT-B/16 body, which has ImageNet weights)
    vit_backbone: str = option("ours", "ours or vit_b_16 (torchvision body, local weights).")
    # How our ViT embeds a patch: "linear" (one linear map of its pixels, Dosovitskiy et al.), "conv" (two
    # stride-2 3x3 convolutions first, Xiao et al. 2021) or "resnet" (the hybrid: patches of a stride-16 CNN
    # feature map, Dosovitskiy et al. section 3.1; 1x1 patches at patch_size 16). Same patch grid for all three.
    vit_stem: str = "linear"
    # CNN encoder
    # ResNet whose last feature map becomes the region sequence (resnet_small: ours).
    cnn_arch: str = option("resnet18", "resnet_small, resnet18, resnet34 or resnet50.")
    # 32 = all four stages; 16 drops layer4 so small images still give a useful grid.
    cnn_stride: int = option(16, "CNN output stride: 16 or 32.")
    # Start the backbone from torchvision's ImageNet weights: backbone_weights, else torchvision's cache, else
    # downloaded into that cache as torchvision does.
    pretrained: bool = option(False, "Start the encoder from torchvision's ImageNet weights: --backbone-weights, "
                              "else torchvision's cache, else downloaded into it. A preset encoder without such "
                              "weights (tiny's) becomes resnet50 (cnn) or vit_b_16 (vit) at 224 px, unless "
                              "--cnn-arch/--image-size say otherwise.", flag="--pretrained/--scratch")
    # A local state-dict file for the backbone (read, never downloaded).
    backbone_weights: str | None = option(None, "Local state-dict file of the backbone (e.g. torchvision's "
                                          "resnet50-11ad3fa6.pth); never downloaded. Implies a torchvision "
                                          "backbone as --pretrained does.")
    # Keep backbone weights fixed (decided here, applied once in the encoder).
    freeze_backbone: bool = option(False, flag="--freeze-backbone/--finetune-backbone")
    # A head that predicts from the pooled memory which words the image's captions contain, trained beside
    # the captions (--concept-loss): set from the training options, unused at inference.
    concept_head: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values that could not build a model, or would build one too big to load, naming the allowed range."""
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.cross_score not in SCORES:
            raise ConfigError(f"cross_score must be one of {', '.join(SCORES)}, got {self.cross_score!r}")
        if self.cnn_arch not in CNN_ARCHS:
            raise ConfigError(f"cnn_arch must be one of {', '.join(CNN_ARCHS)}, got {self.cnn_arch!r}")
        if self.cnn_stride not in (16, 32) or not _is_int(self.cnn_stride):
            raise ConfigError(f"cnn_stride must be 16 or 32, got {self.cnn_stride!r}")
        if self.vit_pos not in ("sinusoidal", "learned"):
            raise ConfigError(f"vit_pos must be sinusoidal or learned, got {self.vit_pos!r}")
        if self.vit_stem not in tuple(VIT_STEM_STRIDES):  # a tuple: `[] in dict` raises TypeError (unhashable)
            raise ConfigError(f"vit_stem must be one of {', '.join(VIT_STEM_STRIDES)}, got {self.vit_stem!r}")
        if self.vit_backbone not in ("ours", "vit_b_16"):
            raise ConfigError(f"vit_backbone must be ours or vit_b_16, got {self.vit_backbone!r}")
        check_types(self)  # after the choices, whose messages name what is allowed
        check_bounds(self)
        check_int("pad_id", self.pad_id, 0, self.vocab_size - 1)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
        self._check_vit()
        params = parameter_estimate(self)
        if params > MAX_PARAMETERS:
            raise ConfigError(f"this model would have about {params:.3g} parameters, more than the "
                              f"{MAX_PARAMETERS:.0e} allowed: lower d_model, d_ff, n_layers, enc_layers or vocab_size")

    def _check_vit(self) -> None:
        stem_stride = VIT_STEM_STRIDES[self.vit_stem]
        if self.patch_size % stem_stride:
            raise ConfigError(f"the {self.vit_stem} stem downsamples by {stem_stride} before cutting patches: "
                              f"patch_size must be a multiple of {stem_stride}, got {self.patch_size}")
        if self.vit_stem == "conv" and self.d_model < 4:  # its convolutions are d_model/4 and /2 wide
            raise ConfigError(f"the conv stem needs d_model >= 4, got {self.d_model}")
        if self.encoder == "vit" and self.vit_backbone == "ours":
            if self.image_size % self.patch_size:
                raise ConfigError(
                    f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
                )
            side = self.image_size // self.patch_size
            if side > MAX_GRID_SIDE:  # every region attends to every other: cost grows with side**4
                raise ConfigError(f"image_size / patch_size must be at most {MAX_GRID_SIDE} patches a side, got "
                                  f"{self.image_size} / {self.patch_size} = {side}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict` output; unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a table of field = value, got {_short(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {_names(unknown)}")
        return cls(**data)


def parameter_estimate(cfg: ModelConfig) -> float:
    """Parameters the config asks for, from above (torchvision backbones add a fixed <= 90M); no model is built."""
    D, F = float(cfg.d_model), float(cfg.d_ff)
    decoder = cfg.n_layers * (10 * D * D + 2 * D * F)  # self- and cross-attention (+ a general score), FFN
    encoder = cfg.enc_layers * (4 * D * D + 2 * D * F) if cfg.encoder == "vit" else 0.0
    stem = 128 * cfg.patch_size ** 2 * D + (cfg.image_size // cfg.patch_size) ** 2 * D  # widest stem, positions
    return decoder + encoder + stem + cfg.vocab_size * D


def _name(key: Any) -> str:
    """An option name for a message; one that is not a plain word is quoted, so the message stays one line."""
    key = str(key)
    return key if key.replace("-", "_").isidentifier() else repr(key)


def _names(keys: Any) -> str:
    return ", ".join(map(_name, sorted(map(str, keys))))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    if name not in PRESET_NAMES:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# Training options saved under an earlier name by older runs, so they still resume: old name -> new name.
RENAMED = {"images": "image_dir"}

# Model fields that are not options: the vocabulary sets them when a run starts (the concept head: --concept-loss).
FROM_VOCABULARY = ("vocab_size", "pad_id")
DERIVED_MODEL_FIELDS = (*FROM_VOCABULARY, "concept_head")


@dataclass
class TrainConfig:
    """Options of one training run; stored in the run directory so a resume repeats them exactly.

    Every field but `extra` is declared with `option`: `captioner train` builds its flags from these
    declarations (help, bounds, choices), and `validate` enforces the same bounds on config files and on
    a resumed run's config.json, so no path can pass what the flag refuses. Step counts stop at 1e9: far
    beyond any run, yet no file can ask for a count no loop could reach.
    """

    encoder: str = option("vit", "Image encoder: CNN feature map or ViT patches.", choices=EncoderChoice)
    preset: str = option("tiny", "Model size preset.", choices=Preset)
    data: str | None = option(None, "Dataset annotations (COCO/Karpathy JSON, Flickr8k token file, CSV, JSONL). "
                              "Default: the built-in synthetic world.")
    image_dir: str | None = option(None, "Image folder for the dataset's relative paths.", flag="--images")
    format: str = option("auto", "Dataset format (auto-detected by default).", choices=Format)
    # A separate validation file, e.g. COCO's captions_val2017.json (its own image folder: val_images);
    # the training file is then all training data unless it names its own splits.
    val_data: str | None = option(None, "A separate validation file (e.g. COCO's captions_val2017.json); --data "
                                  "is then all training.")
    val_images: str | None = option(None, "Image folder of --val-data.")
    # None: DEFAULT_STEPS on the built-in world, at most DATASET_MAX_EPOCHS on a dataset (early stop ends it sooner)
    epochs: int | None = option(None, "Passes over the training split.", low=1, high=10**9)
    max_steps: int | None = option(None, "Stop after this many steps.", low=1, high=10**9)  # overrides epochs
    # Minutes; stop cleanly (validate, save) when reached. None: 9.5 on the world (resolved_time_limit).
    time_limit: float | None = option(None, "Minutes; stop cleanly when reached (default 9.5 for the built-in "
                                      "world). Without --max-steps/--epochs the schedule is fitted to it.",
                                      low=0.1, high=1e7)
    batch_size: int = option(32, "Images per forward pass (per process).", low=1, high=4096)
    # Batches whose gradients add up to one optimiser step: a step of batch_size * accumulate images
    # (per process) in the memory of batch_size.
    accumulate: int = option(1, "Batches per optimiser step (gradient accumulation: a larger batch in the same "
                             "memory).", low=1, high=1024)
    # Captions of each image per step, all decoded against one encoding of it (capped at the most any
    # training image has): the encoder dominates a step, so more references per image come cheap.
    captions_per_image: int = option(5, "Captions of each image trained on per step (encoded once; default 5).",
                                     low=1, high=64)
    lr: float = option(2e-3, "Peak learning rate.", low=0.0, high=1.0)
    # AdamW decay on weight matrices only; norms and biases are exempt.
    weight_decay: float = option(0.01, low=0.0, high=10.0)
    # Linear warm-up (the seeds' schedule), long enough that Adam's early, poorly estimated steps stay
    # small: at 200 steps some runs stalled on the built-in world (benchmarks/NOTES.md).
    warmup_steps: int = option(500, "Linear warm-up steps (default 500).", low=0, high=10**9)
    # "cosine" (warm-up then half a cosine to 0) or "inverse_sqrt" (then 1/sqrt(step))
    schedule: str = option("cosine", "Decay after warm-up.", choices=Schedule)
    label_smoothing: float = option(0.0, low=0.0, high=0.99)
    # Largest gradient norm a step applies; 0 = no clipping (not "zero every gradient").
    grad_clip: float = option(1.0, low=0.0, high=1e9)
    seed: int = option(0, low=0, high=2**32 - 1)  # 2**32 - 1: the largest seed every RNG takes
    device: str = option("auto", choices=Device)  # a config file may also say cuda:N
    precision: str = option("auto", PRECISION_HELP, choices=Precision)  # one meaning in training and inference
    compile: bool = option(False, "torch.compile the model.")
    val_every: int | None = option(None, "Validate every N steps (default: each epoch).", low=1, high=10**9)
    # Stop after this many validations without improving `best`. None: DATASET_PATIENCE on a dataset
    # trained for its default length (so it trains until it stops improving), never on the built-in world.
    early_stop: int | None = option(None, "Stop after N validations without gain (default on a dataset: 3, when "
                                    "neither --epochs nor --max-steps is given).", low=1, high=10**9)
    # Final probability of feeding the model's own token (ramped linearly).
    scheduled_sampling: float = option(0.0, "Final prob. of feeding own tokens.", low=0.0, high=1.0)
    # Weight of the visual-concept loss (Fang et al. 2015): the encoder must say which words the image's
    # captions contain, a direct signal to an encoder trained from scratch, which the caption loss alone
    # reaches only through the decoder. 0 = off (and no concept head in the model).
    concept_loss: float = option(0.0, "Weight of the loss that asks the image which words its captions contain; "
                                 "0 = off.", low=0.0, high=100.0)
    # Scenes in the built-in world's splits: enough training scenes that the default runs cannot learn
    # them by heart before the schedule ends.
    synth_train: int = option(30000, low=1, high=10**7, cli=False)
    synth_val: int = option(200, low=0, high=10**7, cli=False)
    synth_test: int = option(500, low=0, high=10**7, cli=False)
    # 1 gives the one-object world (used to check attention grounding)
    synth_max_objects: int = option(3, low=1, high=3, cli=False)
    # Words seen fewer times than this in the training captions become <unk>. None: 1 on the built-in
    # world; on a dataset 5 from LARGE_DATASET captions on (Karpathy's threshold for COCO/Flickr), else 2:
    # a word seen once cannot be learned, and each one widens the output layer.
    min_count: int | None = option(None, "Words seen fewer times become <unk> (default: 5 on large datasets, 2 on "
                                   "small, 1 on the built-in world).", low=1)
    # At most this many words (the most frequent), specials included.
    max_vocab: int = option(10000, "Vocabulary size cap (default 10000).", low=5, high=10**7)
    max_len: int = option(30, low=1, high=500, cli=False)  # longest training caption in tokens
    # The pretrained backbone's learning rate. None: BACKBONE_LR_SHARE of --lr, since ImageNet features
    # fine-tuned at the decoder's rate are damaged before the decoder has learned to use them.
    backbone_lr: float | None = option(None, "Peak learning rate of a pretrained backbone (default: 0.1 x --lr).",
                                       low=0.0, high=1.0)
    # Train the decoder alone on a frozen backbone this many epochs first.
    freeze_backbone_epochs: int = option(0, "Epochs on a frozen backbone before it fine-tunes.", low=0, high=10**6)
    # With a backbone frozen for the whole run (--freeze-backbone) on a dataset, compute each training
    # image's backbone features once and reuse them every epoch and run (feature_cache.py; un-augmented).
    feature_cache: bool = option(True, "With --freeze-backbone: compute each training image's backbone features "
                                 "once and reuse them (no augmentation); default on.")
    # DataLoader worker processes; None: 0 on the built-in world (its scenes are rendered once and cached in
    # the main process), else a share of the cores, so decoding photos never starves the step.
    workers: int | None = option(None, "Processes decoding images for training (default: a share of the cores "
                                 "for datasets, 0 for the built-in world).", low=0, high=256)
    extra: dict[str, Any] = field(default_factory=dict)  # model config overrides (field=value)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse any value that could fail later in the run, naming the option and what it allows."""
        for name, allowed in TRAIN_CHOICES.items():
            value = getattr(self, name)
            cuda_n = name == "device" and isinstance(value, str) and re.fullmatch(r"cuda:\d+", value)
            if value not in allowed and not cuda_n:
                also = " (or cuda:N)" if name == "device" else ""
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}{also}, got {value!r}")
        check_types(self)  # after the choices, whose messages name what is allowed
        check_bounds(self)
        self.model_config()  # the model options must build a model too

    def model_config(self, *, vocab_size: int = 64, pad_id: int = 0) -> ModelConfig:
        """The model these options describe: preset, encoder, then the overrides in `extra`."""
        if not isinstance(self.extra, dict):
            raise ConfigError(f"model options must be a table of field = value, got {self.extra!r}")
        for name in DERIVED_MODEL_FIELDS:
            if name in self.extra:
                source = "--concept-loss" if name == "concept_head" else "the vocabulary"
                raise ConfigError(f"model option {name} is set from {source}; drop it")
        if "encoder" in self.extra:
            raise ConfigError("choose the encoder with --encoder (or `encoder` at the top of a config file), "
                              "not as a model option")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = set(self.extra) - known
        if unknown:
            raise ConfigError(f"unknown model options: {_names(unknown)} "
                              f"(known: {', '.join(sorted(known - set(DERIVED_MODEL_FIELDS) - {'encoder'}))})")
        try:
            return preset(self.preset, encoder=self.encoder, vocab_size=vocab_size, pad_id=pad_id,
                          concept_head=self.concept_loss > 0, **self.extra)
        except TypeError as err:  # a value of the wrong type (a string where a number belongs)
            raise ConfigError(f"model options: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict of options; unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise ConfigError(f"training options must be a table of option = value, got {_short(data)}")
        data = {RENAMED.get(k, k): v for k, v in data.items()}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training options: {_names(unknown)}")
        return cls(**data)

    def resolved_steps(self, steps_per_epoch: int) -> int:
        """Total optimiser steps: --max-steps, else --epochs, else the default for the data."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        if self.data is None:
            return DEFAULT_STEPS[self.encoder]
        return DATASET_MAX_EPOCHS * steps_per_epoch  # a cap: early stop or the time limit ends it sooner

    def default_length(self) -> bool:
        """Neither --max-steps nor --epochs: the run's length is the data's default, fitted to any time limit."""
        return self.max_steps is None and self.epochs is None

    def resolved_early_stop(self) -> int | None:
        """Validations without improvement before stopping (see the field)."""
        if self.early_stop is not None:
            return self.early_stop
        return DATASET_PATIENCE if self.data is not None and self.default_length() else None

    def resolved_min_count(self, n_captions: int) -> int:
        """The vocabulary threshold for this many training captions (see the field)."""
        if self.min_count is not None:
            return self.min_count
        if self.data is None:
            return 1
        return 5 if n_captions >= LARGE_DATASET else 2

    def resolved_backbone_lr(self) -> float:
        """The pretrained backbone's peak learning rate (see the field)."""
        return self.backbone_lr if self.backbone_lr is not None else self.lr * BACKBONE_LR_SHARE

    def resolved_time_limit(self) -> float | None:
        """Minutes after which training stops cleanly (the built-in world's demo must end within 10)."""
        if self.time_limit is not None:
            return self.time_limit
        return 9.5 if self.data is None and self.max_steps is None and self.epochs is None else None


# What the fields' declarations say, gathered for `validate` and the CLI: the options, their types, the
# bounds of the integers and of the other numbers (inclusive; high None = no upper bound), the choices.
TRAIN_OPTIONS = declared(TrainConfig)
TRAIN_TYPES: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}  # "int | None"
TRAIN_INTS: dict[str, tuple[Any, Any]] = {name: (o.low, o.high) for name, o in TRAIN_OPTIONS.items()
                                          if o.low is not None and TRAIN_TYPES[name].startswith("int")}
TRAIN_NUMBERS: dict[str, tuple[Any, Any]] = {name: (o.low, o.high) for name, o in TRAIN_OPTIONS.items()
                                             if o.low is not None and TRAIN_TYPES[name].startswith("float")}
TRAIN_CHOICES = {name: _values(o.choices) for name, o in TRAIN_OPTIONS.items() if o.choices is not None}


# Steps of a default run on the built-in world, sized so it ends within ~9 minutes on an idle 2-core CPU.
# On a slower or busier machine the time limit above fits the schedule to the minutes there are
# (training.TimeBudget), so the run still ends annealed rather than cut off mid-schedule.
DEFAULT_STEPS = {"vit": 4600, "cnn": 5500}
# A dataset's default run: at most this many epochs (Flickr8k's 6,000 photos: well under an hour on a 2-core
# CPU), ended earlier by DATASET_PATIENCE validations (one per epoch) without improvement in its second half,
# or fitted to --time-limit. benchmarks/NOTES.md has the runs behind them.
DATASET_MAX_EPOCHS = 20
DATASET_PATIENCE = 3
LARGE_DATASET = 40_000  # training captions from which rare words are cut at 5 (Flickr8k has 30k, COCO 590k)
BACKBONE_LR_SHARE = 0.1
# A dataset's defaults where they differ from the built-in world's (applied by `resolve`, under anything the
# user sets): a few thousand photos are learned by heart without dropout and label smoothing, and an encoder
# trained from scratch sees them only with the concept loss (benchmarks/NOTES.md, "Real photographs").
PHOTO_DEFAULTS: dict[str, Any] = dict(label_smoothing=0.1, concept_loss=1.0)
PHOTO_MODEL_DEFAULTS: dict[str, Any] = dict(dropout=0.1)


@dataclass
class SCSTConfig:
    """What self-critical fine-tuning adds to the training options (which it shares: steps, lr, batch ...)."""

    # Captions sampled per image (K).
    samples: int = option(5, "SCST: captions sampled per image.", low=1, high=256, flag="--scst-samples")
    # "mean" of the image's other samples, or its "greedy" caption's reward.
    baseline: str = option("mean", "SCST: reward baseline, the mean of the image's other samples or its greedy "
                           "caption.", choices=Baseline, flag="--scst-baseline")
    # Of the sampling distribution; the bounds of `caption --temperature`.
    temperature: float = option(1.0, low=1e-3, high=100.0, cli=False)

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        check_bounds(self)
        if self.samples < 2 and self.baseline == "mean":
            raise ConfigError("the mean baseline needs at least 2 samples per image")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)


# Training options SCST starts from when the command line does not give them: the model is already good,
# so a small constant learning rate only re-ranks what it can say.
SCST_DEFAULTS: dict[str, Any] = dict(epochs=2, max_steps=None, batch_size=16, accumulate=1, lr=2e-5,
                                     warmup_steps=0,
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
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: could not read ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err})") from err
    try:
        if path.suffix == ".toml":
            import tomllib  # only when a TOML file is given: start-up stays light

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: thousands of nested brackets
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
    notes: list[str] = field(default_factory=list)  # what resolving changed on the user's behalf, for the CLI


def resolve(*, cli: dict[str, Any], model_cli: dict[str, Any], config_file: Path | None = None,
            saved: dict[str, Any] | None = None, scst: dict[str, Any] | None = None) -> Resolved:
    """One place that merges options: defaults < the resumed run's < config file < command line.

    `cli` and `model_cli` hold the options given on the command line (None = not given); `saved` is the
    config.json of the run being resumed (or, with `scst`, of the run SCST fine-tunes), whose model is kept.
    """
    given = {k: (v.value if isinstance(v, Enum) else v) for k, v in cli.items() if v is not None}
    model_given = {k: (v.value if isinstance(v, Enum) else v) for k, v in model_cli.items() if v is not None}
    options = read_options_file(config_file) if config_file is not None else {}
    model_options = _table(options.pop("model", None), "model")
    model_options.update(_table(options.pop("extra", None), "extra"))
    options.update(given)
    model_options.update(model_given)
    if scst is not None:
        return _resolve_scst(options, model_options, saved, scst)
    if saved is not None:
        if model_options:
            raise ConfigError("a resumed run keeps its model; drop the model options "
                              f"({_names(model_options)})")
        # The command line may extend a run or change its device.
        merged = {**_table(saved.get("train"), "train"), **options}
        return Resolved(TrainConfig.from_dict(merged), ModelConfig.from_dict(saved.get("model")))
    note = _pretrained_switch(options, model_options)
    if options.get("data") is not None:  # a dataset of photos: its defaults where the user chose nothing
        options = {**PHOTO_DEFAULTS, **options}
        model_options = {**PHOTO_MODEL_DEFAULTS, **model_options}
    cfg = TrainConfig.from_dict({**options, "extra": model_options})
    return Resolved(cfg, cfg.model_config(), notes=[note] if note else [])


# What --pretrained switches a preset's encoder to when it has no ImageNet weights: torchvision's most
# used ResNet, or its ViT-B/16, at the resolution those weights were trained at (Preprocess already
# normalises with ImageNet's mean and std, the weights' own).
PRETRAINED_CNN = "resnet50"
PRETRAINED_IMAGE_SIZE = 224
_PRETRAINABLE = {"cnn": ("cnn_arch", TORCHVISION_CNN_ARCHS), "vit": ("vit_backbone", ("vit_b_16",))}


def _pretrained_switch(options: dict[str, Any], model_options: dict[str, Any]) -> str | None:
    """Give a fresh run that asks for pretrained weights an encoder that has them; the one-line note, or None.

    Only what the user left to the preset changes (`model_options`, edited in place, holds what the config
    file and command line chose): an explicit torchvision arch or image size is kept, and an explicit
    resnet_small or our own ViT is not switched (its own weights file may be meant; the encoder says more).
    """
    flag = "--pretrained" if model_options.get("pretrained") is True else "--backbone-weights"
    weights = model_options.get("backbone_weights")
    name, encoder = options.get("preset", "tiny"), options.get("encoder", "vit")
    if flag == "--backbone-weights" and not (isinstance(weights, str) and weights):
        return None
    if name not in PRESET_NAMES or encoder not in ENCODERS:  # tuples: an unhashable value just fails the test
        return None  # validation names the problem
    field_name, archs = _PRETRAINABLE[encoder]
    own = PRESETS[name].get(field_name, _field_default(field_name))
    chosen = model_options.get(field_name)
    if own in archs or (chosen is not None and chosen not in archs):
        return None
    size = model_options.get("image_size")
    if chosen is not None and size is not None:
        return None  # the user chose the arch and the size: nothing to switch
    arch = chosen or (PRETRAINED_CNN if encoder == "cnn" else "vit_b_16")
    size = PRETRAINED_IMAGE_SIZE if size is None else size
    model_options.update({field_name: arch, "image_size": size})
    if arch == "vit_b_16" and _is_int(size) and size % 16:
        raise ConfigError(f"{flag} uses torchvision's vit_b_16, whose 16-px patches need an image size "
                          f"divisible by 16, got {size}: drop --image-size or give a multiple of 16")
    described = own if encoder == "cnn" else "our own ViT"
    return (f"{flag}: the {name} preset's {encoder} encoder ({described}) has no ImageNet weights; using "
            f"torchvision {arch} at {size} px (ImageNet normalisation)")


def _field_default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(ModelConfig) if f.name == name)


def _resolve_scst(options: dict[str, Any], model_options: dict[str, Any], saved: dict[str, Any] | None,
                  scst: dict[str, Any]) -> Resolved:
    """SCST fine-tunes a trained run as it is: its data and model, with SCST's own defaults for the rest."""
    if saved is None:
        raise ConfigError("--scst fine-tunes a trained run: give it with --resume RUN_DIR")
    unused = sorted(k for k in options if k not in SCST_OPTIONS) + sorted(model_options)
    if unused:
        flags = ", ".join(_name("--" + str(k).replace("_", "-")) for k in unused)
        raise ConfigError(f"{flags}: not used by --scst, which fine-tunes the run as it is "
                          f"(its options: {', '.join('--' + k.replace('_', '-') for k in SCST_OPTIONS)})")
    defaults = dict(SCST_DEFAULTS)
    if options.get("time_limit") is not None and "epochs" not in options and "max_steps" not in options:
        defaults["epochs"] = None  # the time given is used: the run's default length, cut by the clock
    merged = {**_table(saved.get("train"), "train"), **defaults, **options}
    unknown = set(scst) - {f.name for f in dataclasses.fields(SCSTConfig)}
    if unknown:
        raise ConfigError(f"unknown SCST options: {_names(unknown)}")
    return Resolved(TrainConfig.from_dict(merged), ModelConfig.from_dict(saved.get("model")),
                    SCSTConfig(**{k: v for k, v in scst.items() if v is not None}))


def _table(value: Any, name: str) -> dict[str, Any]:
    """A section of options (`model`, `extra`, a saved run's `train`) as a dict; absent = empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a table of option = value, got {_short(value)}")
    return dict(value)
