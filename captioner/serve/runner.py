"""The model in a process of its own, so that its Python never waits on the web server's for the GIL.

A batch's decoding steps are many small operators, each of which takes the GIL back for a moment; in the
server's process the event loop (HTTP parsing, multipart, JSON) holds it in between, and under load the
model slows down (benchmarks/NOTES.md, serve). `ModelProcess` loads the run in a child process and captions
the batches the batcher sends it over a pipe; it offers `caption_tensor` like a `Captioner`, so the batcher
runs either one the same way.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import signal
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from captioner.api import Caption, Captioner, DecodeSettings
from captioner.errors import CaptionerError

START_TIMEOUT_S = 600  # loading a large run from a slow disk, plus the child's imports
STOP_TIMEOUT_S = 10  # the child's last batch is done by then: the server answered its requests before stopping


class ModelProcessError(CaptionerError):
    """The model process failed to start, or stopped while captioning."""


@dataclass(frozen=True)
class ModelSpec:
    """What the child loads (the run as `Captioner.load` takes it), its threads, and the search it warms up."""

    run_dir: Path
    which: str = "best"
    device: str = "auto"
    precision: str = "auto"
    threads: int = 1
    decoding: DecodeSettings = field(default_factory=DecodeSettings)


def warm_up(captioner: Captioner, settings: DecodeSettings) -> None:
    """Caption one blank image with the server's search, so the first request does not pay for lazy set-up
    (kernels, a CUDA graph's recording, a compile)."""
    S = captioner.preprocess.image_size
    captioner.caption_tensor(torch.zeros(1, 3, S, S), settings)


class ModelProcess:
    """A child process holding the model; `caption_tensor` sends it a batch and waits for the captions.

    A child that dies (killed, out of memory) fails the batch it held with ModelProcessError, and a new one
    starts in the background; the next batch waits for it. Only the batcher's one thread calls `caption_tensor`.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.info: dict[str, str] = {}  # the child's device and dtype, as GET /v1/model reports them
        self._restarting: threading.Thread | None = None
        self._restart_error: ModelProcessError | None = None
        self._start()

    def caption_tensor(self, batch: torch.Tensor, settings: DecodeSettings | None = None, *,
                       need_weights: bool = False) -> list[Caption]:
        """Caption a preprocessed batch (B, 3, S, S) in the child."""
        self._wait_for_restart()
        try:
            self._send((batch.cpu(), settings, need_weights))
            kind, value = self._receive()
        except ModelProcessError as err:
            code = self._ended()
            self._restarting = threading.Thread(target=self._restart, name="captioner-model-restart", daemon=True)
            self._restarting.start()
            raise ModelProcessError(f"the model process stopped (exit code {code}) while captioning; a new one "
                                    "is starting") from err
        if kind == "error":  # the batch itself failed, as it would have here: an internal error, not a restart
            raise RuntimeError(f"captioning failed in the model process: {value}")
        return value

    def close(self) -> None:
        """Ask the child to finish and wait for it; terminate it, then kill it, if it does not."""
        if self._restarting is not None:
            self._restarting.join()
        with contextlib.suppress(OSError, ModelProcessError):  # already gone
            self._send(None)
        self._ended()

    # -- the child's life ---------------------------------------------------------------------------

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fork would copy the server's threads and locks
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_batches, args=(child, self.spec), daemon=True,
                                        name="captioner-model")
        self._process.start()
        child.close()  # the child's end: once the child exits, a read here fails instead of waiting forever
        try:
            if not self._conn.poll(START_TIMEOUT_S):
                raise ModelProcessError(f"did not start within {START_TIMEOUT_S} s")
            kind, value = self._receive()
        except ModelProcessError as err:
            raise ModelProcessError(f"the model process could not start (exit code {self._ended()}): {err}") \
                from None
        if kind != "ready":
            self._ended()
            raise ModelProcessError(f"the model process could not load {self.spec.run_dir}: {value}")
        self.info = value

    def _restart(self) -> None:
        try:
            self._start()
        except ModelProcessError as err:
            self._restart_error = err

    def _wait_for_restart(self) -> None:
        if self._restarting is None:
            return
        self._restarting.join()
        self._restarting, error, self._restart_error = None, self._restart_error, None
        if error is not None:
            raise error

    def _ended(self) -> int | None:
        """Wait for the child to end (terminating, then killing it if it must), close the pipe; its exit code."""
        self._process.join(STOP_TIMEOUT_S)
        for stop in (self._process.terminate, self._process.kill):
            if self._process.is_alive():
                stop()
                self._process.join(STOP_TIMEOUT_S)
        self._conn.close()
        return self._process.exitcode  # negative: the signal that ended it (-9: killed, often out of memory)

    def _send(self, message: Any) -> None:
        try:
            self._conn.send_bytes(pickle.dumps(message))  # by value: no shared-memory handle per tensor
        except OSError as err:
            raise ModelProcessError("the model process is gone") from err

    def _receive(self) -> tuple[str, Any]:
        try:
            return pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as err:
            raise ModelProcessError("the model process stopped") from err


def _serve_batches(conn: Connection, spec: ModelSpec) -> None:
    """The child: load the run, say "ready", then caption each batch received until told to stop."""
    # Ctrl-C and a service manager's SIGTERM reach the whole group: the server finishes its requests, then stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    try:
        captioner = Captioner.load(spec.run_dir, which=spec.which, device=spec.device, precision=spec.precision)
        warm_up(captioner, spec.decoding)
    except Exception as err:  # noqa: BLE001 (the parent reports it in one line)
        conn.send_bytes(pickle.dumps(("failed", str(err))))
        return
    ready = {"device": str(captioner.device), "dtype": str(captioner.dtype).removeprefix("torch.")}
    conn.send_bytes(pickle.dumps(("ready", ready)))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:
            return  # the server is gone
        if message is None:
            return
        batch, settings, need_weights = message
        try:
            answer = ("ok", captioner.caption_tensor(batch, settings, need_weights=need_weights))
        except Exception as err:  # noqa: BLE001 (one batch failed: its requests get the reason, the child goes on)
            answer = ("error", f"{type(err).__name__}: {err}")
        conn.send_bytes(pickle.dumps(answer))
