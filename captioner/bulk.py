"""Caption many files into a results file: streamed in input order, resumable, sharded across torchrun ranks.

`caption_many` is what `captioner caption` runs. Under torchrun every rank captions its share of each
global batch (batch_size files per rank, ranks in order), rank 0 gathers the batch and writes it, so
the one results file is in input order and grows as batches finish. Progress and results are reported
through `on_event(kind, data)` on rank 0; nothing here prints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from captioner.api import Captioner, FileResults, collect_images
from captioner.data.files import workers_for
from captioner.decoding import Caption, DecodeSettings
from captioner.errors import CaptionerError, ConfigError, ImageError
from captioner.results import ResultWriter, caption_record, done_images, read_results, result_format
from captioner.runtime import Dist, close_distributed, init_distributed

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class Plan:
    """What rank 0 decided before any captioning: the files still to caption and what is carried over."""

    todo: list[Path]
    carried: list[dict[str, Any]]  # records of a resumed results file, written again first
    problems: list[tuple[str, str]]  # (pattern, reason): patterns that matched nothing, files not found
    total: int  # files the patterns name, done ones included


@dataclass
class BulkResult:
    """What a `caption_many` run did (on rank 0; other ranks see only their own failures)."""

    captioned: int = 0
    skipped: int = 0  # already in the resumed results file
    failures: list[ImageError] = field(default_factory=list)  # patterns and files, in the order met
    out: Path | None = None
    records: int = 0  # records in the results file at the end, carried ones included


def caption_many(patterns: Sequence[str], settings: DecodeSettings, *, model: Path | None = None,
                 which: str = "best", device: str = "auto", precision: str = "auto", out: Path | None = None,
                 resume_from: Path | None = None, skip_done: bool = False, overwrite: bool = False,
                 recursive: bool = False, batch_size: int = 32, workers: int | None = None,
                 on_event: Event | None = None) -> BulkResult:
    """Caption the images that patterns name; results to `out` (.jsonl/.csv/.json) and to on_event('batch').

    resume_from: a results file whose images are not captioned again and whose records are carried
    into `out` (default: the same file); skip_done: the same with `out` itself. Events (rank 0 only):
    'problem' {error}, 'start' {total, skipped, todo, world, workers}, 'batch' {records, failures}.
    """
    dist = init_distributed(device)
    emit = on_event if on_event is not None and dist.main else (lambda kind, data: None)
    if skip_done and resume_from is None:
        resume_from = out
    if resume_from is not None and out is None:
        out = resume_from
    plan = _share(lambda: _plan(patterns, out=out, resume_from=resume_from, overwrite=overwrite,
                                recursive=recursive), dist)
    result = BulkResult(skipped=plan.total - len(plan.todo), out=out,
                        failures=[ImageError(pattern, reason) for pattern, reason in plan.problems])
    for problem in result.failures:
        emit("problem", {"error": problem})
    if not plan.todo:  # nothing left to caption: no model to load, the resumed file rewritten whole
        if out is not None and plan.carried and dist.main:
            ResultWriter(out, n_best=settings.n_best > 1, carried=plan.carried).close()
        result.records = len(plan.carried)
        close_distributed(dist)
        return result
    if dist.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{dist.local_rank}"
    captioner = Captioner.load(model, which=which, device=device, precision=precision)
    shard = _shard(plan.todo, batch_size, dist)
    if workers is None:  # torchrun's ranks on this machine share its cores
        workers = workers_for(len(shard), batch_size, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    emit("start", {"total": plan.total, "skipped": result.skipped, "todo": len(plan.todo), "world": dist.world,
                   "workers": workers})
    writer = ResultWriter(out, n_best=settings.n_best > 1, carried=plan.carried) if out and dist.main else None
    try:
        steps = math.ceil(len(plan.todo) / (batch_size * dist.world))
        sink = _Sink(dist, writer, emit, result, n_best=settings.n_best > 1)
        _, failures = captioner.caption_files(shard, settings, batch_size=batch_size, workers=workers,
                                              on_batch=sink)
        while sink.steps < steps:  # a rank whose share ran out still joins every gather
            sink([])
    finally:
        if writer is not None:
            writer.close()  # a JSON array is closed even on Ctrl-C
    if not dist.main:
        result.failures += failures
    result.records = writer.count if writer is not None else 0
    close_distributed(dist)
    return result


def _plan(patterns: Sequence[str], *, out: Path | None, resume_from: Path | None, overwrite: bool,
          recursive: bool) -> Plan:
    """Expand the patterns and drop the images the resumed results file already holds."""
    if out is not None:
        result_format(out)  # an unknown suffix is refused before any work
        continuing = resume_from is not None and os.path.abspath(resume_from) == os.path.abspath(out)
        if not continuing and not overwrite and out.exists() and out.stat().st_size > 0:
            hint = "--skip-done to caption only the images not in it, or " if resume_from is None else ""
            raise ConfigError(f"{out}: already exists; add {hint}--overwrite to start it again")
    carried: list[dict[str, Any]] = []
    if resume_from is not None:
        if resume_from.exists():
            carried = read_results(resume_from)
        elif resume_from != out:
            raise ConfigError(f"{resume_from}: results file not found")
    paths, problems = collect_images(patterns, recursive=recursive)
    done = done_images(carried)
    todo = [p for p in paths if os.path.abspath(p) not in done]
    return Plan(todo, carried, [(p.path, p.reason) for p in problems], len(paths))


def _shard(paths: list[Path], batch_size: int, dist: Dist) -> list[Path]:
    """This rank's files: its batch_size slice of every global batch of batch_size x world files.

    Every slice but those of the last global batch is full, so the rank's loader batches line up with
    the global steps, and the ranks' batches of one step, concatenated in rank order, are in input order.
    """
    step = batch_size * dist.world
    return [p for start in range(0, len(paths), step)
            for p in paths[start + dist.rank * batch_size:start + (dist.rank + 1) * batch_size]]


class _Sink:
    """Receives each batch of this rank; rank 0 gathers the step from every rank, writes and reports it."""

    def __init__(self, dist: Dist, writer: ResultWriter | None, emit: Event, result: BulkResult, *,
                 n_best: bool) -> None:
        self.dist, self.writer, self.emit, self.result, self.n_best = dist, writer, emit, result, n_best
        self.steps = 0

    def __call__(self, batch: FileResults) -> None:
        # Plain tuples: an ImageError does not survive pickling between processes.
        mine = [(str(p), caption_record(str(p), r, n_best=self.n_best) if isinstance(r, Caption) else None,
                 r.reason if isinstance(r, ImageError) else None) for p, r in batch]
        merged = _gather(mine, self.dist)
        self.steps += 1
        if not self.dist.main:
            return
        records = [rec for _, rec, _ in merged if rec is not None]
        failures = [ImageError(path, reason) for path, _, reason in merged if reason is not None]
        if self.writer is not None:
            self.writer.write(records)
        self.result.captioned += len(records)
        self.result.failures += failures
        self.emit("batch", {"records": records, "failures": failures})


# ----------------------------------------------------------------------------- torchrun


def _share(make: Callable[[], Plan], dist: Dist) -> Plan:
    """Rank 0 makes the plan and every rank receives it; an error on rank 0 stops every rank."""
    if dist.world == 1:
        return make()
    import torch.distributed as torch_dist

    box: list[Any] = [None]
    if dist.main:
        try:
            box[0] = make()
        except CaptionerError as err:
            box[0] = err
    torch_dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], CaptionerError):
        raise box[0] if dist.main else CaptionerError(f"rank 0 stopped: {box[0]}")
    return box[0]


def _gather(items: list[Any], dist: Dist) -> list[Any]:
    """Every rank's items, concatenated in rank order (a no-op when run alone)."""
    if dist.world == 1:
        return items
    import torch.distributed as torch_dist

    parts: list[Any] = [None] * dist.world
    torch_dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]

