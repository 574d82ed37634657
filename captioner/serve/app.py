"""The FastAPI application: the page at /, the JSON API under /v1, and every refusal as {"error": "..."}.

Each refusal is one line with its status: 400 an unusable image (the CLI's message for the same file) or a
malformed form, 401 a missing or wrong token, 413 a body over the upload cap, 415 a body that is neither
a form of files nor an image, 422 a bad parameter, 503 a full queue or a request that timed out (both with
Retry-After). Uploads are read from the request only: no request can name a file on the server.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captioner import __version__
from captioner.api import Caption, Captioner, DecodeSettings
from captioner.config import declared
from captioner.errors import ConfigError, ImageError, printable
from captioner.overlay import check_layer, heatmap_overlay, parse_layer, select_maps
from captioner.results import caption_record
from captioner.serve.batcher import Admission, Batcher, QueueFull, ShuttingDown
from captioner.serve.runner import ModelProcess, ModelProcessError
from captioner.serve.settings import MB, ServeSettings
from captioner.serve.uploads import Upload, UploadReader, private_folder, upload_name

T = TypeVar("T")
STATIC = Path(__file__).parent / "static"
OVERLAY_SIDE = 512  # longer side of an overlay PNG: enough to see, small enough to send per word
RETRY_AFTER = {"Retry-After": "1"}
# What a refused upload may still send before the refusal: reading it lets every client see the 413
# (one that is still writing when the connection closes sees a reset instead); beyond this, close.
DRAIN_LIMIT = 64 * MB


class Refusal(Exception):
    """A request the server refuses: its status, one-line reason and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


# ----------------------------------------------------------------------------- the service


class Service:
    """What the routes share: the model, the settings, and (while running) the batcher and the threads."""

    def __init__(self, captioner: Captioner, settings: ServeSettings, model: ModelProcess | None) -> None:
        self.captioner = captioner  # opens images, knows the vocabulary; captions too unless `model` is given
        self.settings = settings
        self.runner: Captioner | ModelProcess = captioner if model is None else model  # what captions batches
        self.info = model_info(captioner)
        if model is not None:
            self.info.update(model.info)  # the device and dtype the model runs in, in its process

    def start(self) -> None:
        """Start the batcher and the threads that open images (inside the running event loop)."""
        s = self.settings
        self.batcher = Batcher(self.runner, max_batch=s.max_batch, wait_s=s.batch_wait_ms / 1000,
                               queue_limit=s.queue_limit)
        self.batcher.start()
        self.folder = private_folder()
        self.reader = UploadReader(self.captioner, Path(self.folder.name))
        self.threads = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="captioner-open")

    async def stop(self) -> None:
        """Stop once the server has answered its in-flight requests."""
        await self.batcher.stop()
        self.threads.shutdown(wait=True)
        self.folder.cleanup()

    @contextmanager
    def admit(self, n_images: int) -> Iterator[Admission]:
        """The batcher's room for a request's images; a full queue is answered with 503 and Retry-After."""
        try:
            with self.batcher.admit(n_images) as admission:
                yield admission
        except QueueFull:
            raise Refusal(503, "the queue is full: too many images are waiting for the model, retry shortly",
                          RETRY_AFTER) from None

    async def open_all(self, uploads: list[Upload], open_one: Callable[[Upload], T]) -> list[T]:
        """Open every upload in the threads; the first unusable one raises its ImageError."""
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self.threads, open_one, u) for u in uploads)))

    async def within_timeout(self, work: Coroutine[Any, Any, T]) -> T:
        """The request's work, or 503 when it outlasts the timeout."""
        try:
            return await asyncio.wait_for(work, self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise Refusal(503, f"no answer within {self.settings.timeout_s:g} s: the server is busy, retry later",
                          RETRY_AFTER) from None


def model_info(captioner: Captioner) -> dict[str, Any]:
    """What GET /v1/model says: the architecture, the vocabulary, the training data and validation scores."""
    run, config = captioner.run, captioner.model.config
    data = run.config.get("data", {})
    source = str(data.get("source") or "")
    return {
        "name": run.run_dir.name, "version": __version__, "encoder": config.encoder,
        "image_size": captioner.preprocess.image_size, "d_model": config.d_model, "n_layers": config.n_layers,
        "n_heads": config.n_heads, "vocab_size": len(captioner.vocab),
        "parameters": sum(p.numel() for p in captioner.model.parameters()), "weights": run.which,
        "device": str(captioner.device), "dtype": str(captioner.dtype).removeprefix("torch."),
        # a dataset's file name, never its folder on this machine
        "data": {"source": Path(source).name if source else None, "splits": data.get("splits")},
        "validation": {k: v for k, v in run.meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }


def service_of(request: Request) -> Service:
    """The Service of the app that received the request."""
    return request.app.state.service


# ----------------------------------------------------------------------------- reading a request


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    """A multipart form's files, or the body as one image; 415 for any other body, 400 for none."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media == "multipart/form-data":
        uploads = await _form_uploads(request, max_images)
    elif media.startswith("image/") or media == "application/octet-stream":
        uploads = [Upload("upload", await request.body())]
    else:
        raise Refusal(415, f"unsupported content type {printable(media) or '(none)'}: send images as "
                           "multipart/form-data files, or one image as the body (image/* or application/octet-stream)")
    if not uploads:
        raise Refusal(400, "no image in the request: send files as multipart/form-data, or one image as the body")
    return uploads


async def _form_uploads(request: Request, max_images: int) -> list[Upload]:
    form = await request.form(max_files=max_images, max_fields=max_images)  # too many: 400 from Starlette
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        return [Upload(upload_name(f.filename, i), await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


def require_token(request: Request) -> None:
    """401 unless the request carries the server's token (compared in constant time); open when there is none."""
    token = service_of(request).settings.token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Refusal(401, "missing or wrong token: send the header Authorization: Bearer <token>",
                      {"WWW-Authenticate": "Bearer"})


def decode_settings(base: DecodeSettings, **options: Any) -> DecodeSettings:
    """The server's DecodeSettings with a request's query parameters; the CLI's message, as a 422, when they do not
    fit together."""
    try:
        return dataclasses.replace(base, **options)
    except ConfigError as err:
        raise Refusal(422, str(err)) from None


# ----------------------------------------------------------------------------- routes

def _query(name: str) -> Any:
    """A query parameter with the bounds and help its DecodeSettings field declares (config.py), as the CLI's flag."""
    spec = declared(DecodeSettings)[name]
    return Annotated[int, Query(ge=spec.low, le=spec.high, description=spec.help)]


Beam, NBest, MaxLen = _query("beam"), _query("n_best"), _query("max_len")
IMAGES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}

api = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])


@api.post("/caption", openapi_extra=IMAGES_BODY)
async def caption(request: Request, beam: Beam = 1, n_best: NBest = 1, max_len: MaxLen = 30) -> dict[str, Any]:
    """Caption one or several images: per image the caption, its score and log-probability, the n-best list."""
    service = service_of(request)
    settings = decode_settings(service.settings.decoding, beam=beam, n_best=n_best, max_len=max_len)
    uploads = await read_uploads(request, service.settings.max_images)
    with service.admit(len(uploads)) as admission:
        captions = await service.within_timeout(_caption(service, admission, uploads, settings))
    return {"model": service.info["name"],
            "results": [caption_record(u.name, c, n_best=True) for u, c in zip(uploads, captions, strict=True)]}


async def _caption(service: Service, admission: Admission, uploads: list[Upload],
                   settings: DecodeSettings) -> list[Caption]:
    images = await service.open_all(uploads, service.reader.tensor)
    return await service.batcher.caption(admission, images, settings)


@api.post("/attend", openapi_extra=IMAGES_BODY)
async def attend(request: Request, beam: Beam = 1, n_best: NBest = 1, max_len: MaxLen = 30,
                 layer: Annotated[str, Query(description="Decoder layer: last, all (mean) or an index.")] = "last",
                 overlays: Annotated[bool, Query(description="Add a PNG overlay per word (base64).")] = False,
                 ) -> dict[str, Any]:
    """Caption images with each word's cross-attention map over the encoder grid, as `captioner attend` draws it."""
    service = service_of(request)
    settings = decode_settings(service.settings.decoding, beam=beam, n_best=n_best, max_len=max_len)
    try:
        chosen = parse_layer(layer)
        check_layer(chosen, service.captioner.model.config.n_layers)
    except ConfigError as err:
        raise Refusal(422, str(err)) from None
    uploads = await read_uploads(request, service.settings.max_images)
    with service.admit(len(uploads)) as admission:
        results = await service.within_timeout(_attend(service, admission, uploads, settings, chosen, overlays))
    return {"model": service.info["name"], "layer": layer, "results": results}


async def _attend(service: Service, admission: Admission, uploads: list[Upload], settings: DecodeSettings,
                  layer: int | str, overlays: bool) -> list[dict[str, Any]]:
    opened = await service.open_all(uploads, service.reader.image_and_tensor)
    images = [image for image, _ in opened]  # whole and upright: overlays are drawn on them
    captions = await service.batcher.caption(admission, [t for _, t in opened], settings, need_weights=True)
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(
        loop.run_in_executor(service.threads, _attention_record, u.name, image, c, layer, overlays)
        for u, image, c in zip(uploads, images, captions, strict=True))))


def _attention_record(name: str, image: Image.Image, caption: Caption, layer: int | str,
                      overlays: bool) -> dict[str, Any]:
    """One image's caption record with its words, the grid, one map per word, and optionally the overlays."""
    assert caption.cross is not None and caption.grid is not None, "captioned with need_weights=True"
    words = caption.words
    maps = select_maps(caption.cross[: len(words)].numpy(), caption.grid, layer=layer)  # (T, h, w): drop <eos>
    record = {**caption_record(name, caption, n_best=True), "words": words, "grid": list(caption.grid),
              "maps": np.round(maps, 5).tolist()}
    if overlays:
        small = image.copy()
        small.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
        record["overlays"] = [_png_base64(heatmap_overlay(small, m)) for m in maps]
    return record


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@api.get("/model")
async def model(request: Request) -> dict[str, Any]:
    """The model served: encoder, sizes, vocabulary size, training data and the run's validation scores."""
    return service_of(request).info


# ----------------------------------------------------------------------------- the app


def create_app(captioner: Captioner, settings: ServeSettings, model: ModelProcess | None = None) -> FastAPI:
    """The application serving one model: the page at /, the API under /v1, /healthz, OpenAPI docs at /docs.

    model: a started process that captions the batches (runner.py; its owner stops it after the app);
    None: `captioner` captions them, here.
    """
    app = FastAPI(title="captioner", version=__version__, lifespan=_lifespan,
                  description="Caption images, and see where the model looked for each word.")
    app.state.service = Service(captioner, settings, model)
    app.include_router(api)
    app.add_api_route("/", _page, include_in_schema=False)
    app.add_api_route("/healthz", _health, methods=["GET"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for kind, handler in _HANDLERS.items():
        app.add_exception_handler(kind, handler)
    if settings.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> Any:
    service: Service = app.state.service
    service.start()
    try:
        yield
    finally:
        await service.stop()


async def _page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


async def _health(request: Request) -> dict[str, Any]:
    """Liveness for a load balancer (no token): the queue's depth and the batches captioned so far."""
    batcher = service_of(request).batcher
    return {"status": "ok", "pending": batcher.pending, "batches": batcher.batches, "images": batcher.images}


# ----------------------------------------------------------------------------- refusals


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": printable(message)}, status_code=status, headers=headers)


def _validation_message(err: RequestValidationError) -> str:
    """Pydantic's errors as one line: `beam: Input should be greater than or equal to 1`."""
    parts = [f"{e['loc'][-1]}: {e['msg']}" if e.get("loc") else e["msg"] for e in err.errors()]
    return "; ".join(parts) or "invalid request"


_HANDLERS: dict[type[Exception], Callable[[Request, Any], Coroutine[Any, Any, JSONResponse]]] = {}


def _handles(kind: type[Exception]) -> Callable:
    def register(fn: Callable) -> Callable:
        _HANDLERS[kind] = fn
        return fn
    return register


@_handles(Refusal)
async def _refusal(request: Request, err: Refusal) -> JSONResponse:
    return _error(err.status, str(err), err.headers)


@_handles(ImageError)
async def _image_error(request: Request, err: ImageError) -> JSONResponse:
    return _error(400, str(err))


@_handles(ShuttingDown)
async def _shutting_down(request: Request, err: ShuttingDown) -> JSONResponse:
    return _error(503, "the server is shutting down", RETRY_AFTER)


@_handles(ModelProcessError)
async def _model_process(request: Request, err: ModelProcessError) -> JSONResponse:
    return _error(503, str(err), RETRY_AFTER)  # a new model process is starting: the next try is served


@_handles(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    return _error(422, _validation_message(err))


@_handles(HTTPException)
async def _http(request: Request, err: HTTPException) -> JSONResponse:
    message = err.detail if err.status_code != 404 else f"not found: {request.url.path}"
    return _error(err.status_code, str(message), getattr(err, "headers", None))


@_handles(Exception)
async def _internal(request: Request, err: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(err).__name__}: {err}")


# ----------------------------------------------------------------------------- the upload cap


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, whether its length is declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _drain(receive)
            return await self._refuse(scope, receive, send)
        await self.app(scope, _CountedReceive(receive, self.limit), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(413, too_large(self.limit))(scope, receive, send)


def too_large(limit: int) -> str:
    """The 413 message."""
    return f"upload too large: the limit is {limit / MB:g} MB per request"


class _CountedReceive:
    """An ASGI receive that refuses (413) once a streamed body passes `limit` bytes, while the app reads it."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.seen = 0

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise Refusal(413, too_large(self.limit))
        return message


async def _drain(receive: Receive) -> None:
    """Read and drop a refused body (up to DRAIN_LIMIT), so the client reads the refusal, not a reset."""
    seen, more = 0, True
    while more and seen <= DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        more = message.get("more_body", False)
