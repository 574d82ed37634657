"""Run directories: everything `caption`, `attend`, `evaluate` and `--resume` need, written atomically.

A run directory holds
    config.json          model config, vocabulary, preprocessing, training options (JSON, never pickle)
    model.safetensors    the best weights so far (by validation CIDEr-D; by accuracy on the built-in world)
    last.safetensors     the latest weights plus optimiser/schedule/RNG state, for an exact resume
    metrics.jsonl        one JSON object per validation
    .lock                the flock of the process writing the run (its pid inside), see `lock_run_dir`
Every file is written to a temporary name in the same folder and renamed over the old one, so a kill
or a full disk at any moment leaves the previous version loadable. Loading never unpickles anything.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

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
LOCK = ".lock"
DEFAULT_ROOT = Path("runs")
RUN_FILES = (CONFIG, LAST, BEST)  # any of these means a folder holds a run
# atomic_write's temporary names, `.NAME.xxxxxxxx.tmp` (mkstemp's, from older versions, have the same form)
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path` and sync the folder.

    On any failure (disk full, kill, bad data) the temporary file is removed and `path` is untouched; an OSError
    (a full disk, a read-only or forbidden folder) becomes a one-line CheckpointError naming `path`.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary(path)
        write(tmp)
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as err:
        _discard(tmp)
        raise CheckpointError(f"{path}: could not write ({err.strerror or err})") from err
    except BaseException:
        _discard(tmp)
        raise


def _new_temporary(path: Path) -> Path:
    """Create an empty `.NAME.xxxxxxxx.tmp` beside `path` with the mode the umask gives any new file.

    (mkstemp's 0600 would survive the rename and hide the run from the rest of a shared group.)
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename inside it survives a power cut as well as the file's bytes do."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot sync a folder: nothing to do
            raise
    finally:
        os.close(fd)


def _discard(tmp: Path | None) -> None:
    """Remove a temporary file of a write that failed (gone already when the rename was done)."""
    if tmp is not None:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: Path, *, min_age: float = 60.0) -> list[Path]:
    """Delete the temporary files a killed `atomic_write` left in `run_dir`, and return them.

    Only our own `.NAME.xxxxxxxx.tmp` names older than `min_age` seconds (a younger one may be another process's
    write in progress); the holder of the run's lock passes 0.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    try:
        stale = [p for p in run_dir.iterdir() if TEMPORARY.fullmatch(p.name) and _older(p, min_age)]
        for path in stale:
            path.unlink(missing_ok=True)
    except OSError as err:
        raise CheckpointError(f"{run_dir}: could not remove stale temporary files ({err.strerror or err})") from err
    return sorted(stale)


def _older(path: Path, seconds: float) -> bool:
    """A file (not a folder) last written more than `seconds` ago; False once it is gone (renamed by its writer)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return not stat.S_ISDIR(info.st_mode) and time.time() - info.st_mtime >= seconds


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (a torn last line is skipped by `read_jsonl`)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise CheckpointError(f"{path}: could not append ({err.strerror or err})") from err


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
    try:  # the JSON parts of the header: written by save_weights, but the file may come from anywhere
        meta, optimizer, train_state = _header_json(header, "meta", {}), None, None
        if "optimizer" in header:
            optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
            optimizer = _unflatten_optimizer(optim_tensors, _header_json(header, "optimizer", {}))
        if "train_state" in header:
            train_state = _header_json(header, "train_state", {})
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt checkpoint header ({type(err).__name__}: {err})") from err
    return WeightsFile(model, meta, optimizer, rng, train_state)


def _header_json(header: dict[str, str], key: str, default: dict[str, Any]) -> dict[str, Any]:
    value = json.loads(header[key]) if key in header else default
    if not isinstance(value, dict):
        raise TypeError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt JSON ({err})") from err
    except OSError as err:
        raise CheckpointError(f"{path}: could not read ({err.strerror or err})") from err
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        found = config.get("format_version") if isinstance(config, dict) else None
        raise CheckpointError(f"{path}: run format {found!r} is not the supported {FORMAT_VERSION}")
    for key in ("model", "vocab", "preprocess"):
        if key not in config:
            raise CheckpointError(f"{path}: missing the {key!r} section")
    return config


class RunLock:
    """An exclusive flock on a run directory's `.lock` file, held until `close` or the process's death."""

    def __init__(self, run_dir: Path, file: IO[str]) -> None:
        self.run_dir = run_dir
        self._file: IO[str] | None = file

    def close(self) -> None:
        """Release the lock (again: nothing); the `.lock` file stays and blocks no one."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)  # explicit: forked DataLoader workers share the open file
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_run_dir(run_dir: Path | str) -> RunLock:
    """Lock `run_dir` for this process, so that two training processes never write into one run.

    The kernel drops a flock when its holder dies, so a lock file left by a killed run never blocks the next.
    """
    run_dir = Path(run_dir)
    try:
        file = open(run_dir / LOCK, "a+")  # noqa: SIM115 (the lock outlives this function)
    except OSError as err:
        raise CheckpointError(f"{run_dir}: could not create its lock file ({err.strerror or err})") from err
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        if isinstance(err, BlockingIOError):
            raise CheckpointError(f"{run_dir}: another captioner process is writing to this run (pid {holder})") \
                from None
        raise CheckpointError(f"{run_dir}: could not lock the run ({err.strerror or err})") from err
    file.truncate(0)
    file.write(f"{os.getpid()}\n")  # for the message of the process refused
    file.flush()
    return RunLock(run_dir, file)


def claim_fresh_run_dir(run_dir: Path | str) -> RunLock:
    """Create (or take an empty) `run_dir` for a new run and lock it; a folder holding anything else is refused.

    A refused folder is left exactly as it was, so a mistyped --out never harms another run.
    """
    run_dir = Path(run_dir)
    _refuse_unless_empty(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"{run_dir}: could not create the run directory ({err.strerror or err})") from err
    lock = lock_run_dir(run_dir)
    try:
        _refuse_unless_empty(run_dir)  # again under the lock: another process may have started here meanwhile
        remove_stale_temporaries(run_dir, min_age=0)
    except BaseException:
        lock.close()
        raise
    return lock


def _refuse_unless_empty(run_dir: Path) -> None:
    """Raise unless `run_dir` is missing or holds nothing but a lock file and temporaries of killed writes."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: is not a folder; give another --out")
    try:
        names = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK and not TEMPORARY.fullmatch(p.name))
    except OSError as err:
        raise CheckpointError(f"{run_dir}: could not list the folder ({err.strerror or err})") from err
    if names:
        runs = [n for n in RUN_FILES if n in names]
        what = "already holds a run" if runs else "is not empty"
        files = f"{len(names)} file{'s' if len(names) > 1 else ''}"
        raise CheckpointError(f"{run_dir}: {what} (holds {files}, e.g. {(runs or names)[0]}); give another --out")


def discard_if_unused(run_dir: Path | str) -> None:
    """Remove `run_dir` if it holds nothing but its lock file (a run that failed before writing anything)."""
    run_dir = Path(run_dir)
    with suppress(OSError):  # best effort: a folder we cannot tidy is still a valid empty run folder
        if run_dir.is_dir() and all(p.name == LOCK for p in run_dir.iterdir()):
            (run_dir / LOCK).unlink(missing_ok=True)
            run_dir.rmdir()


def new_run_dir(root: Path | str, prefix: str, *, when: datetime | None = None) -> Path:
    """Create `root/prefix-YYYYmmdd-HHMMSS` (now, or `when`), adding -2, -3 ... when it exists.

    `mkdir` either creates the folder or fails, so two runs started in the same second never share one.
    """
    name = f"{prefix}-{(when or datetime.now()).strftime('%Y%m%d-%H%M%S')}"
    root = Path(root)
    run_dir, n = root / name, 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                n += 1
                run_dir = root / f"{name}-{n}"
    except OSError as err:
        raise CheckpointError(f"{run_dir}: could not create the run directory ({err.strerror or err})") from err


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
    except (ConfigError, DataError, KeyError, TypeError, ValueError, ArithmeticError) as err:
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
