"""Dynamic batching: concurrent requests' images gathered for a few milliseconds and captioned as one batch.

The way TorchServe and Triton batch: the model's batch throughput shared by many small requests. A batch
waits only while other requests are still opening their images (a lone client pays no wait), and never
past `wait_s`. The model runs in one thread of its own, so the event loop keeps accepting requests while
a batch decodes; images that asked for different searches are captioned in separate groups.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from captioner.api import Caption, Captioner, DecodeSettings
from captioner.serve.runner import ModelProcess


class QueueFull(Exception):
    """More images are waiting for the model than the queue allows."""


class ShuttingDown(Exception):
    """The server stopped before this image reached the model."""


@dataclass
class Admission:
    """A request's room in the queue, from admission until it is answered."""

    n_images: int
    arrived: bool = False  # its images are queued (until then a gathering batch may wait for them)


@dataclass
class Job:
    """One image waiting for the model, and where its caption goes."""

    image: torch.Tensor  # (3, S, S)
    settings: DecodeSettings
    need_weights: bool
    future: asyncio.Future

    def key(self) -> tuple:
        """Jobs with equal keys can share one search."""
        return dataclasses.astuple(self.settings), self.need_weights


class Batcher:
    """Gathers jobs from many requests into batches for one model thread."""

    def __init__(self, model: Captioner | ModelProcess, *, max_batch: int, wait_s: float, queue_limit: int) -> None:
        self.model = model  # what captions a batch: the Captioner here, or the model's own process
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue_limit = queue_limit
        self.pending = 0  # images admitted and not yet answered (the queue limit counts these)
        self.arriving = 0  # admitted requests still opening their images: worth a batch's short wait
        self.batches = 0  # batches captioned, and the images in them: for /healthz and the benchmark
        self.images = 0
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._model = ThreadPoolExecutor(1, thread_name_prefix="captioner-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start gathering (inside the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop gathering; a job still queued is answered with ShuttingDown."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ShuttingDown())
        self._model.shutdown(wait=True)

    @contextmanager
    def admit(self, n_images: int) -> Iterator[Admission]:
        """Hold room for a request's images until it is answered; QueueFull when there is none."""
        if self.pending + n_images > self.queue_limit:
            raise QueueFull()
        admission = Admission(n_images)
        self.pending += n_images
        self.arriving += 1
        try:
            yield admission
        finally:
            self.pending -= n_images
            if not admission.arrived:  # it failed before its images reached the queue
                self.arriving -= 1

    async def caption(self, admission: Admission, images: list[torch.Tensor], settings: DecodeSettings, *,
                      need_weights: bool = False) -> list[Caption]:
        """Queue an admitted request's images; their captions, in order, once their batches are done."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures, strict=True):
            self._queue.put_nowait(Job(image, settings, need_weights, future))
        admission.arrived = True
        self.arriving -= 1  # arrived: no batch need wait for it any more
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()  # a timed-out request's images are dropped from the batches still to run

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [job for job in await self._gather() if not job.future.done()]
            if jobs:
                results = await loop.run_in_executor(self._model, self._decode, jobs)
                for job, result in zip(jobs, results, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    async def _gather(self) -> list[Job]:
        """The next batch: what is queued now, plus what arrives while requests are still opening images."""
        jobs = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(jobs) < self.max_batch:
            if not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if self.arriving == 0 or left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return jobs

    def _decode(self, jobs: list[Job]) -> list[Caption | BaseException]:
        """Caption a batch in the model thread, one search per group of equal settings."""
        results: dict[int, Caption | BaseException] = {}
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key(), []).append(i)
        for indices in groups.values():
            first = jobs[indices[0]]
            try:
                batch = torch.stack([jobs[i].image for i in indices])  # (B, 3, S, S)
                captions = self.model.caption_tensor(batch, first.settings, need_weights=first.need_weights)
            except Exception as err:  # noqa: BLE001 (a failed group answers its own requests, not the server)
                captions = [err] * len(indices)
            for i, caption in zip(indices, captions, strict=True):
                results[i] = caption
        self.batches += 1
        self.images += len(jobs)
        return [results[i] for i in range(len(jobs))]
