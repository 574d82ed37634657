"""`captioner serve`: a local web page and a JSON HTTP API over `Captioner`, with dynamic batching.

    settings.py  ServeSettings (limits, the token) and the rule that an exposed host needs a token
    uploads.py   uploaded bytes -> model inputs through the one image loader (the CLI's messages)
    batcher.py   gathers concurrent requests for a few milliseconds and captions them as one batch
    runner.py    the model in a process of its own (the default), which captions the batcher's batches
    app.py       the FastAPI application: routes, the body limit, errors as {"error": "..."}
    server.py    uvicorn, which finishes in-flight requests on SIGINT/SIGTERM before it exits
    static/      the page at / (HTML, JS, CSS; no CDN, no build step)

FastAPI, uvicorn and python-multipart are the optional `serve` extra: only `app.py` and `server.py` import
them, and `missing_extra` lets the CLI say what is absent in one line before anything tries.
"""

from __future__ import annotations

import importlib.util

# Import names of the `serve` extra's packages (python-multipart imports as python_multipart).
EXTRA_MODULES = ("fastapi", "uvicorn", "python_multipart")


def missing_extra() -> str | None:
    """The one-line reason `captioner serve` cannot start for want of its extra, or None."""
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"captioner serve needs the serve extra: pip install 'captioner[serve]' (missing: {', '.join(missing)})"
