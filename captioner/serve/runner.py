"""The model in a process of its own, so that its Python never waits on the web server's for the GIL.

A batch's decoding steps are many small operators, each of which takes the GIL back for a moment; in the
server's process the event loop (HTTP parsing, multipart, JSON) holds it in between, and the model slows
down by more than half under load (benchmarks/NOTES.md, serve). `ModelProcess` loads the run in a child
process and captions the batches the batcher sends it over a pipe; it offers `caption_tensor` like a
`Captioner`, so the batcher runs either one the same way.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from captioner.api import Caption, Captioner, DecodeSettings

START_TIMEOUT_S = 600  # loading a large run from a slow disk, plus the child's imports
STOP_TIMEOUT_S = 10  # the child's last batch is done by then: the server answered its requests before stopping


class ModelProcessError(RuntimeError):
    """The model process failed to start, or stopped while captioning."""


@dataclass(frozen=True)
class ModelSpec:
    """What the child loads: the run as `Captioner.load` takes it, and its intra-op threads."""

    run_dir: Path
    which: str = "best"
    device: str = "auto"
    precision: str = "auto"
    threads: int = 1


class ModelProcess:
    """A child process holding the model; `caption_tensor` sends it a batch and waits for the captions."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.info: dict[str, str] = {}  # the child's device and dtype, as GET /v1/model reports them
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fork would copy the server's threads and locks
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_batches, args=(child, self.spec), daemon=True,
                                        name="captioner-model")
        self._process.start()
        child.close()  # the child's end: once the child exits, a read here fails instead of waiting forever
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise ModelProcessError(f"the model process did not start within {START_TIMEOUT_S} s")
        kind, value = self._receive()
        if kind != "ready":
            self.close()
            raise ModelProcessError(f"the model process could not load {self.spec.run_dir}: {value}")
        self.info = value

    def caption_tensor(self, batch: torch.Tensor, settings: DecodeSettings | None = None, *,
                       need_weights: bool = False) -> list[Caption]:
        """Caption a preprocessed batch (B, 3, S, S) in the child; a dead child is replaced for the next batch."""
        try:
            self._conn.send((batch.cpu(), settings, need_weights))
            kind, value = self._receive()
        except (OSError, ModelProcessError) as err:  # killed (out of memory, a signal): a new child, then the reason
            self._process.join(STOP_TIMEOUT_S)
            code = self._process.exitcode  # negative: the signal that ended it (-9: killed, often out of memory)
            self._conn.close()
            self._start()
            raise ModelProcessError(f"the model process stopped (exit code {code}) while captioning; "
                                    "a new one has started") from err
        if kind == "error":  # the batch itself failed, as it would have here: an internal error, not a restart
            raise RuntimeError(f"captioning failed in the model process: {value}")
        return value

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as err:
            raise ModelProcessError("the model process stopped") from err

    def close(self) -> None:
        """Ask the child to finish and wait for it; terminate it if it does not."""
        with contextlib.suppress(OSError):  # already gone
            self._conn.send(None)
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(STOP_TIMEOUT_S)
        self._conn.close()


def _serve_batches(conn: Connection, spec: ModelSpec) -> None:
    """The child: load the run, say "ready", then caption each batch received until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server stops us in turn
    torch.set_num_threads(spec.threads)
    try:
        captioner = Captioner.load(spec.run_dir, which=spec.which, device=spec.device, precision=spec.precision)
        S = captioner.preprocess.image_size
        captioner.caption_tensor(torch.zeros(1, 3, S, S))  # the first request should not pay for lazy set-up
    except Exception as err:  # noqa: BLE001 (the parent reports it in one line)
        conn.send(("failed", str(err)))
        return
    conn.send(("ready", {"device": str(captioner.device), "dtype": str(captioner.dtype).removeprefix("torch.")}))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # the server is gone
        if message is None:
            return
        batch, settings, need_weights = message
        try:
            conn.send(("ok", captioner.caption_tensor(batch, settings, need_weights=need_weights)))
        except Exception as err:  # noqa: BLE001 (one batch failed: its requests get the reason, the child goes on)
            conn.send(("error", f"{type(err).__name__}: {err}"))
