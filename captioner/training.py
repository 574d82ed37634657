"""The one training loop, shared by cross-entropy training and SCST: a run state and its phase functions.

`prepare` builds a `Run` (data, model, optimiser; restored from `last.safetensors` on resume), `fit`
drives it through epochs calling a step function (`cross_entropy_step` here, `scst.scst_step` for
SCST), `validate` scores it and keeps `best`, `save` writes the resumable state. The loop knows nothing
model-specific, reports through an `on_event(kind, data)` callback and never prints.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioner import checkpoint, evaluation
from captioner.config import ModelConfig, TrainConfig
from captioner.data.dataset import Batch, CaptionDataset, make_loader
from captioner.data.images import Preprocess, train_transform
from captioner.data.sources import Sample, check_images, load_samples
from captioner.data.vocab import Vocabulary
from captioner.errors import CaptionerError, CheckpointError, ConfigError
from captioner.models.captioner import CaptionModel
from captioner.runtime import (
    Dist,
    PrecisionPlan,
    all_mean,
    autocast,
    close_distributed,
    init_distributed,
    precision_plan,
    resolve_device,
    rng_state,
    set_rng_state,
)

Event = Callable[[str, dict[str, Any]], None]
StepFn = Callable[["Run", Batch], dict[str, Any]]


class TrainingInterrupted(CaptionerError):
    """Ctrl-C (or SIGTERM) during training: the latest state was saved and the run can be resumed."""


class NonFiniteLoss(CaptionerError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""





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
    raise ConfigError(f"schedule must be inverse_sqrt or cosine, got {schedule!r}")  # TrainConfig checks it first


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


# ----------------------------------------------------------------------------- the run state


@dataclass
class TrainResult:
    """What a finished (or early-stopped) run achieved."""

    run_dir: Path
    steps: int
    epochs: int
    seconds: float
    best: dict[str, Any] = field(default_factory=dict)  # validation record of the best checkpoint
    last: dict[str, Any] = field(default_factory=dict)  # the final validation record


@dataclass
class Data:
    """What a run trains and validates on, with the vocabulary and preprocessing saved beside the model."""

    train_set: CaptionDataset
    val_samples: list[Sample]
    vocab: Vocabulary
    preprocess: Preprocess
    model_config: ModelConfig
    knows_truth: bool  # built-in world scenes: `best` is kept by caption accuracy
    splits: dict[str, int]


@dataclass
class Run:
    """The state of one training run: every phase function reads it and advances it."""

    cfg: TrainConfig
    run_dir: Path
    data: Data
    model: CaptionModel
    optimizer: torch.optim.Optimizer
    dist: Dist
    device: torch.device
    precision: PrecisionPlan
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    total_steps: int
    emit: Event
    started: float  # perf_counter when the run began: the time limit counts data preparation too
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None  # the learning rate at each step
    train_model: nn.Module | None = None  # the model as trained: itself, or its DDP / compiled wrapper
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    budget: TimeBudget | None = None
    record_tags: dict[str, Any] = field(default_factory=dict)  # added to every validation record
    log_every: int = 10  # steps between progress events
    step: int = 0
    epoch: int = 0
    stale: int = 0  # validations since `best` last improved
    best: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
    out_of_time: bool = False
    interrupted: list[int] = field(default_factory=list)  # signals received
    clock: dict[str, float] = field(default_factory=dict)  # pace bookkeeping of the progress events

    @property
    def best_score(self) -> tuple[float, ...]:
        """How `best` ranks (selection_score); below everything before the first validation."""
        return selection_score(self.best, self.data.knows_truth) if self.best else (float("-inf"),)

    @property
    def time_limit(self) -> float | None:
        """Minutes this run may take, if limited."""
        return self.cfg.resolved_time_limit()

    def stopping(self) -> bool:
        """The last step was taken, or early stop's patience ran out."""
        return self.step >= self.total_steps or (self.cfg.early_stop is not None and self.stale >= self.cfg.early_stop)


# ----------------------------------------------------------------------------- prepare


def prepare(cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False, on_event: Event | None = None,
            skip_bad_images: bool = False) -> Run:
    """Build a run in `run_dir`, fresh (refusing a folder that already holds one) or restored from its last state."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    emit = on_event or (lambda kind, data: None)
    dist_info = init_distributed(cfg.device)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    plan = precision_plan(cfg.precision, device)
    weights, saved = _restore_point(run_dir, resume)
    torch.manual_seed(cfg.seed)  # before the model's initialisation: a seed gives the same run
    data = load_data(cfg, saved, emit, skip_bad_images=skip_bad_images)
    sampler, loader, steps_per_epoch = batches(cfg, data.train_set, dist_info, device)
    model = CaptionModel(data.model_config).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    run = Run(cfg, run_dir, data, model, optimizer, dist_info, device, plan, sampler, loader, steps_per_epoch,
              cfg.resolved_steps(steps_per_epoch), emit, started)
    plan_steps(run, weights.train_state if weights is not None else None)
    run.scheduler = warmup_schedule(run)
    if weights is not None:
        restore(run, weights)
    elif dist_info.main:
        write_config(run)
    wrap_for_training(run)
    return run


def _restore_point(run_dir: Path, resume: bool) -> tuple[checkpoint.WeightsFile | None, dict[str, Any] | None]:
    """The saved weights and config.json to resume from; a fresh run refuses a folder that holds one."""
    if not resume:
        if (run_dir / checkpoint.LAST).exists():
            raise CheckpointError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
        return None, None
    saved = checkpoint.read_run_config(run_dir)
    if not (run_dir / checkpoint.LAST).is_file():
        raise CheckpointError(f"{run_dir}: holds no {checkpoint.LAST}, so there is no training state to "
                              "resume from (a run saves it at each validation and when stopped)")
    weights = checkpoint.load_weights(run_dir / checkpoint.LAST)
    if weights.train_state is None:
        raise CheckpointError(f"{run_dir / checkpoint.LAST}: holds no training state to resume from")
    return weights, saved


def load_data(cfg: TrainConfig, saved: dict[str, Any] | None, emit: Event, *,
              skip_bad_images: bool = False) -> Data:
    """Samples by split, vocabulary, model config and preprocessing (a resume reuses the run's own)."""
    by_split = _samples_by_split(cfg, emit, skip_bad_images)
    if saved is not None:
        vocab = Vocabulary.from_dict(saved["vocab"])
        model_config = ModelConfig.from_dict(saved["model"])
        preprocess = Preprocess.from_dict(saved["preprocess"])
    else:
        vocab = Vocabulary.build([c for s in by_split["train"] for c in s.captions], min_count=cfg.min_count)
        model_config = cfg.model_config(vocab_size=len(vocab), pad_id=vocab.pad_id)
        preprocess = Preprocess(image_size=model_config.image_size)
    val_samples = by_split["val"] or by_split["test"]
    transform = preprocess if cfg.data is None else train_transform(preprocess)  # the world needs no augmenting
    most_captions = max(len(s.captions) for s in by_split["train"])
    train_set = CaptionDataset(by_split["train"], vocab, transform, max_len=cfg.max_len, mode="random",
                               seed=cfg.seed, captions_per_image=min(cfg.captions_per_image, most_captions))
    if train_set.truncated:
        emit("warning", {"message": f"{train_set.truncated} training captions are longer than {cfg.max_len} "
                                    f"words: the model learns their first {cfg.max_len} only"})
    return Data(train_set, val_samples, vocab, preprocess, model_config, evaluation.knows_truth(val_samples),
                {k: len(v) for k, v in by_split.items()})


def _samples_by_split(cfg: TrainConfig, emit: Event, skip_bad_images: bool) -> dict[str, list[Sample]]:
    """The dataset's samples (or the built-in world's) by split, unusable images refused or skipped."""
    samples = load_samples(cfg.data, image_dir=cfg.image_dir, format=cfg.format, synth_train=cfg.synth_train,
                           synth_val=cfg.synth_val, synth_test=cfg.synth_test, seed=cfg.seed,
                           synth_max_objects=cfg.synth_max_objects)
    for note in getattr(samples, "notes", []):  # what loading dropped or merged (empty, overlong, repeated)
        emit("warning", {"message": f"{cfg.data}: {note}"})
    if cfg.data is not None:
        _, bad = check_images(samples)
        if bad:
            examples = "; ".join(f"{p}: {r}" for p, r in bad[:3])
            if not skip_bad_images:
                raise CaptionerError(f"{len(bad)} of {len(samples)} images cannot be used (first: {examples}); "
                                     "fix them or pass --skip-bad-images")
            bad_paths = {str(p) for p, _ in bad}
            samples = [s for s in samples if str(s.path) not in bad_paths]
            emit("warning", {"message": f"skipping {len(bad)} unusable images (first: {examples})"})
    by_split: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for s in samples:
        by_split.setdefault(s.split, []).append(s)
    if not by_split["train"]:
        raise CaptionerError("the dataset has no training images")
    return by_split


def batches(cfg: TrainConfig, train_set: CaptionDataset, dist_info: Dist,
            device: torch.device) -> tuple[EpochSampler, torch.utils.data.DataLoader, int]:
    """The sampler (this rank's shard, resumable mid-epoch), the loader over it, and the steps of an epoch."""
    sampler = EpochSampler(len(train_set), seed=cfg.seed, rank=dist_info.rank, world=dist_info.world)
    loader = make_loader(train_set, cfg.batch_size, shuffle=False, workers=cfg.workers, seed=cfg.seed,
                         sampler=sampler, drop_last=True, pin_memory=device.type == "cuda")
    steps_per_epoch = len(train_set) // dist_info.world // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training split ({len(train_set)} images)")
    return sampler, loader, steps_per_epoch


def make_optimizer(model: CaptionModel, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with decay on weight matrices only; betas and eps as in Vaswani et al."""
    return torch.optim.AdamW(model.parameter_groups(weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-9,
                             foreach=True)


def warmup_schedule(run: Run) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up schedule (lr_factor) over the run's length, read at every step since a time limit refits it."""
    cfg = run.cfg

    def factor(i: int) -> float:
        return lr_factor(i + 1, warmup=cfg.warmup_steps, schedule=cfg.schedule, total=run.total_steps)

    return torch.optim.lr_scheduler.LambdaLR(run.optimizer, factor)


def plan_steps(run: Run, state: dict[str, Any] | None) -> None:
    """Fix the schedule's length: configured, kept from the saved state, or fitted to the time limit."""
    cfg, limit = run.cfg, run.time_limit
    default_length = cfg.max_steps is None and cfg.epochs is None
    if state is not None and default_length:
        run.total_steps = state.get("total_steps", run.total_steps)  # a schedule fitted to the clock keeps its length
    elif state is None and limit is not None and default_length and run.dist.world == 1:
        # Only with the default step count (an explicit --max-steps/--epochs is obeyed, the limit only cuts),
        # and on one process: ranks timing themselves could plan different lengths and fall out of step.
        run.budget = TimeBudget(limit * 60, run.started, run.total_steps, run.steps_per_epoch, cfg.val_every)
    if state is not None and state["step"] >= run.total_steps:
        raise CheckpointError(f"{run.run_dir}: this run already finished ({state['step']} of {run.total_steps} "
                              "steps); raise --epochs or --max-steps to train further")


def restore(run: Run, weights: checkpoint.WeightsFile) -> None:
    """Continue exactly where the saved state stopped: weights, optimiser, position, best, RNG."""
    checkpoint.check_state_dict(run.run_dir / checkpoint.LAST, run.model, weights.model)
    run.model.load_state_dict(weights.model)
    run.optimizer.load_state_dict(weights.optimizer)
    state = weights.train_state
    run.step, run.epoch = state["step"], state["epoch"]
    run.stale, run.best = state.get("stale", 0), state.get("best_record", {})
    run.scheduler.last_epoch = run.step  # the loaded param groups already carry the current lr
    set_rng_state(weights.rng)


def write_config(run: Run, **sections: Any) -> None:
    """config.json: model, vocabulary, preprocessing, training options, data (and any extra `sections`)."""
    cfg = run.cfg
    checkpoint.write_run_config(
        run.run_dir, model_config=run.model.config.to_dict(), vocab=run.data.vocab.to_dict(),
        preprocess=run.data.preprocess.to_dict(), train=cfg.to_dict(),
        data={"source": cfg.data or "synthetic", "format": cfg.format, "image_dir": cfg.image_dir,
              "splits": run.data.splits}, **sections)


def wrap_for_training(run: Run) -> None:
    """DDP across processes, torch.compile when asked, a loss scaler for fp16."""
    wrapped: nn.Module = run.model
    if run.dist.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        wrapped = torch.compile(wrapped)
    run.train_model = wrapped
    run.scaler = torch.amp.GradScaler("cuda") if run.precision.train_autocast == torch.float16 else None


# ----------------------------------------------------------------------------- step


def cross_entropy_step(run: Run, batch: Batch) -> dict[str, Any]:
    """One teacher-forced optimiser step on a batch; returns the loss and gradient norm (tensors)."""
    device, dtype = run.device, run.precision.train_autocast
    images = batch.images.to(device, non_blocking=True)
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    pad_mask = batch.pad_mask.to(device)
    if run.cfg.scheduled_sampling > 0:
        prob = run.step / run.total_steps * run.cfg.scheduled_sampling
        inputs = _scheduled_sampling(run.model, images, inputs, pad_mask, prob, dtype, device)
    with autocast(device, dtype):
        logits = run.train_model(images, inputs, pad_mask=pad_mask)  # (B, T, V)
    loss = caption_loss(logits, targets, pad_id=run.data.vocab.pad_id, label_smoothing=run.cfg.label_smoothing)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss became {loss.item()} at step {run.step + 1}; {run.run_dir} keeps the last good "
                            "checkpoint (try a lower --lr or --precision fp32)")
    grad_norm = apply_gradients(run, loss)
    return {"loss": loss, "grad_norm": grad_norm, "images": images.shape[0]}


def apply_gradients(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """Backward, clip, optimiser and schedule step (through the fp16 scaler when there is one); the grad norm."""
    run.optimizer.zero_grad(set_to_none=True)
    scaler = run.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    if scaler is not None:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    return grad_norm


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


# ----------------------------------------------------------------------------- validate and save


def validate(run: Run) -> dict[str, Any]:
    """Decode the validation split, append the record to metrics.jsonl, keep `best`; the RNG stream is untouched."""
    rng = rng_state()  # validation must not shift the training RNG stream (exact resume)
    record: dict[str, Any] = {"step": run.step, "epoch": run.epoch, **run.record_tags}
    data = run.data
    if run.dist.main and data.val_samples:
        report = evaluation.evaluate_samples(run.model, data.val_samples, data.vocab, data.preprocess,
                                             device=run.device, max_len=run.cfg.max_len, java=False,
                                             synthetic=data.knows_truth)
        record.update(report.summary())
        _warn_if_collapsed(run, getattr(report, "diversity", {}))
        if selection_score(record, data.knows_truth) > run.best_score:
            run.best, run.stale = record, 0
            checkpoint.save_weights(run.run_dir / checkpoint.BEST, run.model, meta=record)
        else:
            run.stale += 1
        checkpoint.append_jsonl(run.run_dir / checkpoint.METRICS, record)
        run.emit("validate", record)
    run.model.train()
    set_rng_state(rng)
    run.last = record
    return record


def _warn_if_collapsed(run: Run, diversity: dict[str, Any]) -> None:
    if diversity.get("collapsed"):
        run.emit("warning", {"message": (
            f"captions collapsed at step {run.step}: {diversity['distinct_share']:.0%} distinct, "
            f"most common {diversity['most_common_share']:.0%} ({diversity['most_common']!r})")})


def save(run: Run, *, finished: bool = False) -> None:
    """Write last.safetensors: weights plus everything an exact resume needs (main process only)."""
    if not run.dist.main:
        return
    state = {"optimizer": run.optimizer.state_dict(), "rng": rng_state(), "step": run.step, "epoch": run.epoch,
             "stale": run.stale, "best_record": run.best, "finished": finished, "total_steps": run.total_steps}
    checkpoint.save_weights(run.run_dir / checkpoint.LAST, run.model, meta={"step": run.step, "epoch": run.epoch},
                            train_state=state)


def validate_and_save(run: Run) -> None:
    """Validate, save (finished when this is the end), and re-fit the schedule to the time that is left."""
    began = time.perf_counter()
    validate(run)  # updates `stale`, so whether this is the end is decided after it
    finished = run.stopping()
    save(run, finished=finished)
    run.clock["tick"] = time.perf_counter()
    if run.budget is not None and not finished and not run.out_of_time:
        run.budget.eval_s = run.clock["tick"] - began
        _refit(run, run.clock["tick"])


def _refit(run: Run, now: float) -> None:
    """Fit the schedule's length to the time left (see TimeBudget); announce the first fit."""
    fitted = run.budget.plan(run.step, now)
    if fitted is not None and fitted != run.total_steps:
        run.emit("plan", {"steps": fitted, "configured": run.budget.cap, "minutes": run.time_limit,
                          "first": run.total_steps == run.budget.cap})
        run.total_steps = fitted


# ----------------------------------------------------------------------------- the loop


@contextmanager
def _signals_caught(run: Run) -> Iterator[None]:
    """Ctrl-C and SIGTERM are recorded in `run.interrupted` (and acted on between steps) instead of killing."""
    previous = {}
    if run.dist.main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(ValueError):  # not the main thread (e.g. called from a worker thread): no handler
                previous[sig] = signal.signal(sig, lambda signum, frame: run.interrupted.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fit(run: Run, step_fn: StepFn = cross_entropy_step) -> TrainResult:
    """Train until the schedule ends, early stop, the time limit or a signal; validate and save on the way."""
    run.emit("start", _start_event(run))
    run.model.train()
    now = time.perf_counter()
    run.clock.update(t0=now, window_t=now, window_images=0, tick=now, start_step=run.step)
    with _signals_caught(run):
        try:
            while run.step < run.total_steps and not run_epoch(run, step_fn):
                pass
            if run.step >= run.total_steps and not run.last:
                save(run, finished=True)
        finally:
            close_distributed(run.dist)
    return finish(run)


def run_epoch(run: Run, step_fn: StepFn) -> bool:
    """Train from the current position to the end of its epoch (or a stop); True when training is over."""
    start_in_epoch = run.step - run.epoch * run.steps_per_epoch
    if start_in_epoch >= run.steps_per_epoch:
        run.epoch += 1
        return False
    run.sampler.set_epoch(run.epoch, start=start_in_epoch * run.cfg.batch_size)
    run.data.train_set.set_epoch(run.epoch)
    for batch in run.loader:
        stats = step_fn(run, batch)
        run.step += 1
        _after_step(run, stats)
        if run.interrupted:
            break
        if run.cfg.val_every and run.step % run.cfg.val_every == 0:
            validate_and_save(run)
        if run.stopping():  # the last step, or early stop's patience ran out at this validation
            break
        if run.time_limit is not None and time.perf_counter() - run.started > run.time_limit * 60:
            run.out_of_time = True
            break
    if run.interrupted:
        save(run)
        raise TrainingInterrupted(f"stopped at step {run.step}; state saved. "
                                  f"Resume with: captioner train --resume {run.run_dir}")
    return _end_epoch(run)


def _end_epoch(run: Run) -> bool:
    """Validate at an epoch's end or a stop; True when training is over."""
    end_of_epoch = run.step - run.epoch * run.steps_per_epoch >= run.steps_per_epoch
    if end_of_epoch:
        run.epoch += 1
    if not (end_of_epoch or run.stopping() or run.out_of_time):
        return False
    if not run.cfg.val_every or run.step % run.cfg.val_every:  # else validated and saved at this step already
        validate_and_save(run)
    if run.out_of_time and not run.stopping():
        run.emit("warning", {"message": (
            f"time limit of {run.time_limit:g} min reached at step {run.step} of {run.total_steps}; "
            f"continue with: captioner train --resume {run.run_dir} --time-limit MINUTES")})
        return True
    if run.cfg.early_stop is not None and run.stale >= run.cfg.early_stop:
        run.emit("warning", {"message": f"early stop: no {SELECTED_BY[run.data.knows_truth]} improvement in "
                                        f"{run.stale} validations"})
    return run.stopping()


def _after_step(run: Run, stats: dict[str, Any]) -> None:
    """Time bookkeeping, progress events and the loss curve in metrics.jsonl."""
    clock = run.clock
    if run.budget is not None:
        now = time.perf_counter()
        run.budget.train_s += now - clock["tick"]
        clock["tick"] = now
        if run.step - clock["start_step"] in (10, 110):  # a pace window that skips the first steps' warm-up
            _refit(run, now)
    clock["window_images"] += stats.pop("images") * run.dist.world
    if run.step % run.log_every and run.step != run.total_steps:
        return
    now = time.perf_counter()
    progress = {"step": run.step, "total": run.total_steps, "epoch": run.epoch,
                "lr": run.scheduler.get_last_lr()[0],
                "images_per_s": clock["window_images"] / max(now - clock["window_t"], 1e-9)}
    scalars = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in stats.items()}
    progress.update({k: all_mean(v, run.dist) if k == "loss" else v for k, v in scalars.items()})
    run.emit("step", progress)
    clock["window_images"], clock["window_t"] = 0, now
    if run.step % TRAIN_LOG_EVERY == 0 and run.dist.main:  # the loss curve, beside the validations
        checkpoint.append_jsonl(run.run_dir / checkpoint.METRICS, {"phase": "train", **progress})


def _start_event(run: Run) -> dict[str, Any]:
    return {"run_dir": str(run.run_dir), "device": str(run.device), "precision": run.precision.name,
            "steps": run.total_steps, "start_step": run.step,
            "parameters": sum(p.numel() for p in run.model.parameters()),
            "train_images": len(run.data.train_set), "val_images": len(run.data.val_samples),
            "world": run.dist.world, "model": run.model.config.to_dict()}


def finish(run: Run) -> TrainResult:
    """The result of the run, announced as the "end" event."""
    seconds = time.perf_counter() - run.clock["t0"]
    run.emit("end", {"run_dir": str(run.run_dir), "steps": run.step, "seconds": seconds, "best": run.best,
                     "last": run.last})
    return TrainResult(run.run_dir, run.step, run.epoch, seconds, run.best, run.last)


def train(cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False, on_event: Event | None = None,
          skip_bad_images: bool = False) -> TrainResult:
    """Train (or resume) a captioning model into `run_dir` with cross-entropy, and return what it achieved."""
    run = prepare(cfg, run_dir, resume=resume, on_event=on_event, skip_bad_images=skip_bad_images)
    return fit(run, cross_entropy_step)
