"""Run the application under uvicorn: one process, one model, graceful on SIGINT and SIGTERM.

On either signal uvicorn stops accepting connections, lets every in-flight request finish (for up to the
request timeout), then runs the app's shutdown, which stops the batcher; only then does the process exit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from captioner.api import Captioner
from captioner.runtime import precision_plan, resolve_device
from captioner.serve.app import create_app
from captioner.serve.runner import ModelProcess, ModelSpec, warm_up
from captioner.serve.settings import ServeSettings


def serve(settings: ServeSettings, *, model: str | Path | None = None, which: str = "best", device: str = "auto",
          precision: str = "auto") -> None:
    """Load a run (default: the newest under ./runs) and serve it until SIGINT or SIGTERM.

    With `settings.model_process` the model captions in a child process that loads the run on `device`
    (started here, before the server, and stopped after it); this process keeps the run's vocabulary,
    preprocessing and config to open images and describe the model, and frees the weights.
    """
    precision_plan(precision, resolve_device(device))  # a device or precision that is not there: one line now
    if not settings.model_process:
        captioner = Captioner.load(model, which=which, device=device, precision=precision)
        warm_up(captioner, settings.decoding)
        return _run(create_app(captioner, settings), settings)
    captioner = Captioner.load(model, which=which, device="cpu", precision="fp32")
    child = ModelProcess(ModelSpec(captioner.run.run_dir, which=captioner.run.which, device=device,
                                   precision=precision, threads=torch.get_num_threads(), decoding=settings.decoding))
    captioner.model.to("meta")  # this process never runs the model: keep its shapes and config, free its weights
    try:
        _run(create_app(captioner, settings, child), settings)
    finally:
        child.close()


def _run(app: FastAPI, settings: ServeSettings) -> None:
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            timeout_graceful_shutdown=int(settings.timeout_s) + 1, server_header=False,
                            log_level="info")
    # uvicorn re-raises Ctrl-C once it has shut down; for a server that is the way to stop, not an error
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()
