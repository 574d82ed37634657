"""`captioner serve`'s API through FastAPI's TestClient: every endpoint, every refusal, the token, the limits.

On a tiny untrained run: what is checked is the plumbing (what reaches the model, what is refused and with
which status and line, that batching changes no caption), not the captions' quality.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("python_multipart", reason="the serve extra is not installed: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from captioner.api import Captioner, DecodeSettings  # noqa: E402
from captioner.cli import app as cli_app  # noqa: E402
from captioner.data.images import load_image  # noqa: E402
from captioner.errors import ConfigError, ImageError  # noqa: E402
from captioner.serve import missing_extra  # noqa: E402
from captioner.serve.app import create_app  # noqa: E402
from captioner.serve.batcher import Batcher  # noqa: E402
from captioner.serve.runner import ModelProcess, ModelProcessError, ModelSpec  # noqa: E402
from captioner.serve.settings import ServeSettings  # noqa: E402

from .test_reliability import save_tiny_run  # noqa: E402

TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def captioner(tiny: Path) -> Captioner:
    return Captioner.load(tiny, device="cpu", precision="fp32")


@pytest.fixture(scope="module", params=["in-process", "model-process"])
def client(request: pytest.FixtureRequest, captioner: Captioner, tiny: Path):
    """A client of the app with default settings, captioning here or (as `captioner serve` does) in a child."""
    child = ModelProcess(ModelSpec(tiny, device="cpu", precision="fp32")) if request.param == "model-process" else None
    try:
        with TestClient(create_app(captioner, ServeSettings(), child)) as c:
            yield c
    finally:
        if child is not None:
            child.close()


def serving(captioner: Captioner, **settings) -> TestClient:
    """A client of an app with these settings (use it as a context manager: that runs start-up and shutdown)."""
    return TestClient(create_app(captioner, ServeSettings(**settings)))


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A 1-bit PNG of 12000 x 12000 pixels: some twenty kilobytes that claim 144 megapixels."""
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")
    return buffer.getvalue()


def cli_reason(tmp_path: Path, name: str, data: bytes) -> str:
    """What `captioner caption` says about a file with these bytes (the loader's reason)."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    return caught.value.reason


# ----------------------------------------------------------------------------- endpoints


def test_health_page_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="/static/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")  # no CDN
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "/v1/caption" in client.get("/openapi.json").json()["paths"]


def test_caption_files_match_the_library_on_the_same_files(client: TestClient, captioner: Captioner,
                                                           tmp_path: Path) -> None:
    files = [("image", (f"photo{i}.jpg", jpeg(i), "image/jpeg")) for i in range(3)]
    answer = client.post("/v1/caption", files=files, params={"max_len": 6})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["image"] for r in results] == ["photo0.jpg", "photo1.jpg", "photo2.jpg"]
    for (_, (name, data, _)), result in zip(files, results, strict=True):
        (tmp_path / name).write_bytes(data)
        expected = captioner.caption(tmp_path / name, DecodeSettings(max_len=6))[0]
        assert result["caption"] == expected.text
        assert result["logprob"] == pytest.approx(expected.logprob, abs=1e-3)
        assert result["n_best"][0]["caption"] == expected.text


def test_raw_body_and_n_best(client: TestClient) -> None:
    answer = client.post("/v1/caption", content=jpeg(5), headers={"content-type": "image/jpeg"},
                         params={"beam": 3, "n_best": 3, "max_len": 5})
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    assert result["image"] == "upload"
    assert 1 <= len(result["n_best"]) <= 3 and result["n_best"][0]["caption"] == result["caption"]
    scores = [c["score"] for c in result["n_best"]]
    assert scores == sorted(scores, reverse=True)


def test_attend_returns_a_map_per_word_and_overlays_on_request(client: TestClient, captioner: Captioner) -> None:
    answer = client.post("/v1/attend", files={"image": ("a.jpg", jpeg(1, (64, 32)), "image/jpeg")},
                         params={"max_len": 5, "overlays": True})
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    h, w = result["grid"]
    maps = np.array(result["maps"])
    assert maps.shape == (len(result["words"]), h, w)
    assert np.allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-3)  # heads averaged: each map is a distribution
    assert len(result["overlays"]) == len(result["words"])
    overlay = Image.open(io.BytesIO(base64.b64decode(result["overlays"][0])))
    assert overlay.format == "PNG" and overlay.size == (64, 32)  # the photo itself, never enlarged
    plain = client.post("/v1/attend", content=jpeg(1), headers={"content-type": "image/jpeg"},
                        params={"beam": 2, "n_best": 2, "max_len": 5})
    assert "overlays" not in plain.json()["results"][0] and len(plain.json()["results"][0]["n_best"]) == 2


def test_model_describes_the_run_without_server_paths(client: TestClient, captioner: Captioner, tiny: Path) -> None:
    info = client.get("/v1/model").json()
    assert info["encoder"] == "vit" and info["vocab_size"] == len(captioner.vocab)
    assert info["image_size"] == captioner.preprocess.image_size and info["parameters"] > 0
    assert str(tiny.parent) not in str(info)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name, make", [
    ("notes.txt", lambda: b"just some words, not pixels\n"),
    ("cut.jpg", lambda: jpeg(2, (200, 150))[:600]),
    ("bomb.png", bomb_png),
    ("empty.jpg", lambda: b""),
])
def test_unusable_images_get_400_with_the_clis_reason(client: TestClient, tmp_path: Path, name: str, make) -> None:
    data = make()
    answer = client.post("/v1/caption", files={"image": (name, data, "application/octet-stream")})
    assert answer.status_code == 400
    assert answer.json() == {"error": f"{name}: {cli_reason(tmp_path, name, data)}"}


def test_one_bad_file_refuses_the_request_and_names_it(client: TestClient) -> None:
    files = [("image", ("good.jpg", jpeg(0), "image/jpeg")), ("image", ("../../etc/x.jpg", b"nope", "image/jpeg"))]
    answer = client.post("/v1/caption", files=files)
    assert answer.status_code == 400 and answer.json()["error"].startswith("x.jpg: not an image")  # base name only


@pytest.mark.parametrize("params, expected", [
    ({"beam": 0}, "beam: Input should be greater than or equal to 1"),
    ({"beam": "wide"}, "beam: Input should be a valid integer"),
    ({"max_len": 501}, "max_len: Input should be less than or equal to 500"),
    ({"beam": 2, "n_best": 3}, "--n-best must be between 1 and --beam (2)"),
])
def test_bad_parameters_get_422_with_one_line(client: TestClient, params: dict, expected: str) -> None:
    answer = client.post("/v1/caption", content=jpeg(0), headers={"content-type": "image/jpeg"}, params=params)
    assert answer.status_code == 422
    assert expected in answer.json()["error"] and "\n" not in answer.json()["error"]


def test_attend_refuses_a_layer_the_decoder_lacks(client: TestClient) -> None:
    answer = client.post("/v1/attend", content=jpeg(0), headers={"content-type": "image/jpeg"},
                         params={"layer": 7})
    assert answer.status_code == 422 and answer.json() == {"error": "layer 7 does not exist: the decoder has 1 layers"}


def test_request_shape_refusals(client: TestClient) -> None:
    text = client.post("/v1/caption", content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415 and text.json()["error"].startswith("unsupported content type text/plain")
    no_file = client.post("/v1/caption", data={"note": "no file here"}, files={"other": ("", b"", "")})
    assert no_file.status_code == 400 and no_file.json()["error"].startswith("no image in the request")
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "not found: /v1/nothing"}
    wrong_method = client.get("/v1/caption")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_too_many_files_and_the_upload_cap(captioner: Captioner) -> None:
    with serving(captioner, max_images=2, max_upload_mb=16384 / 2**20) as c:
        files = [("image", (f"{i}.jpg", jpeg(i, (16, 16)), "image/jpeg")) for i in range(3)]
        many = c.post("/v1/caption", files=files)
        assert many.status_code == 400 and "error" in many.json()
        big = jpeg(9, (300, 300))
        assert len(big) > 16384
        declared = c.post("/v1/caption", content=big, headers={"content-type": "image/jpeg"})
        assert declared.status_code == 413
        assert declared.json() == {"error": "upload too large: the limit is 0.015625 MB per request"}
        chunks = iter([big[:10000], big[10000:]])  # no Content-Length: counted as it streams in
        streamed = c.post("/v1/caption", content=chunks, headers={"content-type": "image/jpeg"})
        assert streamed.status_code == 413 and streamed.json()["error"].startswith("upload too large")
        small = c.post("/v1/caption", content=jpeg(1, (16, 16)), headers={"content-type": "image/jpeg"})
        assert small.status_code == 200


def test_a_full_queue_answers_503_with_retry_after(captioner: Captioner) -> None:
    with serving(captioner, queue_limit=2) as c:
        files = [("image", (f"{i}.jpg", jpeg(i), "image/jpeg")) for i in range(3)]
        answer = c.post("/v1/caption", files=files)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "queue is full" in answer.json()["error"]
        assert c.post("/v1/caption", files=files[:2]).status_code == 200  # the queue held nothing back
        assert c.get("/healthz").json()["pending"] == 0


def test_a_request_past_its_timeout_answers_503(captioner: Captioner) -> None:
    with serving(captioner, timeout_s=0.001) as c:
        answer = c.post("/v1/caption", content=jpeg(0), headers={"content-type": "image/jpeg"})
        assert answer.status_code == 503 and answer.json()["error"].startswith("no answer within")


# ----------------------------------------------------------------------------- the token and the host rule


def test_the_token_guards_the_api_not_the_page_or_health(captioner: Captioner) -> None:
    with serving(captioner, token=TOKEN) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            refused = c.get("/v1/model", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in refused.text
        assert c.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200


@pytest.mark.parametrize("host, ok", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                      ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)])
def test_a_reachable_host_needs_a_token_or_no_auth(host: str, ok: bool) -> None:
    if ok:
        ServeSettings(host=host)
    else:
        with pytest.raises(ConfigError, match="--token"):
            ServeSettings(host=host)
    ServeSettings(host=host, token=TOKEN)
    ServeSettings(host=host, no_auth=True)
    with pytest.raises(ConfigError, match="contradict"):
        ServeSettings(host=host, token=TOKEN, no_auth=True)


def test_cors_is_off_unless_an_origin_is_given(captioner: Captioner) -> None:
    preflight = {"Origin": "https://cms.example", "Access-Control-Request-Method": "POST"}
    with serving(captioner) as c:
        assert "access-control-allow-origin" not in c.options("/v1/caption", headers=preflight).headers
    with serving(captioner, cors=("https://cms.example",)) as c:
        answer = c.options("/v1/caption", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "https://cms.example"


# ----------------------------------------------------------------------------- batching


def test_concurrent_requests_share_batches_and_get_their_own_captions(captioner: Captioner) -> None:
    S = captioner.preprocess.image_size
    images = [torch.randn(3, S, S, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    alone = [captioner.caption_tensor(im[None], DecodeSettings(max_len=6))[0] for im in images]

    async def main() -> tuple[list, int]:
        batcher = Batcher(captioner, max_batch=32, wait_s=0.05, queue_limit=64)
        batcher.start()

        async def one(image: torch.Tensor) -> list:
            with batcher.admit(1) as admission:
                await asyncio.sleep(0)  # the request opens its image, as the app does in a thread
                return await batcher.caption(admission, [image], DecodeSettings(max_len=6))

        try:
            answers = await asyncio.gather(*(one(im) for im in images))
        finally:
            await batcher.stop()
        return [a[0] for a in answers], batcher.batches

    captions, batches = asyncio.run(main())
    assert batches == 1  # eight requests, one search
    for got, want in zip(captions, alone, strict=True):
        assert got.text == want.text and got.logprob == pytest.approx(want.logprob, abs=1e-4)


def test_different_searches_in_one_gathering_are_captioned_apart(captioner: Captioner) -> None:
    S = captioner.preprocess.image_size
    image = torch.randn(3, S, S, generator=torch.Generator().manual_seed(0))

    async def main() -> list:
        batcher = Batcher(captioner, max_batch=32, wait_s=0.05, queue_limit=64)
        batcher.start()
        try:
            with batcher.admit(1) as a, batcher.admit(1) as b:
                return await asyncio.gather(batcher.caption(a, [image], DecodeSettings(max_len=4)),
                                            batcher.caption(b, [image], DecodeSettings(beam=3, n_best=2, max_len=4)))
        finally:
            await batcher.stop()

    greedy, beam = asyncio.run(main())
    assert len(greedy[0].words) <= 4 and greedy[0].runners_up == []
    assert beam[0].text == captioner.caption_tensor(image[None], DecodeSettings(beam=3, n_best=2, max_len=4))[0].text


# ----------------------------------------------------------------------------- the command


def test_the_command_refuses_an_exposed_host_before_loading_a_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "--host 0.0.0.0 can be reached from other machines" in result.output
    assert "weights" not in result.output  # refused before the model was looked for


def test_the_command_passes_its_options_and_reads_the_token_from_the_environment(
        tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr("captioner.serve.server.serve", lambda settings, **kw: seen.update(settings=settings, **kw))
    monkeypatch.setenv("CAPTIONER_TOKEN", TOKEN)
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tiny), "--host", "0.0.0.0", "--port", "9001",
                                          "--cors", "https://a.example", "--max-upload-mb", "5", "--device", "cpu",
                                          "--max-batch", "8", "--timeout", "2.5", "--compile"])
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert (settings.host, settings.port, settings.token, settings.cors) == ("0.0.0.0", 9001, TOKEN,
                                                                            ("https://a.example",))
    assert settings.max_upload_bytes == 5 * 2**20 and seen["model"] == tiny and seen["device"] == "cpu"
    assert (settings.max_batch, settings.timeout_s, settings.batch_wait_ms) == (8, 2.5, 5.0)  # 5.0: the default
    assert settings.decoding == DecodeSettings(compile=True)  # every request's search, but for its beam etc.
    refused = CliRunner().invoke(cli_app, ["serve", "--model", str(tiny), "--max-batch", "0"])
    assert refused.exit_code == 2 and "--max-batch" in refused.output  # the bound ServeSettings declares


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert missing_extra() == ("captioner serve needs the serve extra: pip install 'captioner[serve]' "
                               "(missing: fastapi, uvicorn, python_multipart)")
    monkeypatch.setattr("captioner.serve.missing_extra", lambda: "captioner serve needs the serve extra: x")
    result = CliRunner().invoke(cli_app, ["serve"])
    assert result.exit_code == 1 and "needs the serve extra" in result.output


# ----------------------------------------------------------------------------- the model process


def test_a_killed_model_process_answers_503_then_a_new_one_serves(captioner: Captioner, tiny: Path) -> None:
    child = ModelProcess(ModelSpec(tiny, device="cpu", precision="fp32"))
    files = [("image", ("a.jpg", jpeg(1), "image/jpeg"))]
    with TestClient(create_app(captioner, ServeSettings(), child)) as c:
        first = c.post("/v1/caption", files=files).json()["results"][0]["caption"]
        os.kill(child._process.pid, signal.SIGKILL)  # out of memory, or a stray kill
        dead = c.post("/v1/caption", files=files)
        assert dead.status_code == 503 and dead.headers["retry-after"] == "1"  # at once, not after a reload
        assert "model process stopped (exit code -9)" in dead.json()["error"]
        assert c.post("/v1/caption", files=files).json()["results"][0]["caption"] == first  # the new child
    child.close()
    assert not child._process.is_alive() and child._process.exitcode == 0  # the new child, stopped cleanly


def test_the_model_process_ends_with_its_server(tiny: Path) -> None:
    """A server killed outright (SIGKILL, out of memory) leaves no model process behind: its pipe end closes."""
    runner = ModelProcess(ModelSpec(tiny, device="cpu", precision="fp32"))
    runner._conn.close()  # what the kernel does to a killed server's end of the pipe
    runner._process.join(10)
    assert runner._process.exitcode == 0


def test_a_model_process_that_cannot_load_says_why(tmp_path: Path) -> None:
    with pytest.raises(ModelProcessError, match=f"could not load {tmp_path}"):
        ModelProcess(ModelSpec(tmp_path, device="cpu", precision="fp32"))


def test_the_command_captions_in_a_model_process_unless_told_otherwise(
        tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr("captioner.serve.server.uvicorn.Server.run", lambda server: seen.append(server.config.app))
    for flags, in_child in (([], True), (["--in-process"], False)):
        result = CliRunner().invoke(cli_app, ["serve", "--model", str(tiny), "--device", "cpu", *flags])
        assert result.exit_code == 0, result.output
        service = seen[-1].state.service
        assert isinstance(service.runner, ModelProcess) == in_child and service.settings.model_process == in_child
        # the server's own copy: freed when a child captions (shapes kept for /v1/model), else on the device
        assert str(next(service.captioner.model.parameters()).device) == ("meta" if in_child else "cpu")
        assert service.info["parameters"] == sum(p.numel() for p in service.captioner.model.parameters()) > 0
        if in_child:
            assert not service.runner._process.is_alive()  # stopped when the server stopped


def test_a_device_or_precision_the_child_cannot_have_is_one_line_before_it_starts(tiny: Path) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tiny), "--device", "cpu", "--precision", "fp16"])
    assert result.exit_code == 1 and "fp16" in result.output and "Traceback" not in result.output

