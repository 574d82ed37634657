"""The one training loop, shared by cross-entropy training and SCST: a run state and its phase functions.

`prepare` builds a `Run` (data, model, optimiser; restored from `last.safetensors` on resume), `fit`
drives it through epochs calling a step function (`cross_entropy_step` here, `scst.scst_step` for
SCST), `validate` scores it and keeps `best`, `save` writes the resumable state. The loop knows nothing
model-specific, reports through an `on_event(kind, data)` callback and never prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioner import checkpoint, evaluation
from captioner.concepts import concept_loss_sum, concept_words
from captioner.config import ModelConfig, TrainConfig
from captioner.curves import draw_curves
from captioner.data.dataset import Batch, CaptionDataset, make_loader
from captioner.data.images import Preprocess, train_transform
from captioner.data.sources import Sample, SampleList, check_images, load_samples, split_or_whole
from captioner.data.vocab import Vocabulary
from captioner.decoding import DecodeSettings
from captioner.errors import CaptionerError, CheckpointError, ConfigError, DataError
from captioner.models.captioner import CaptionModel
from captioner.runtime import (
    Dist,
    PrecisionPlan,
    all_mean,
    any_rank,
    autocast,
    close_distributed,
    from_main,
    init_distributed,
    main_first,
    precision_plan,
    resolve_device,
    rng_state,
    set_rng_state,
    to_main,
)

Event = Callable[[str, dict[str, Any]], None]
StepFn = Callable[["Run", list[Batch]], dict[str, Any]]  # one optimiser step over --accumulate batches


class TrainingInterrupted(CaptionerError):
    """Ctrl-C (or SIGTERM) during training: the latest state was saved and the run can be resumed."""


class NonFiniteLoss(CaptionerError):
    """The loss or the gradients became NaN or infinite; the update was not applied, the last checkpoint kept."""


# What a resumed run must share with the run it continues: they fix the data order and its sharding.
RESUME_FIXED = ("seed", "batch_size", "accumulate", "captions_per_image")


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


MAX_WARMUP_SHARE = 0.2  # of a default-length run's steps, whatever --warmup-steps says (see warmup_schedule)
TRAIN_LOG_EVERY = 50  # steps between the training-loss records in metrics.jsonl (validations have no phase key)
LOG_EVERY = 10  # steps between progress events: often enough to watch the loss move, without a line per step

# The time budget plans to end at this share of the limit less these seconds: the pace varies between windows,
# and a plan a little too long would let the clock cut the schedule just before it anneals.
BUDGET_SHARE, BUDGET_MARGIN_S = 0.97, 1.0
PACE_MIN_STEPS = 20  # a pace measured over fewer steps (a window a validation closed early) is mostly noise
FIRST_EVAL_S = 10.0  # a guess at one validation + save, until the first one is timed
# Steps after `fit` begins at which the schedule is refitted, besides at every validation: the first opens the
# pace window once the first steps' warm-up is past, the second fits the schedule without waiting for a validation.
REFIT_AFTER_STEPS = (10, 110)


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
        self.eval_s = FIRST_EVAL_S  # seconds one validation + save costs; measured after each one

    def plan(self, step: int, now: float) -> int | None:
        """Steps the schedule should end at, given the pace since the window began; None until it is known."""
        if self.window is None:
            self.window = (step, self.train_s)
            return None
        steps, seconds = step - self.window[0], self.train_s - self.window[1]
        if steps < PACE_MIN_STEPS:
            return None
        self.window = (step, self.train_s)
        # r more steps cost r * pace, plus the validations on the way and one at the end: solve for r.
        left = self.limit_s * BUDGET_SHARE - BUDGET_MARGIN_S - (now - self.started) - self.eval_s
        per_step = seconds / steps + self.eval_s * self.evals_per_step
        return max(step + 1, min(self.cap, step + int(left / per_step)))


SELECTED_BY = {False: "CIDEr-D", True: "caption accuracy"}  # what `best` is kept by, on data without/with truth


# A collapsed validation (the same few sentences for every image) ranks as if it scored this much less, so
# `best` is never a collapsed checkpoint when one that describes the images scored within 5 % of it.
COLLAPSED_DISCOUNT = 0.95


def selection_score(record: dict[str, Any], knows_truth: bool) -> tuple[float, ...]:
    """How a validation record ranks for `best`: CIDEr-D; on scenes that know their truth, accuracy first.

    On the built-in world the checker's accuracy is the truth and CIDEr-D only a proxy for it that can
    disagree by a lot (one run: CIDEr-D 6.928 at 86 % validation accuracy against 6.925 at 92 %), so
    accuracy ranks and CIDEr-D breaks ties. On a dataset CIDEr-D ranks, as is usual for captioning,
    discounted when the captions collapsed (COLLAPSED_DISCOUNT).
    """
    cider = float(record.get("CIDEr-D", 0.0))
    if knows_truth:
        return float(record.get("accuracy", 0.0)), cider
    return (cider * COLLAPSED_DISCOUNT if record.get("collapsed") else cider,)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, *, pad_id: int,
                 label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over real target tokens (their mean, or with reduction="sum" their sum); padding never counts.

    logits (B, T, V) were produced from inputs <bos> + caption; targets (B, T) are caption + <eos>,
    i.e. the same sequence shifted by one, so the shift happens exactly once: in the collate.
    """
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T),
                           ignore_index=pad_id, label_smoothing=label_smoothing, reduction=reduction)




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
            # 100_003: a prime above any epoch count, so no two (seed, epoch) pairs share a generator seed
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
    stopped: str = ""  # why the run ended, in a few words
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
    concepts: torch.Tensor | None = None  # (V,) bool: the words the concept loss asks for; None without one


@dataclass
class Clock:
    """The loop's timing, all perf_counter readings: the run's seconds, the budget's pace and images/s."""

    t0: float  # when `fit` began: the seconds the run reports at its end
    tick: float  # the end of the last step or validation: the budget's training time counts from it
    window_start: float  # the last progress event: images/s is measured since it
    window_images: int  # images trained on since window_start, by all processes
    start_step: int  # the step `fit` began at: the refits count from it, and only later steps need saving on error

    @classmethod
    def start(cls, step: int = 0) -> Clock:
        """Every reading at the same instant, now, for a loop that begins at `step`."""
        now = time.perf_counter()
        return cls(t0=now, tick=now, window_start=now, window_images=0, start_step=step)


@dataclass
class Run:
    """The state of one training run: what `prepare` built, and the progress the phase functions advance."""

    # Built by `prepare` (or scst.prepare_scst); fixed from then on unless a comment says otherwise.
    cfg: TrainConfig
    run_dir: Path  # the run's folder: config.json, metrics.jsonl, best and last checkpoints
    data: Data
    model: CaptionModel
    optimizer: torch.optim.Optimizer
    dist: Dist  # this process's place among the run's processes (one without torchrun)
    device: torch.device
    precision: PrecisionPlan  # the dtype training's forward passes autocast to (and whether fp16 needs `scaler`)
    sampler: EpochSampler  # the loader's order: set per epoch, and where in it a resumed run starts
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int  # optimiser steps, each over --accumulate batches of every process
    total_steps: int  # the schedule's length: configured, or refitted to the time limit as the pace is known
    emit: Event  # where progress goes (the CLI prints it): the loop itself never prints
    started: float  # perf_counter when the run began: the time limit counts data preparation too
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None  # the learning rate at each step
    # The model as trained: itself, or its DDP / compiled wrapper (made again when the backbone joins).
    train_model: nn.Module | None = None
    scaler: torch.amp.GradScaler | None = field(init=False)  # fp16 only: made from `precision` (__post_init__)
    budget: TimeBudget | None = None  # fits total_steps to a time limit; only on a fresh run of the default length
    record_tags: dict[str, Any] = field(default_factory=dict)  # added to every validation record
    log_every: int = LOG_EVERY  # steps between progress events
    lock: checkpoint.RunLock | None = None  # the main process's hold on run_dir, released when the run ends

    # Progress: what the loop advances; step, epoch, stale and best are saved for an exact resume.
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # the epoch being trained, counted from 0: the epochs completed
    stale: int = 0  # validations since `best` last improved
    best: dict[str, Any] = field(default_factory=dict)  # the validation record of best.safetensors
    last: dict[str, Any] = field(default_factory=dict)  # the latest validation record
    out_of_time: bool = False  # the time limit was reached (on any process)
    interrupted: list[int] = field(default_factory=list)  # signals received, acted on between steps
    clock: Clock = field(default_factory=Clock.start)  # restarted by `fit`

    def __post_init__(self) -> None:
        self.scaler = grad_scaler(self.precision)

    @property
    def step_in_epoch(self) -> int:
        """Steps taken in the current epoch: `steps_per_epoch` once it is complete and `epoch` not yet advanced."""
        return self.step - self.epoch * self.steps_per_epoch

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
        return self.step >= self.total_steps or self.converged()

    def converged(self) -> bool:
        """Early stop: `patience` validations after the warm-up without a better `best`.

        The default patience also waits for half the schedule: before it, a run whose learning rate is still
        high is noisy, not finished, and a time limit the user gave should be used unless the run truly stalls.
        """
        patience = self.cfg.resolved_early_stop()
        if patience is None or self.stale < patience:
            return False
        return self.cfg.early_stop is not None or self.step >= self.total_steps // 2

    def stop_reason(self) -> str:
        """Why the run ends here, in a few words (for the end of the run's output)."""
        if self.step >= self.total_steps:
            fitted = f", fitted to the {self.time_limit:g}-min limit," if self.budget is not None else ""
            return f"the learning-rate schedule{fitted} ended"
        if self.converged():
            return self.early_stop_reason()
        if self.out_of_time:
            return f"the {self.time_limit:g}-min time limit was reached"
        return "stopped"

    def early_stop_reason(self) -> str:
        """What early stop saw, in a few words (the warning when it happens, and the end of the run's output)."""
        return f"early stop: no {SELECTED_BY[self.data.knows_truth]} gain in the last {self.stale} validations"


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
    lock = _hold(run_dir, resume) if dist_info.main else None
    try:
        run = _build(cfg, run_dir, resume, dist_info, device, plan, emit, started, skip_bad_images)
    except BaseException:
        if lock is not None:
            lock.close()
            if not resume:
                checkpoint.discard_if_unused(run_dir)  # a refused start leaves no empty run folder behind
        raise
    run.lock = lock
    return run


def _hold(run_dir: Path, resume: bool) -> checkpoint.RunLock | None:
    """Lock the run directory: a fresh run only in an empty (or new) folder, a resume only in a run no one writes."""
    if not resume:
        return checkpoint.claim_fresh_run_dir(run_dir)
    if not (run_dir / checkpoint.LAST).is_file():
        return None  # nothing to resume: _restore_point says why, and this folder is left as it is
    lock = checkpoint.lock_run_dir(run_dir)
    checkpoint.remove_stale_temporaries(run_dir, min_age=0)  # left by a killed write; we hold the lock
    return lock


def _build(cfg: TrainConfig, run_dir: Path, resume: bool, dist_info: Dist, device: torch.device,
           plan: PrecisionPlan, emit: Event, started: float, skip_bad_images: bool) -> Run:
    """The run's data, model and optimiser, restored from its last state on resume."""
    weights, saved = _restore_point(run_dir, resume)
    if weights is not None:
        _check_same_order(run_dir, cfg, saved, weights.train_state, dist_info)
    torch.manual_seed(cfg.seed)  # before the model's initialisation: a seed gives the same run
    data = load_data(cfg, saved, emit, skip_bad_images=skip_bad_images)
    with main_first(dist_info):  # rank 0 fetches pretrained weights into the cache; the others read them there
        model = CaptionModel(data.model_config).to(device)
    if weights is not None:
        checkpoint.check_state_dict(run_dir / checkpoint.LAST, model, weights.model)
        model.load_state_dict(weights.model)  # before the feature cache, which is keyed by the backbone's weights
    if cfg.feature_cache and data.model_config.freeze_backbone and cfg.data is not None:
        with main_first(dist_info):  # rank 0 builds the cache; the others find it built
            data.train_set = _cached_features(cfg, data, model, device, emit)
    sampler, loader, steps_per_epoch = batches(cfg, data.train_set, dist_info, device)
    # Runs saved before the backbone had its own rate hold two groups: they resume as they were trained.
    split = weights is None or len(weights.optimizer["param_groups"]) > 2
    optimizer = make_optimizer(model, cfg, split_backbone=split)
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
        return None, None  # the folder was checked empty when it was claimed
    saved = checkpoint.read_run_config(run_dir)
    if not (run_dir / checkpoint.LAST).is_file():
        raise CheckpointError(f"{run_dir}: holds no {checkpoint.LAST}, so there is no training state to "
                              "resume from (a run saves it at each validation and when stopped)")
    weights = checkpoint.load_weights(run_dir / checkpoint.LAST)
    if weights.train_state is None:
        raise CheckpointError(f"{run_dir / checkpoint.LAST}: holds no training state to resume from")
    return weights, saved


def _cached_features(cfg: TrainConfig, data: Data, model: CaptionModel, device: torch.device,
                     emit: Event) -> CaptionDataset:
    """A frozen backbone's features, computed once per training image and reused by every epoch and run.

    The cache holds un-augmented images: --no-feature-cache trains with augmentation, recomputing the backbone.
    """
    from captioner import feature_cache

    emit("note", {"message": "frozen backbone: its features of each training image are computed once and "
                             "reused (no augmentation; --no-feature-cache to recompute them)"})
    cached = feature_cache.cached_dataset(model, data.train_set, data.preprocess, device=device,
                                          batch_size=cfg.batch_size,
                                          on_progress=lambda done, total: emit("progress", {
                                              "what": "feature cache", "done": done, "total": total}))
    if cached.store.rebuilt:
        emit("note", {"message": f"feature cache built ({cached.store.rebuilt})"})
    return cached


def _check_same_order(run_dir: Path, cfg: TrainConfig, saved: dict[str, Any], state: dict[str, Any],
                      dist_info: Dist) -> None:
    """Refuse a resume whose seed, batch size or process count would change the run's data order midway."""
    before = saved.get("train", {})
    for name in RESUME_FIXED:
        if name in before and before[name] != getattr(cfg, name):
            option = "--" + name.replace("_", "-")
            raise ConfigError(f"{option} {getattr(cfg, name)} differs from this run's {before[name]} "
                              f"({run_dir}): a resumed run keeps its data order; drop {option} or start a new run")
    if state.get("world", 1) != dist_info.world:
        raise ConfigError(f"{run_dir} was trained by {state.get('world', 1)} process(es), this resume has "
                          f"{dist_info.world}: each process's share of the data would change; resume with "
                          f"--nproc_per_node {state.get('world', 1)}")


def load_data(cfg: TrainConfig, saved: dict[str, Any] | None, emit: Event, *,
              skip_bad_images: bool = False) -> Data:
    """Samples by split, vocabulary, model config and preprocessing (a resume reuses the run's own)."""
    by_split = _samples_by_split(cfg, emit, skip_bad_images)
    if saved is not None:
        vocab = Vocabulary.from_dict(saved["vocab"])
        # Weights come from the run's own checkpoint only: never from a file its config.json names.
        model_config = dataclasses.replace(ModelConfig.from_dict(saved["model"]), pretrained=False,
                                           backbone_weights=None)
        preprocess = Preprocess.from_dict(saved["preprocess"])
    else:
        captions = [c for s in by_split["train"] for c in s.captions]
        vocab = Vocabulary.build(captions, min_count=cfg.resolved_min_count(len(captions)), max_size=cfg.max_vocab)
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
    concepts = concept_words([s.captions for s in by_split["train"]], vocab) if model_config.concept_head else None
    return Data(train_set, val_samples, vocab, preprocess, model_config, evaluation.knows_truth(val_samples),
                {k: len(v) for k, v in by_split.items()}, concepts)


def _samples_by_split(cfg: TrainConfig, emit: Event, skip_bad_images: bool) -> dict[str, list[Sample]]:
    """The dataset's samples (or the built-in world's) by split, unusable images refused or skipped."""
    samples = load_samples(cfg.data, image_dir=cfg.image_dir, format=cfg.format, synth_train=cfg.synth_train,
                           synth_val=cfg.synth_val, synth_test=cfg.synth_test, seed=cfg.seed,
                           synth_max_objects=cfg.synth_max_objects)
    _report_notes(samples, emit)
    by_split: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    if cfg.val_data is not None:
        by_split["train"], note = split_or_whole(samples, "train")  # COCO's train2017 file: all of it
        by_split["val"] = _validation_file(cfg, emit)
        if note:
            emit("warning", {"message": f"training on every image: {note}"})
    else:
        for s in samples:
            by_split.setdefault(s.split, []).append(s)
    if cfg.data is not None:
        by_split = _usable(by_split, emit, skip_bad_images)
    if not by_split["train"]:
        raise CaptionerError("the dataset has no training images")
    return by_split


def _validation_file(cfg: TrainConfig, emit: Event) -> list[Sample]:
    """--val-data: its val split, or the whole file when it names no splits (COCO's captions_val2017.json)."""
    samples = load_samples(cfg.val_data, image_dir=cfg.val_images, format="auto")
    _report_notes(samples, emit)
    chosen, _ = split_or_whole(samples, "val")
    if not chosen:
        raise DataError(f"{cfg.val_data}: names splits but has no val split to validate on")
    return chosen


def _report_notes(samples: SampleList, emit: Event) -> None:
    for note in samples.notes:  # what loading dropped or merged (empty, overlong, repeated)
        emit("warning", {"message": f"{samples.source}: {note}"})


def _usable(by_split: dict[str, list[Sample]], emit: Event, skip_bad_images: bool) -> dict[str, list[Sample]]:
    """The samples whose image files can be used; the others refused (one line) or skipped with --skip-bad-images."""
    everything = [s for part in by_split.values() for s in part]
    _, bad = check_images(everything)
    if not bad:
        return by_split
    examples = "; ".join(f"{p}: {r}" for p, r in bad[:3])
    if not skip_bad_images:
        raise CaptionerError(f"{len(bad)} of {len(everything)} images cannot be used (first: {examples}); "
                             "fix them or pass --skip-bad-images")
    emit("warning", {"message": f"skipping {len(bad)} unusable images (first: {examples})"})
    bad_paths = {str(p) for p, _ in bad}
    return {split: [s for s in part if str(s.path) not in bad_paths] for split, part in by_split.items()}


def batches(cfg: TrainConfig, train_set: CaptionDataset, dist_info: Dist,
            device: torch.device) -> tuple[EpochSampler, torch.utils.data.DataLoader, int]:
    """The sampler (this rank's shard, resumable mid-epoch), the loader over it, and the steps of an epoch."""
    sampler = EpochSampler(len(train_set), seed=cfg.seed, rank=dist_info.rank, world=dist_info.world)
    workers = cfg.workers if cfg.workers is not None else auto_workers(cfg.data is not None)
    loader = make_loader(train_set, cfg.batch_size, shuffle=False, workers=workers, seed=cfg.seed,
                         sampler=sampler, drop_last=True, pin_memory=device.type == "cuda")
    steps_per_epoch = len(train_set) // dist_info.world // (cfg.batch_size * cfg.accumulate)
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} x --accumulate {cfg.accumulate} x {dist_info.world} "
                          f"process(es) is more than the training split ({len(train_set)} images)")
    return sampler, loader, steps_per_epoch


def auto_workers(files: bool) -> int:
    """Loader processes when --workers is not given: none for rendered scenes; for image files, this process's
    share of the cores less one for the training step itself (at least 1, at most 8)."""
    if not files:
        return 0
    per_process = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process - 1))


def make_optimizer(model: CaptionModel, cfg: TrainConfig, *, split_backbone: bool = True) -> torch.optim.Optimizer:
    """AdamW with decay on weight matrices only, the backbone at its own rate; betas and eps as in Vaswani et al."""
    backbone_lr = cfg.resolved_backbone_lr() if split_backbone else None
    groups = model.parameter_groups(cfg.weight_decay, backbone_lr=backbone_lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9, foreach=True)


def warmup_schedule(run: Run) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up schedule (lr_factor) over the run's length, read at every step since a time limit refits it."""
    cfg = run.cfg

    def factor(i: int) -> float:
        # A schedule fitted to a short time limit on a slow machine can be shorter than the warm-up, and would
        # never reach its peak: a run of the default length warms up over at most MAX_WARMUP_SHARE of it (an
        # explicit --max-steps or --epochs keeps the warm-up it is given).
        warmup = cfg.warmup_steps
        if cfg.default_length():
            warmup = min(warmup, int(run.total_steps * MAX_WARMUP_SHARE))
        return lr_factor(i + 1, warmup=warmup, schedule=cfg.schedule, total=run.total_steps)

    return torch.optim.lr_scheduler.LambdaLR(run.optimizer, factor)


def plan_steps(run: Run, state: dict[str, Any] | None) -> None:
    """Fix the schedule's length: configured, kept from the saved state, or fitted to the time limit."""
    cfg, limit = run.cfg, run.time_limit
    default_length = cfg.default_length()
    if state is not None and default_length:
        run.total_steps = state.get("total_steps", run.total_steps)  # a schedule fitted to the clock keeps its length
    elif state is None and limit is not None and default_length:
        # Only with the default step count: an explicit --max-steps/--epochs is obeyed, the limit only cuts.
        run.budget = TimeBudget(limit * 60, run.started, run.total_steps, run.steps_per_epoch, cfg.val_every)
    if state is not None and state["step"] >= run.total_steps:
        raise CheckpointError(f"{run.run_dir}: this run already finished ({state['step']} of {run.total_steps} "
                              "steps); raise --epochs or --max-steps to train further")


def restore(run: Run, weights: checkpoint.WeightsFile) -> None:
    """Continue where the saved state stopped (its weights are loaded already): optimiser, position, best, RNG."""
    run.optimizer.load_state_dict(weights.optimizer)
    state = weights.train_state
    run.step, run.epoch = state["step"], state["epoch"]
    run.stale, run.best = state.get("stale", 0), state.get("best_record", {})
    run.scheduler.last_epoch = run.step  # the loaded param groups already carry the current lr
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])  # fp16's loss scale, as it had grown or shrunk
    set_rng_state(rank_rng(weights.rng, run.dist.rank))


def rank_rng(saved: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This process's random state from a checkpoint: rank 0's under plain names, others' under "rank<r>."."""
    if rank == 0:
        return {k: v for k, v in saved.items() if not k.startswith("rank")}
    prefix = f"rank{rank}."
    return {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}


def all_ranks_rng(dist_info: Dist) -> dict[str, torch.Tensor] | None:
    """Every process's random state, merged for the checkpoint on the main process (None on the others)."""
    states = to_main(rng_state(), dist_info)
    if states is None:
        return None
    merged = dict(states[0])
    for r, state in enumerate(states[1:], start=1):
        merged.update({f"rank{r}.{k}": v for k, v in state.items()})
    return merged


def write_config(run: Run, **sections: Any) -> None:
    """config.json: model, vocabulary, preprocessing, training options, data (and any extra `sections`)."""
    cfg = run.cfg
    checkpoint.write_run_config(
        run.run_dir, model_config=run.model.config.to_dict(), vocab=run.data.vocab.to_dict(),
        preprocess=run.data.preprocess.to_dict(), train=cfg.to_dict(),
        data={"source": cfg.data or "synthetic", "format": cfg.format, "image_dir": cfg.image_dir,
              "val_source": cfg.val_data, "val_image_dir": cfg.val_images,
              "splits": run.data.splits}, **sections)


def wrap_for_training(run: Run) -> None:
    """DDP across processes, torch.compile when asked."""
    wrapped: nn.Module = run.model
    if run.dist.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        wrapped = torch.compile(wrapped)
    run.train_model = wrapped


def grad_scaler(plan: PrecisionPlan) -> torch.amp.GradScaler | None:
    """fp16 needs its loss scaled so small gradients do not flush to zero; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if plan.train_autocast == torch.float16 else None


# ----------------------------------------------------------------------------- step


def cross_entropy_step(run: Run, group: list[Batch]) -> dict[str, Any]:
    """One teacher-forced optimiser step over `group` (--accumulate batches); the losses and gradient norm (tensors).

    Each batch adds its summed token losses divided by the group's token count (and its summed concept
    losses divided by the group's image count), so N batches of B images make the same update as one
    batch of N*B. DDP averages gradients only after the last batch (no_sync).
    """
    tokens = sum(int(b.lengths.sum()) for b in group)  # real target tokens; CPU tensors: no device sync
    images = sum(len(b) for b in group)
    run.optimizer.zero_grad(set_to_none=True)
    caption_total = torch.zeros((), device=run.device)
    concept_total = torch.zeros((), device=run.device)
    for i, batch in enumerate(group):
        with _sync_gradients(run, i == len(group) - 1):
            captions, concepts = _batch_loss_sums(run, batch.to(run.device, non_blocking=True))
            captions, concepts = captions / tokens, concepts / images
            _backward(run, captions + run.cfg.concept_loss * concepts)
        caption_total += captions.detach()
        concept_total += concepts.detach()
    stats = {"loss": caption_total, "grad_norm": update(run, caption_total), "images": images}
    if run.data.concepts is not None:
        stats["concept_loss"] = concept_total
    return stats


def _batch_loss_sums(run: Run, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced cross-entropy of one batch summed over its real target tokens, and the concept loss
    summed over its images (zero without a concept head)."""
    dtype, inputs = run.precision.train_autocast, batch.inputs
    if run.cfg.scheduled_sampling > 0:
        prob = run.step / run.total_steps * run.cfg.scheduled_sampling
        inputs = _scheduled_sampling(run.model, batch.images, inputs, batch.pad_mask, prob, dtype, run.device,
                                     from_features=batch.holds_features)
    with_concepts = run.data.concepts is not None
    with autocast(run.device, dtype):
        out = run.train_model(batch.images, inputs, pad_mask=batch.pad_mask, from_features=batch.holds_features,
                              with_concepts=with_concepts)
    logits, concept_logits = out if with_concepts else (out, None)  # (B*K, T, V), (B, V)
    captions = caption_loss(logits, batch.targets, pad_id=run.data.vocab.pad_id,
                            label_smoothing=run.cfg.label_smoothing, reduction="sum")
    if concept_logits is None:
        return captions, torch.zeros((), device=captions.device)
    return captions, concept_loss_sum(concept_logits, batch.targets, run.data.concepts)


def _sync_gradients(run: Run, last: bool) -> AbstractContextManager:
    """DDP all-reduces gradients on the group's last backward only; the earlier ones just accumulate."""
    no_sync = getattr(run.train_model, "no_sync", None)
    return nullcontext() if last or no_sync is None else no_sync()


def _backward(run: Run, loss: torch.Tensor) -> None:
    (run.scaler.scale(loss) if run.scaler is not None else loss).backward()


def apply_gradients(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """Backward of one loss and the update (SCST's step); the gradient norm."""
    run.optimizer.zero_grad(set_to_none=True)
    _backward(run, loss)
    return update(run, loss.detach())


def update(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """Clip, refuse non-finite gradients, step the optimiser and the schedule; the gradient norm before clipping.

    The finiteness check reads the norm on the host (one sync per step): an update with NaN gradients
    would make every weight NaN, and the next checkpoint with them. Under DDP the gradients, hence the
    verdict, are the same on every rank. fp16's scaler skips such steps itself, so it is left to it.
    """
    scaler = run.scaler
    if scaler is not None:
        scaler.unscale_(run.optimizer)
    max_norm = run.cfg.grad_clip if run.cfg.grad_clip > 0 else math.inf  # --grad-clip 0: no clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(run.optimizer)
        scaler.update()
    elif not bool(torch.isfinite(grad_norm)):
        raise NonFiniteLoss(f"the loss ({float(loss):.4g}) or its gradients became non-finite at step "
                            f"{run.step + 1}; {run.run_dir} keeps the last good checkpoint "
                            "(try a lower --lr or --precision fp32)")
    else:
        run.optimizer.step()
    run.scheduler.step()
    return grad_norm


def _scheduled_sampling(model: torch.nn.Module, images: torch.Tensor, inputs: torch.Tensor,
                        pad_mask: torch.Tensor, prob: float, dtype: torch.dtype, device: torch.device, *,
                        from_features: bool = False) -> torch.Tensor:
    """Replace each input token (after <bos>) by the model's own greedy guess with probability `prob`.

    Bengio et al.'s scheduled sampling, in the one-pass form used with Transformers: a first
    teacher-forced pass (no gradient) predicts every position, and the mixed sequence is fed to the
    real pass. `prob` ramps linearly from 0 to --scheduled-sampling over the run.
    """
    if prob <= 0:
        return inputs
    with torch.no_grad(), autocast(device, dtype):
        guesses = model(images, inputs, pad_mask=pad_mask,
                        from_features=from_features).argmax(-1)  # (B, T): guess for position t+1
    replace = torch.rand(inputs.shape, device=device) < prob
    replace[:, 0] = False  # <bos> stays
    replace &= ~pad_mask
    mixed = inputs.clone()
    mixed[:, 1:] = torch.where(replace[:, 1:], guesses[:, :-1], inputs[:, 1:])
    return mixed


# ----------------------------------------------------------------------------- validate and save


def validate(run: Run) -> dict[str, Any]:
    """Decode the validation split, append the record to metrics.jsonl, keep `best`; the RNG stream is untouched.

    Every process decodes its share of the split; the main one scores the whole, keeps `best` and
    writes, and the others receive the record and the patience count, so early stop is decided alike.
    """
    rng = rng_state()  # validation must not shift the training RNG stream (exact resume)
    record: dict[str, Any] = {"step": run.step, "epoch": run.epoch, **run.record_tags}
    report = _validation_report(run) if run.data.val_samples else None
    if report is not None:
        record.update(report.summary())
        _warn_if_collapsed(run, getattr(report, "diversity", {}))
        if selection_score(record, run.data.knows_truth) > run.best_score:
            run.best, run.stale = record, 0
            checkpoint.save_weights(run.run_dir / checkpoint.BEST, run.model, meta=record)
        elif run.step > run.cfg.warmup_steps and not record.get("collapsed"):
            # In the warm-up the model is finding its feet, and collapsed captions say it has not yet learned
            # to use the image: neither is a model that has stopped improving.
            run.stale += 1
        checkpoint.append_jsonl(run.run_dir / checkpoint.METRICS, record)
        draw_curves(run.run_dir, best_step=run.best.get("step"))  # curves.png: a collapse or plateau at a glance
        run.emit("validate", record)
    record, run.stale = from_main((record, run.stale), run.dist)
    run.model.train()
    set_rng_state(rng)
    run.last = record
    return record


def _validation_report(run: Run) -> evaluation.EvalReport | None:
    """The validation split decoded (sharded over processes) and scored on the main process; None elsewhere."""
    data, dist_info = run.data, run.dist
    if dist_info.world == 1:
        return evaluation.evaluate_samples(run.model, data.val_samples, data.vocab, data.preprocess,
                                           device=run.device, max_len=run.cfg.max_len, java=False,
                                           synthetic=data.knows_truth)
    shard = data.val_samples[dist_info.rank::dist_info.world]
    captions = evaluation.decode_samples(run.model, shard, data.vocab, data.preprocess, device=run.device,
                                         settings=DecodeSettings(max_len=run.cfg.max_len))
    shards = to_main([c.text for c in captions], dist_info)
    if shards is None:
        return None
    texts = [""] * len(data.val_samples)
    for rank, part in enumerate(shards):
        texts[rank::dist_info.world] = part
    return evaluation.score_samples(data.val_samples, texts, java=False, synthetic=data.knows_truth)


def _warn_if_collapsed(run: Run, diversity: dict[str, Any]) -> None:
    if diversity.get("collapsed"):
        run.emit("warning", {"message": (
            f"captions collapsed at step {run.step}: {diversity['distinct_share']:.0%} distinct, "
            f"most common {diversity['most_common_share']:.0%} ({diversity['most_common']!r}); "
            f"{_collapse_advice(run)}")})


def _collapse_advice(run: Run) -> str:
    """What to do about collapsed captions, in one clause: the remedy that applies to this run."""
    if run.record_tags.get("phase") == "scst":  # its step count is a cap for the clock, not a schedule
        return "SCST is trading variety for CIDEr-D: the cross-entropy run it started from is kept as it was"
    if run.step <= run.cfg.warmup_steps or run.step < run.total_steps // 4:
        return "usual early in training: let it run (best skips collapsed checkpoints)"
    if run.data.concepts is None and not run.data.knows_truth:
        return "the model is not using the image: try --concept-loss 1, or --encoder cnn"
    return "the model is not using the image: train longer (--time-limit), or try --encoder cnn or --pretrained"


def save(run: Run, *, finished: bool = False, every_rank: bool = True) -> None:
    """Write last.safetensors: weights plus everything an exact resume needs (written by the main process).

    Every process's random state is gathered into it, which makes `save` a collective: all ranks call
    it at the same step. After an error on one rank (`every_rank=False`) only that rank's state is kept.
    """
    rng = all_ranks_rng(run.dist) if every_rank else rng_state()
    if not run.dist.main:
        return
    if not bool(torch.stack([torch.isfinite(p).all() for p in run.model.parameters()]).all()):
        raise NonFiniteLoss(f"the weights became non-finite by step {run.step}; {run.run_dir} keeps the last "
                            "good checkpoint (try a lower --lr or --precision fp32)")
    state = {"optimizer": run.optimizer.state_dict(), "rng": rng, "step": run.step, "epoch": run.epoch,
             "stale": run.stale, "best_record": run.best, "finished": finished, "total_steps": run.total_steps,
             "world": run.dist.world, "scaler": run.scaler.state_dict() if run.scaler is not None else None}
    checkpoint.save_weights(run.run_dir / checkpoint.LAST, run.model, meta={"step": run.step, "epoch": run.epoch},
                            train_state=state)


def validate_and_save(run: Run) -> None:
    """Validate, save (finished when this is the end), and re-fit the schedule to the time that is left."""
    began = time.perf_counter()
    validate(run)  # updates `stale`, so whether this is the end is decided after it
    finished = run.stopping()
    save(run, finished=finished)
    run.clock.tick = time.perf_counter()
    if run.budget is not None and not finished and not run.out_of_time:
        run.budget.eval_s = run.clock.tick - began
        _refit(run, run.clock.tick)


def _refit(run: Run, now: float) -> None:
    """Fit the schedule's length to the time left (see TimeBudget); announce the first fit."""
    fitted = from_main(run.budget.plan(run.step, now), run.dist)  # rank 0's clock decides for all
    if fitted is not None and fitted != run.total_steps:
        run.emit("plan", {"steps": fitted, "configured": run.budget.cap, "minutes": run.time_limit,
                          "first": run.total_steps == run.budget.cap})
        run.total_steps = fitted


# ----------------------------------------------------------------------------- the loop


@contextmanager
def _signals_caught(run: Run) -> Iterator[None]:
    """Ctrl-C and SIGTERM are recorded in `run.interrupted` (and acted on between steps) instead of killing."""
    previous = {}
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
    run.model.train()
    run.clock = Clock.start(run.step)
    with _signals_caught(run):
        run.emit("start", _start_event(run))
        try:
            while run.step < run.total_steps and not run_epoch(run, step_fn):
                pass
            if run.step >= run.total_steps and not run.last:
                save(run, finished=True)
        except (TrainingInterrupted, NonFiniteLoss):
            raise  # saved already, or deliberately not saved
        except BaseException:
            _save_before_failing(run)
            raise
        finally:
            close_distributed(run.dist)
            if run.lock is not None:
                run.lock.close()
    return finish(run)


def _save_before_failing(run: Run) -> None:
    """On any other error (a file gone bad mid-epoch, out of memory, a bug), keep the progress since the last save."""
    if run.step <= run.clock.start_step:
        return  # nothing new to keep
    with suppress(Exception):  # the original error is the one to report
        save(run, every_rank=False)
        run.emit("warning", {"message": f"saved the state at step {run.step} before stopping on an error; "
                                        f"resume with: captioner train --resume {run.run_dir}"})


def run_epoch(run: Run, step_fn: StepFn) -> bool:
    """Train from the current position to the end of its epoch (or a stop); True when training is over."""
    if run.step_in_epoch >= run.steps_per_epoch:  # resumed from a state saved at its epoch's last step
        run.epoch += 1
        return False
    _backbone_phase(run)
    run.sampler.set_epoch(run.epoch, start=run.step_in_epoch * run.cfg.batch_size * run.cfg.accumulate)
    run.data.train_set.set_epoch(run.epoch)
    for group in _groups(run.loader, run.cfg.accumulate):
        stats = step_fn(run, group)
        run.step += 1
        _after_step(run, stats)
        _agree_on_stopping(run)
        if run.interrupted:
            break
        if run.cfg.val_every and run.step % run.cfg.val_every == 0:
            validate_and_save(run)
        if run.stopping() or run.out_of_time:  # the last step, early stop's patience, or the clock
            break
    if run.interrupted:
        save(run)
        raise TrainingInterrupted(f"stopped at step {run.step}; state saved. "
                                  f"Resume with: captioner train --resume {run.run_dir}")
    return _end_epoch(run)


def _backbone_phase(run: Run) -> None:
    """--freeze-backbone-epochs N: the decoder first learns on fixed ImageNet features, then the backbone joins."""
    encoder, n = run.model.encoder, run.cfg.freeze_backbone_epochs
    if not n or encoder.backbone is None or run.model.config.freeze_backbone:
        return
    frozen = run.epoch < n
    if frozen == encoder.frozen:
        return
    encoder.set_frozen(frozen)
    if run.dist.world > 1 or run.cfg.compile:
        wrap_for_training(run)  # DDP records which parameters need gradients when it is built
    if not frozen:
        run.emit("note", {"message": f"epoch {run.epoch + 1}: the backbone now fine-tunes "
                                     f"(peak lr {run.cfg.resolved_backbone_lr():g})"})


def _groups(loader: torch.utils.data.DataLoader, size: int) -> Iterator[list[Batch]]:
    """The loader's batches in groups of `size`, one group per optimiser step (a ragged tail is dropped)."""
    group: list[Batch] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _agree_on_stopping(run: Run) -> None:
    """Ctrl-C / SIGTERM and the time limit, OR-ed over all processes, so every rank stops at the same step."""
    time_up = run.time_limit is not None and time.perf_counter() - run.started > run.time_limit * 60
    interrupted, run.out_of_time = any_rank([bool(run.interrupted), time_up], run.dist, run.device)
    if interrupted and not run.interrupted:
        run.interrupted.append(signal.SIGTERM)  # another rank was signalled


def _end_epoch(run: Run) -> bool:
    """Validate at an epoch's end or a stop; True when training is over."""
    end_of_epoch = run.step_in_epoch >= run.steps_per_epoch
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
    if run.converged():
        run.emit("warning", {"message": run.early_stop_reason()})
    return run.stopping()


def _after_step(run: Run, stats: dict[str, Any]) -> None:
    """Time bookkeeping, progress events and the loss curve in metrics.jsonl."""
    clock = run.clock
    if run.budget is not None:
        now = time.perf_counter()
        run.budget.train_s += now - clock.tick
        clock.tick = now
        if run.step - clock.start_step in REFIT_AFTER_STEPS:
            _refit(run, now)
    clock.window_images += stats.pop("images") * run.dist.world
    if run.step % run.log_every and run.step != run.total_steps:
        return
    now = time.perf_counter()
    seconds = max(now - clock.window_start, 1e-9)  # not 0: a window can be shorter than the clock's resolution
    progress = {"step": run.step, "total": run.total_steps, "epoch": run.epoch,
                "lr": run.scheduler.get_last_lr()[0], "images_per_s": clock.window_images / seconds}
    scalars = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in stats.items()}
    progress.update({k: all_mean(v, run.dist, run.device) if k == "loss" else v for k, v in scalars.items()})
    run.emit("step", progress)
    clock.window_images, clock.window_start = 0, now
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
    seconds = time.perf_counter() - run.clock.t0
    stopped = run.stop_reason()
    run.emit("end", {"run_dir": str(run.run_dir), "steps": run.step, "seconds": seconds, "stopped": stopped,
                     "best": run.best, "last": run.last})
    return TrainResult(run.run_dir, run.step, run.epoch, seconds, stopped, run.best, run.last)


def train(cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False, on_event: Event | None = None,
          skip_bad_images: bool = False) -> TrainResult:
    """Train (or resume) a captioning model into `run_dir` with cross-entropy, and return what it achieved."""
    run = prepare(cfg, run_dir, resume=resume, on_event=on_event, skip_bad_images=skip_bad_images)
    return fit(run, cross_entropy_step)
