"""Decoding options are declared once, on DecodeSettings (config.py): `caption`, `attend` and `evaluate` take
each one at the declared bounds and hand it on, `serve` bounds its query parameters alike, and a direct search
call is held to the same rules (check_search)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from typer.testing import CliRunner

from captioner import bulk, cli, evaluation
from captioner.config import DecodeSettings, declared
from captioner.decoding import check_search
from captioner.errors import ConfigError

runner = CliRunner()
FIELDS = {f.name: f for f in dataclasses.fields(DecodeSettings)}


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[DecodeSettings]:
    """The settings `captioner caption` / `evaluate` would decode with, captured before any model is loaded."""
    seen: list[DecodeSettings] = []

    def stop(*args: Any, settings: DecodeSettings, **kwargs: Any) -> None:
        seen.append(settings)
        raise ConfigError("stopped before loading a model")

    monkeypatch.setattr(bulk, "caption_many", lambda patterns, settings, **kw: stop(settings=settings))
    monkeypatch.setattr(evaluation, "run_evaluate", stop)
    return seen


def _flag(name: str) -> tuple[str, str]:
    on, _, off = (declared(DecodeSettings)[name].flag or "--" + name.replace("_", "-")).partition("/")
    return on, off or "--no-" + on[2:]


def _inside(name: str) -> list[Any]:
    spec, kind = declared(DecodeSettings)[name], FIELDS[name].type
    if kind == "bool":
        return [True, False]
    if spec.low is None:
        return [7]
    return [bound for bound in (spec.low, spec.high) if bound is not None]


def _outside(name: str) -> list[Any]:
    spec, kind = declared(DecodeSettings)[name], FIELDS[name].type
    if spec.low is None:
        return []
    if kind == "int":
        return [spec.low - 1] + ([spec.high + 1] if spec.high is not None else [])
    return [math.nextafter(spec.low, -math.inf)] + ([math.nextafter(spec.high, math.inf)] if spec.high else [])


def _args(name: str, value: Any) -> list[str]:
    on, off = _flag(name)
    if FIELDS[name].type == "bool":
        return [on if value else off]
    extra = ["--beam", "64"] if name == "n_best" else []  # n_best may not exceed the beam
    return [on, str(value), *extra]


def test_every_field_has_a_flag() -> None:
    assert set(declared(DecodeSettings)) == set(FIELDS)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_caption_takes_every_value_inside_the_bounds(name: str, asked: list[DecodeSettings]) -> None:
    for value in _inside(name):
        result = runner.invoke(cli.app, ["caption", "x.jpg", *_args(name, value)])
        assert "stopped before loading" in result.output, result.output
        assert getattr(asked[-1], name) == value


@pytest.mark.parametrize("name", sorted(n for n in FIELDS if _outside(n)))
def test_caption_and_direct_calls_refuse_the_nearest_values_outside(name: str, asked: list[DecodeSettings]) -> None:
    for value in _outside(name):
        result = runner.invoke(cli.app, ["caption", "x.jpg", *_args(name, value)])
        assert result.exit_code == 2 and not asked, result.output  # the flag's own bound: a usage error
        with pytest.raises(ConfigError, match=name):
            check_search(**{name: value})


def test_flags_not_given_keep_the_defaults(asked: list[DecodeSettings]) -> None:
    runner.invoke(cli.app, ["caption", "x.jpg"])
    runner.invoke(cli.app, ["evaluate", "--beam", "3"])
    assert asked == [DecodeSettings(), DecodeSettings(beam=3)]


@pytest.mark.parametrize(("command", "kept"), [("attend", {"--beam", "--max-len"}),
                                               ("evaluate", {"--beam", "--max-len", "--cuda-graph", "--compile"}),
                                               ("serve", {"--cuda-graph", "--compile"})])
def test_the_other_commands_take_only_their_options(command: str, kept: set[str]) -> None:
    result = runner.invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
    shown = {_flag(name)[0] for name in FIELDS if f" {_flag(name)[0]} " in result.output}
    assert shown == kept


def test_n_best_is_checked_against_the_beam_everywhere(asked: list[DecodeSettings]) -> None:
    result = runner.invoke(cli.app, ["caption", "x.jpg", "--beam", "2", "--n-best", "3"])
    assert result.exit_code == 1 and "--n-best must be between 1 and --beam (2)" in result.output
    with pytest.raises(ConfigError, match="--n-best"):
        check_search(beam=2, n_best=3)


@pytest.mark.parametrize("name", ["beam", "n_best", "max_len"])
def test_serve_takes_its_query_parameters_at_the_declared_bounds(name: str, tmp_path_factory) -> None:
    """The HTTP API refuses the value past each bound (422, naming it) and captions at the bound itself."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from captioner.api import Captioner
    from captioner.serve.app import create_app
    from captioner.serve.settings import ServeSettings

    from .test_reliability import save_tiny_run

    captioner = Captioner.load(save_tiny_run(tmp_path_factory.mktemp("bounds") / "run"), device="cpu",
                               precision="fp32")
    spec = declared(DecodeSettings)[name]
    image = [("image", ("a.png", _png(), "image/png"))]
    beam = {"beam": int(spec.high)} if name == "n_best" else {}  # n_best may not exceed the beam
    with TestClient(create_app(captioner, ServeSettings())) as client:
        for value, status in ((spec.low - 1, 422), (spec.high + 1, 422), (spec.high, 200)):
            answer = client.post("/v1/caption", files=image, params={**beam, name: int(value), "max_len": 2}
                                 if name != "max_len" else {name: int(value)})
            assert answer.status_code == status, (value, answer.text)
            if status == 422:
                assert answer.json()["error"].startswith(f"{name}: Input should be")


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()
