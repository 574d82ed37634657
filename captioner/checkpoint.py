"""Run directories: everything `caption`, `attend`, `evaluate` and `--resume` need, written atomically.

A run directory holds
    config.json          model config, vocabulary, preprocessing, training options (JSON, never pickle)
    model.safetensors    the best weights so far (by validation CIDEr-D; by accuracy on the built-in world)
    last.safetensors     the latest weights plus optimiser/schedule/RNG state, for an exact resume
    metrics.jsonl        one JSON object per validation
Every file is written to a temporary name in the same folder and renamed over the old one, so a kill
or a full disk at any moment leaves the previous version loadable. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from captioner.data.images import Preprocess
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import CaptionModel

FORMAT_VERSION = 1
CONFIG = "config.json"
BEST = "model.safetensors"
LAST = "last.safetensors"
METRICS = "metrics.jsonl"
DEFAULT_ROOT = Path("runs")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    On any failure (disk full, kill, bad data) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not write ({err.strerror or err})") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (a torn last line is skipped by `read_jsonl`)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping a line torn by a kill mid-write."""
    records = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# ----------------------------------------------------------------------------- tensors <-> safetensors


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and a JSON-able remainder."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `_flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, slots in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_weights(path: Path, model: torch.nn.Module, *, meta: dict[str, Any] | None = None,
                 train_state: dict[str, Any] | None = None) -> None:
    """Atomically save model weights (and optionally the resume state) to one safetensors file.

    `train_state` may hold "optimizer" (a state_dict), "rng" (name -> uint8 tensor) and any JSON-able
    fields (step, epoch, best score ...). One file means weights and optimiser can never disagree.
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module prefixes every key
    model = getattr(model, "module", model)  # so does DDP
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header: dict[str, str] = {"format_version": str(FORMAT_VERSION), "meta": json.dumps(meta or {})}
    if train_state is not None:
        train_state = dict(train_state)
        optim_tensors, optim_meta = _flatten_optimizer(train_state.pop("optimizer"))
        tensors.update(optim_tensors)
        for name, value in train_state.pop("rng", {}).items():
            tensors[f"rng.{name}"] = value.contiguous()
        header["optimizer"] = json.dumps(optim_meta)
        header["train_state"] = json.dumps(train_state)
    # Tied weights (output projection = embedding) share storage; safetensors refuses shared tensors.
    tensors = {k: v.clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


@dataclass
class WeightsFile:
    """The contents of one checkpoint file, split back into its parts."""

    model: dict[str, torch.Tensor]
    meta: dict[str, Any]
    optimizer: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None


def load_weights(path: Path) -> WeightsFile:
    """Read a checkpoint file written by `save_weights`; every failure is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: checkpoint format {version!r} is not the supported {FORMAT_VERSION}")
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    optimizer = None
    if "optimizer" in header:
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer = _unflatten_optimizer(optim_tensors, json.loads(header["optimizer"]))
    train_state = json.loads(header["train_state"]) if "train_state" in header else None
    return WeightsFile(model, json.loads(header.get("meta", "{}")), optimizer, rng, train_state)


# ----------------------------------------------------------------------------- run directories


def write_run_config(run_dir: Path, *, model_config: dict[str, Any], vocab: dict[str, Any],
                     preprocess: dict[str, Any], train: dict[str, Any], data: dict[str, Any],
                     **sections: Any) -> None:
    """Write config.json: everything needed to rebuild the model, tokenizer and preprocessing (+ `sections`)."""
    from captioner import __version__

    write_json(Path(run_dir) / CONFIG, {
        "format_version": FORMAT_VERSION,
        "captioner_version": __version__,
        "model": model_config,
        "vocab": vocab,
        "preprocess": preprocess,
        "train": train,
        "data": data,
        **sections,
    })


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """Read and check config.json of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    path = run_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a captioner run directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        found = config.get("format_version") if isinstance(config, dict) else None
        raise CheckpointError(f"{path}: run format {found!r} is not the supported {FORMAT_VERSION}")
    for key in ("model", "vocab", "preprocess"):
        if key not in config:
            raise CheckpointError(f"{path}: missing the {key!r} section")
    return config


@dataclass
class LoadedRun:
    """A model ready for inference, with the vocabulary and preprocessing it was trained with."""

    run_dir: Path
    model: CaptionModel
    vocab: Vocabulary
    preprocess: Preprocess
    config: dict[str, Any]
    meta: dict[str, Any]
    which: str = "best"  # the weights actually read: "last" also when `best` was asked for but never saved


def load_run(run_dir: Path | str | None = None, *, which: str = "best", device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory (default: the newest under ./runs) in eval mode."""
    from captioner.config import ModelConfig
    from captioner.data.images import Preprocess
    from captioner.data.vocab import Vocabulary
    from captioner.errors import ConfigError, DataError
    from captioner.models.captioner import CaptionModel

    run_dir = Path(run_dir) if run_dir is not None else latest_run()
    config = read_run_config(run_dir)
    try:
        model_config = ModelConfig.from_dict(config["model"])
        vocab = Vocabulary.from_dict(config["vocab"])
        preprocess = Preprocess.from_dict(config["preprocess"])
    except (ConfigError, DataError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{run_dir / CONFIG}: incompatible configuration ({err})") from err
    if len(vocab) != model_config.vocab_size:
        raise CheckpointError(
            f"{run_dir / CONFIG}: vocabulary has {len(vocab)} words but the model expects "
            f"{model_config.vocab_size}"
        )
    path = run_dir / (BEST if which == "best" else LAST)
    if which == "best" and not path.exists() and (run_dir / LAST).exists():
        path, which = run_dir / LAST, "last"  # a run stopped before its first validation has only its latest weights
    weights = load_weights(path)
    # Pretrained backbone files are only needed to *start* training; the run's own weights replace them.
    model_config.pretrained, model_config.backbone_weights = False, None
    model = CaptionModel(model_config)
    check_state_dict(path, model, weights.model)
    model.load_state_dict(weights.model)
    model.to(device).eval()
    return LoadedRun(run_dir, model, vocab, preprocess, config, weights.meta, which)


def check_state_dict(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise a CheckpointError naming the first missing, unexpected or mis-shaped weight."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the configuration "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for key, value in expected.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"{path}: weight {key} has shape {tuple(state[key].shape)}, the configuration "
                f"expects {tuple(value.shape)}"
            )


def latest_run(root: Path | str = DEFAULT_ROOT) -> Path:
    """The most recently written run directory under `root`."""
    root = Path(root)
    runs = [p.parent for p in root.glob(f"*/{CONFIG}")] if root.is_dir() else []
    runs = [r for r in runs if (r / BEST).exists() or (r / LAST).exists()]
    if not runs:
        raise CheckpointError(f"{root}: no trained run found; train one with `captioner train` or pass --model")
    return max(runs, key=lambda r: max((r / n).stat().st_mtime for n in (BEST, LAST) if (r / n).exists()))
