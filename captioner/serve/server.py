"""Run the application under uvicorn: one process, one model, graceful on SIGINT and SIGTERM.

On either signal uvicorn stops accepting connections, lets every in-flight request finish (for up to the
request timeout), then runs the app's shutdown, which stops the batcher; only then does the process exit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import uvicorn

from captioner.api import Captioner
from captioner.runtime import resolve_device
from captioner.serve.app import create_app
from captioner.serve.runner import ModelSpec
from captioner.serve.settings import ServeSettings


def warm_up(captioner: Captioner) -> None:
    """Caption one blank image, so the first request does not pay for lazy initialisation (kernels, graphs)."""
    S = captioner.preprocess.image_size
    captioner.caption_tensor(torch.zeros(1, 3, S, S))


def serve(settings: ServeSettings, *, model: str | Path | None = None, which: str = "best", device: str = "auto",
          precision: str = "auto") -> None:
    """Load a run (default: the newest under ./runs) and serve it until SIGINT or SIGTERM.

    With `settings.model_process` the model captions in a child process that loads the run on `device`;
    this process keeps a CPU copy to open images and describe the model.
    """
    resolve_device(device)  # a device that is not there: one line now, not a failed child later
    if settings.model_process:
        captioner = Captioner.load(model, which=which, device="cpu", precision="fp32")
        spec = ModelSpec(captioner.run.run_dir, which=captioner.run.which, device=device, precision=precision,
                         threads=torch.get_num_threads())
    else:
        captioner, spec = Captioner.load(model, which=which, device=device, precision=precision), None
        warm_up(captioner)
    config = uvicorn.Config(create_app(captioner, settings, spec), host=settings.host, port=settings.port,
                            timeout_graceful_shutdown=int(settings.timeout_s) + 1, server_header=False,
                            log_level="info")
    # uvicorn re-raises Ctrl-C once it has shut down; for a server that is the way to stop, not an error
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()
