"""The training loop: teacher forcing, the warm-up schedule, mixed precision, validation, checkpoints, DDP.

The loop knows nothing model-specific: it asks the model for logits under teacher forcing, the
evaluation module for validation scores, and the checkpoint module for atomic run directories. It
reports progress through an `on_event(kind, data)` callback and never prints.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from captioner import checkpoint
from captioner.config import ModelConfig, TrainConfig, preset
from captioner.errors import CaptionerError, CheckpointError, ConfigError

Event = Callable[[str, dict[str, Any]], None]


class TrainingInterrupted(CaptionerError):
    """Ctrl-C (or SIGTERM) during training: the latest state was saved and the run can be resumed."""


class NonFiniteLoss(CaptionerError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# ----------------------------------------------------------------------------- schedule and loss


def lr_factor(step: int, *, warmup: int, schedule: str, total: int) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (1-based).

    Both schedules start with a linear warm-up over `warmup` steps: Adam's second-moment estimates are
    poor at first and Transformers diverge if they take full-size steps then. After it,
    "inverse_sqrt" decays as sqrt(warmup / step) (Vaswani et al.'s schedule, rescaled so the peak is
    exactly the given learning rate) and "cosine" follows half a cosine down to zero at `total`.
    """
    step = max(step, 1)
    warmup = max(warmup, 1)
    if step <= warmup:
        return step / warmup
    if schedule == "inverse_sqrt":
        return math.sqrt(warmup / step)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"schedule must be inverse_sqrt or cosine, got {schedule!r}")


TRAIN_LOG_EVERY = 50  # steps between the training-loss records in metrics.jsonl (validations have no phase key)


class TimeBudget:
    """Fits the length of the learning-rate schedule to a time limit, so a run that must stop early ends annealed.

    A cosine schedule cut off by the clock stops at a high learning rate, far from the model it would
    have reached; a schedule that ends when the time does is the better use of the same minutes (Li et
    al. 2020, "Budgeted training"). The pace is measured on the steps themselves (validation time apart,
    and the latest window only, so the first epoch's rendering of the built-in world does not count
    forever), and the plan never goes beyond the configured number of steps.
    """

    def __init__(self, limit_s: float, started: float, cap: int, steps_per_epoch: int,
                 val_every: int | None = None) -> None:
        self.limit_s, self.started, self.cap = limit_s, started, cap
        # validations per step: one at every epoch's end, plus one every `val_every` steps when set
        self.evals_per_step = 1 / steps_per_epoch + (1 / val_every if val_every else 0.0)
        self.window: tuple[int, float] | None = None  # (step, training seconds) where the pace window starts
        self.train_s = 0.0  # seconds spent in training steps (not validating or saving)
        self.eval_s = 10.0  # seconds one validation + save costs; measured after the first one

    def plan(self, step: int, now: float) -> int | None:
        """Steps the schedule should end at, given the pace since the window began; None until it is known."""
        if self.window is None:
            self.window = (step, self.train_s)
            return None
        steps, seconds = step - self.window[0], self.train_s - self.window[1]
        if steps < 20:
            return None
        self.window = (step, self.train_s)
        # r more steps cost r * pace, plus the validations on the way and one at the end: solve for r.
        left = self.limit_s * 0.97 - 1.0 - (now - self.started) - self.eval_s  # a margin for the clock's noise
        per_step = seconds / steps + self.eval_s * self.evals_per_step
        return max(step + 1, min(self.cap, step + int(left / per_step)))


SELECTED_BY = {False: "CIDEr-D", True: "caption accuracy"}  # what `best` is kept by, on data without/with truth


def selection_score(record: dict[str, Any], knows_truth: bool) -> tuple[float, ...]:
    """How a validation record ranks for `best`: CIDEr-D; on scenes that know their truth, accuracy first.

    On the built-in world the checker's accuracy is the truth and CIDEr-D only a proxy for it that can
    disagree by a lot (one run: CIDEr-D 6.928 at 86 % validation accuracy against 6.925 at 92 %), so
    accuracy ranks and CIDEr-D breaks ties. On a dataset CIDEr-D ranks, as is usual for captioning.
    """
    cider = float(record.get("CIDEr-D", 0.0))
    return (float(record.get("accuracy", 0.0)), cider) if knows_truth else (cider,)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, *, pad_id: int,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over real target tokens; padding positions never count.

    logits (B, T, V) were produced from inputs <bos> + caption; targets (B, T) are caption + <eos>,
    i.e. the same sequence shifted by one, so the shift happens exactly once: in the collate.
    """
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T),
                           ignore_index=pad_id, label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------- device and precision


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: no MPS device is available")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); read from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 mixed precision where the hardware computes bf16 natively (recent GPUs, CPUs with
    AVX512-BF16/AMX), else fp32. fp16 needs CUDA (it trains with a grad scaler)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device (use bf16 or fp32 on this device)")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """The mixed-precision context for forward passes (a no-op for fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """Where this process stands in a torchrun job (world 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes files and reports."""
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Dist(rank, world, local_rank)


def all_mean(value: float, dist_info: Dist) -> float:
    """Average a scalar over all processes."""
    if dist_info.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist_info.world


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffled order fixed by (seed, epoch), sharded over ranks, that can start mid-epoch.

    Starting mid-epoch is what makes `--resume` exact: the resumed run sees the same batches in the
    same order as a run that was never stopped.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` indices of this rank."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // self.world  # drop the ragged tail so every rank does the same number of steps
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.n // self.world - self.start


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What a finished (or early-stopped) run achieved."""

    run_dir: Path
    steps: int
    epochs: int
    seconds: float
    best: dict[str, Any] = field(default_factory=dict)  # validation record of the best checkpoint
    last: dict[str, Any] = field(default_factory=dict)  # the final validation record


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in state:
                torch.cuda.set_rng_state(state[f"cuda{i}"], i)


def train(cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False, on_event: Event | None = None,
          skip_bad_images: bool = False) -> TrainResult:
    """Train (or resume) a captioning model into `run_dir` and return what it achieved."""
    from captioner.data.dataset import CaptionDataset, make_loader
    from captioner.data.images import Preprocess, train_transform
    from captioner.data.sources import check_images, load_samples
    from captioner.data.vocab import Vocabulary
    from captioner.evaluation import evaluate_samples
    from captioner.evaluation import knows_truth as scenes_know_truth
    from captioner.models.captioner import CaptionModel

    emit = on_event or (lambda kind, data: None)
    started = time.perf_counter()  # the time limit counts data preparation too
    out_of_time = False
    run_dir = Path(run_dir)
    dist_info = init_distributed(cfg.device)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    dtype = resolve_precision(cfg.precision, device)

    state = None
    if resume:
        saved = checkpoint.read_run_config(run_dir)
        if not (run_dir / checkpoint.LAST).is_file():
            raise CheckpointError(f"{run_dir}: holds no {checkpoint.LAST}, so there is no training state to "
                                  "resume from (a run saves it at each validation and when stopped)")
        weights = checkpoint.load_weights(run_dir / checkpoint.LAST)
        state = weights.train_state
        if state is None:
            raise CheckpointError(f"{run_dir / checkpoint.LAST}: holds no training state to resume from")
    elif (run_dir / checkpoint.LAST).exists():
        raise CheckpointError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")

    # ---- data: samples, vocabulary, preprocessing (a resume reuses the run's own vocabulary)
    torch.manual_seed(cfg.seed)
    samples = load_samples(cfg.data, images=cfg.images, format=cfg.format, synth_train=cfg.synth_train,
                           synth_val=cfg.synth_val, synth_test=cfg.synth_test, seed=cfg.seed,
                           synth_max_objects=cfg.synth_max_objects)
    for note in getattr(samples, "notes", []):  # what loading dropped or merged (empty, overlong, repeated)
        emit("warning", {"message": f"{cfg.data}: {note}"})
    if cfg.data is not None:
        _, bad = check_images(samples)
        if bad:
            examples = "; ".join(f"{p}: {r}" for p, r in bad[:3])
            if not skip_bad_images:
                raise CaptionerError(
                    f"{len(bad)} of {len(samples)} images cannot be used (first: {examples}); "
                    "fix them or pass --skip-bad-images"
                )
            bad_paths = {str(p) for p, _ in bad}
            samples = [s for s in samples if str(s.path) not in bad_paths]
            emit("warning", {"message": f"skipping {len(bad)} unusable images (first: {examples})"})
    by_split: dict[str, list] = {"train": [], "val": [], "test": []}
    for s in samples:
        by_split.setdefault(s.split, []).append(s)
    if not by_split["train"]:
        raise CaptionerError("the dataset has no training images")
    val_samples = by_split["val"] or by_split["test"]

    if state is not None:
        vocab = Vocabulary.from_dict(saved["vocab"])
        model_config = ModelConfig.from_dict(saved["model"])
        preprocess = Preprocess.from_dict(saved["preprocess"])
    else:
        vocab = Vocabulary.build([c for s in by_split["train"] for c in s.captions], min_count=cfg.min_count)
        model_config = preset(cfg.preset, encoder=cfg.encoder, vocab_size=len(vocab), pad_id=vocab.pad_id,
                              **cfg.extra)
        preprocess = Preprocess(image_size=model_config.image_size)
    synthetic = cfg.data is None
    knows_truth = scenes_know_truth(val_samples)  # world scenes: `best` by accuracy
    transform = preprocess if synthetic else train_transform(preprocess)  # the world needs no augmenting
    most_captions = max(len(s.captions) for s in by_split["train"])
    train_set = CaptionDataset(by_split["train"], vocab, transform, max_len=cfg.max_len, mode="random",
                               seed=cfg.seed, captions_per_image=min(cfg.captions_per_image, most_captions))
    if train_set.truncated:
        emit("warning", {"message": f"{train_set.truncated} training captions are longer than {cfg.max_len} "
                                    f"words: the model learns their first {cfg.max_len} only"})
    sampler = EpochSampler(len(train_set), seed=cfg.seed, rank=dist_info.rank, world=dist_info.world)
    loader = make_loader(train_set, cfg.batch_size, shuffle=False, workers=cfg.workers, seed=cfg.seed,
                         sampler=sampler, drop_last=True, pin_memory=device.type == "cuda")
    steps_per_epoch = len(train_set) // dist_info.world // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training split ({len(train_set)} images)"
        )
    total_steps = cfg.resolved_steps(steps_per_epoch)
    time_limit = cfg.resolved_time_limit()
    budget = None
    if state is not None and cfg.max_steps is None and cfg.epochs is None:
        total_steps = state.get("total_steps", total_steps)  # a schedule fitted to the clock keeps its length
    elif state is None and time_limit is not None and cfg.max_steps is None and cfg.epochs is None \
            and dist_info.world == 1:
        # Only with the default step count (an explicit --max-steps/--epochs is obeyed, the limit only cuts),
        # and on one process: ranks timing themselves could plan different lengths and fall out of step.
        budget = TimeBudget(time_limit * 60, started, total_steps, steps_per_epoch, cfg.val_every)
    if state is not None and state["step"] >= total_steps:
        raise CheckpointError(
            f"{run_dir}: this run already finished ({state['step']} of {total_steps} steps); "
            "raise --epochs or --max-steps to train further"
        )

    # ---- model and optimiser
    model = CaptionModel(model_config).to(device)
    if state is not None:
        checkpoint.check_state_dict(run_dir / checkpoint.LAST, model, weights.model)
        model.load_state_dict(weights.model)
    optimizer = torch.optim.AdamW(model.parameter_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                  eps=1e-9, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i + 1, warmup=cfg.warmup_steps, schedule=cfg.schedule, total=total_steps)
    )
    step, epoch, stale = 0, 0, 0
    best_score: tuple[float, ...] = (float("-inf"),)
    best_record: dict[str, Any] = {}
    if state is not None:
        optimizer.load_state_dict(weights.optimizer)
        step, epoch = state["step"], state["epoch"]
        stale, best_record = state.get("stale", 0), state.get("best_record", {})
        if best_record:  # ranked again from the record itself, so a run saved under another ranking resumes too
            best_score = selection_score(best_record, knows_truth)
        # The loaded param groups already carry the current lr; the schedule only needs its position.
        scheduler.last_epoch = step
        _set_rng_state(weights.rng)
    elif dist_info.main:
        checkpoint.write_run_config(
            run_dir, model_config=model_config.to_dict(), vocab=vocab.to_dict(), preprocess=preprocess.to_dict(),
            train=cfg.to_dict(), data={"source": cfg.data or "synthetic", "format": cfg.format,
                                       "images": cfg.images, "splits": {k: len(v) for k, v in by_split.items()}},
        )
    train_model: torch.nn.Module = model
    if dist_info.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def save(finished: bool = False) -> None:
        if not dist_info.main:
            return
        checkpoint.save_weights(run_dir / checkpoint.LAST, model, meta={"step": step, "epoch": epoch},
                                train_state={
                                    "optimizer": optimizer.state_dict(), "rng": _rng_state(), "step": step,
                                    "epoch": epoch, "stale": stale,
                                    "best_record": best_record, "finished": finished,
                                    "total_steps": total_steps,
                                })

    def validate() -> dict[str, Any]:
        nonlocal best_score, stale, best_record
        rng = _rng_state()  # validation must not shift the training RNG stream (exact resume)
        record: dict[str, Any] = {"step": step, "epoch": epoch}
        if dist_info.main and val_samples:
            report = evaluate_samples(model, val_samples, vocab, preprocess, device=device, max_len=cfg.max_len,
                                      java=False, synthetic=knows_truth)
            record.update(report.summary())
            if report.diversity.get("collapsed"):
                emit("warning", {"message": (
                    f"captions collapsed at step {step}: {report.diversity['distinct_share']:.0%} distinct, "
                    f"most common {report.diversity['most_common_share']:.0%} "
                    f"({report.diversity['most_common']!r})")})
            score = selection_score(record, knows_truth)
            if score > best_score:
                best_score, stale, best_record = score, 0, record
                checkpoint.save_weights(run_dir / checkpoint.BEST, model, meta=record)
            else:
                stale += 1
            checkpoint.append_jsonl(run_dir / checkpoint.METRICS, record)
            emit("validate", record)
        model.train()
        _set_rng_state(rng)
        return record

    # ---- the loop
    interrupted: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001 (signal handler signature)
        interrupted.append(signum)

    previous_handlers = {}
    if dist_info.main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(ValueError):  # not the main thread (e.g. called from a worker thread): no handler
                previous_handlers[sig] = signal.signal(sig, on_signal)
    emit("start", {"run_dir": str(run_dir), "device": str(device), "precision": str(dtype).replace("torch.", ""),
                   "steps": total_steps, "start_step": step, "parameters": sum(p.numel() for p in model.parameters()),
                   "train_images": len(train_set), "val_images": len(val_samples), "world": dist_info.world,
                   "model": model_config.to_dict()})
    model.train()
    t0 = time.perf_counter()
    last_record: dict[str, Any] = {}
    window_images, window_t = 0, time.perf_counter()
    start_step, tick = step, time.perf_counter()

    def refit(now: float) -> None:
        """Fit the schedule's length to the time left (see TimeBudget); announce the first fit."""
        nonlocal total_steps
        fitted = budget.plan(step, now)
        if fitted is not None and fitted != total_steps:
            emit("plan", {"steps": fitted, "configured": budget.cap, "minutes": time_limit,
                          "first": total_steps == budget.cap})
            total_steps = fitted

    def stopping() -> bool:
        return step >= total_steps or (cfg.early_stop is not None and stale >= cfg.early_stop)

    def validate_and_save() -> dict[str, Any]:
        """Validate, save (finished when this is the end), and re-fit the schedule to the time that is left."""
        nonlocal tick
        began = time.perf_counter()
        record = validate()  # updates `stale`, so whether this is the end is decided after it
        finished = stopping()
        save(finished=finished)
        tick = time.perf_counter()
        if budget is not None and not finished and not out_of_time:
            budget.eval_s = tick - began
            refit(tick)
        return record

    try:
        done = step >= total_steps
        while not done:
            start_in_epoch = step - epoch * steps_per_epoch
            if start_in_epoch >= steps_per_epoch:
                epoch += 1
                continue
            sampler.set_epoch(epoch, start=start_in_epoch * cfg.batch_size)
            train_set.set_epoch(epoch)
            for batch in loader:
                images = batch.images.to(device, non_blocking=True)
                inputs, targets = batch.inputs.to(device), batch.targets.to(device)
                pad_mask = batch.pad_mask.to(device)
                if cfg.scheduled_sampling > 0:
                    inputs = _scheduled_sampling(model, images, inputs, pad_mask, step / total_steps *
                                                 cfg.scheduled_sampling, dtype, device)
                with autocast(device, dtype):
                    logits = train_model(images, inputs, pad_mask=pad_mask)  # (B, T, V)
                loss = caption_loss(logits, targets, pad_id=vocab.pad_id, label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"loss became {loss.item()} at step {step + 1}; {run_dir} keeps the last good "
                        "checkpoint (try a lower --lr or --precision fp32)"
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                step += 1
                if budget is not None:
                    now = time.perf_counter()
                    budget.train_s += now - tick
                    tick = now
                    if step - start_step in (10, 110):  # a pace window that skips the first steps' warm-up
                        refit(now)
                window_images += images.shape[0] * dist_info.world
                if step % 10 == 0 or step == total_steps:
                    now = time.perf_counter()
                    progress = {"step": step, "total": total_steps, "epoch": epoch,
                                "loss": all_mean(loss.item(), dist_info), "lr": scheduler.get_last_lr()[0],
                                "grad_norm": float(grad_norm),
                                "images_per_s": window_images / max(now - window_t, 1e-9)}
                    emit("step", progress)
                    window_images, window_t = 0, now
                    if step % TRAIN_LOG_EVERY == 0 and dist_info.main:  # the loss curve, beside the validations
                        checkpoint.append_jsonl(run_dir / checkpoint.METRICS, {"phase": "train", **progress})
                if interrupted:
                    break
                if cfg.val_every and step % cfg.val_every == 0:
                    last_record = validate_and_save()
                if stopping():  # the last step, or early stop's patience ran out at this validation
                    break
                if time_limit is not None and time.perf_counter() - started > time_limit * 60:
                    out_of_time = True
                    break
            if interrupted:
                save()
                raise TrainingInterrupted(
                    f"stopped at step {step}; state saved. Resume with: captioner train --resume {run_dir}")
            end_of_epoch = step - epoch * steps_per_epoch >= steps_per_epoch
            if end_of_epoch:
                epoch += 1
            if end_of_epoch or stopping() or out_of_time:
                if not cfg.val_every or step % cfg.val_every:  # else validated and saved in the loop at this step
                    last_record = validate_and_save()
                done = stopping()
                if out_of_time and not done:
                    emit("warning", {"message": (
                        f"time limit of {time_limit:g} min reached at step {step} of {total_steps}; "
                        f"continue with: captioner train --resume {run_dir} --time-limit MINUTES")})
                    break
                if cfg.early_stop is not None and stale >= cfg.early_stop:
                    emit("warning", {"message": f"early stop: no {SELECTED_BY[knows_truth]} improvement in "
                                                f"{stale} validations"})
        if step >= total_steps and not last_record and dist_info.main:
            save(finished=True)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if dist_info.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    seconds = time.perf_counter() - t0
    result = TrainResult(run_dir, step, epoch, seconds, best_record, last_record)
    emit("end", {"run_dir": str(run_dir), "steps": step, "seconds": seconds, "best": best_record,
                 "last": last_record})
    return result


def _scheduled_sampling(model: torch.nn.Module, images: torch.Tensor, inputs: torch.Tensor,
                        pad_mask: torch.Tensor, prob: float, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """Replace each input token (after <bos>) by the model's own greedy guess with probability `prob`.

    Bengio et al.'s scheduled sampling, in the one-pass form used with Transformers: a first
    teacher-forced pass (no gradient) predicts every position, and the mixed sequence is fed to the
    real pass. `prob` ramps linearly from 0 to --scheduled-sampling over the run.
    """
    if prob <= 0:
        return inputs
    with torch.no_grad(), autocast(device, dtype):
        guesses = model(images, inputs, pad_mask=pad_mask).argmax(-1)  # (B, T): guess for position t+1
    replace = torch.rand(inputs.shape, device=device) < prob
    replace[:, 0] = False  # <bos> stays
    replace &= ~pad_mask
    mixed = inputs.clone()
    mixed[:, 1:] = torch.where(replace[:, 1:], guesses[:, :-1], inputs[:, 1:])
    return mixed
