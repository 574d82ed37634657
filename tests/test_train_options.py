"""Options are declared once, with their config field (TrainConfig, ModelConfig, SCSTConfig): `captioner train`
refuses what the config refuses, at the same bound, and a value it accepts arrives in the resolved config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from captioner import checkpoint, cli
from captioner.config import TRAIN_INTS, TRAIN_NUMBERS, ModelConfig, SCSTConfig, TrainConfig, declared
from captioner.errors import ConfigError

runner = CliRunner()
FLAGS = [(config, name) for config in (TrainConfig, ModelConfig) for name, spec in declared(config).items() if spec.cli]
RESOLVED = {TrainConfig: "train", ModelConfig: "model"}  # where each config's values arrive in `Resolved`


def _id(case: tuple[type, str]) -> str:
    return f"{case[0].__name__}.{case[1]}"


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What `captioner train` would train, captured after resolving: nothing runs."""
    runs: list[Any] = []
    monkeypatch.setattr(cli, "_run_training", lambda resolved, **_: runs.append(resolved))
    monkeypatch.setattr(cli, "_print_result", lambda result: None)
    return runs


def _field(config: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(config) if f.name == name)


def _switches(config: type, name: str) -> tuple[str, str]:
    """The flag and, for a switch, its off flag (--compile, --no-compile)."""
    on, _, off = (declared(config)[name].flag or "--" + name.replace("_", "-")).partition("/")
    return on, off or "--no-" + on[2:]


def _args(config: type, name: str, value: Any) -> list[str]:
    on, off = _switches(config, name)
    if _field(config, name).type == "bool":
        return [on if value else off]
    return [on, str(value)]


def _accepted(config: type, name: str) -> list[Any]:
    """Values the option takes: every choice, both switches, both bounds of a training option, else the default."""
    spec = declared(config)[name]
    if spec.choices is not None:
        return [choice.value for choice in spec.choices]
    if _field(config, name).type == "bool":
        return [True, False]
    if config is TrainConfig and spec.low is not None:
        return [bound for bound in (spec.low, spec.high) if bound is not None]
    return ["some/where.json" if _field(config, name).default is None else _field(config, name).default]


def _just_outside(config: type, name: str) -> list[Any]:
    """The nearest values below the lower bound and above the upper one."""
    spec = declared(config)[name]
    if str(_field(config, name).type).startswith("int"):
        return [spec.low - 1] + ([spec.high + 1] if spec.high is not None else [])
    return [math.nextafter(spec.low, -math.inf), math.nextafter(spec.high, math.inf)]


def test_every_field_is_declared_or_has_a_reason_not_to_be() -> None:
    assert set(declared(TrainConfig)) == {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    assert {name for config, name in FLAGS if config is TrainConfig} == set(declared(TrainConfig)) - {
        "synth_train", "synth_val", "synth_test", "synth_max_objects", "max_len"}  # a config file sets them
    assert set(TRAIN_INTS) | set(TRAIN_NUMBERS) == {n for n, s in declared(TrainConfig).items() if s.low is not None}


@pytest.mark.parametrize("case", FLAGS, ids=_id)
def test_the_flag_and_its_help_come_from_the_declaration(case: tuple[type, str]) -> None:
    config, name = case
    command = typer.main.get_command(cli.app).commands["train"]  # type: ignore[attr-defined]
    param = next(p for p in command.params if p.name == name)
    assert _switches(config, name)[0] in param.opts and param.help == declared(config)[name].help
    assert param.default is None  # not given: resolve() leaves the field to the config file or the default


@pytest.mark.parametrize("case", FLAGS, ids=_id)
def test_every_option_reaches_its_config_field(case: tuple[type, str], trained: list[Any]) -> None:
    config, name = case
    preset = ["--preset", "small"] if config is ModelConfig else []  # tiny's ViT stem takes only 16-px patches
    for value in _accepted(config, name):
        result = runner.invoke(cli.app, ["train", *preset, *_args(config, name, value)])
        assert result.exit_code == 0, result.output
        assert getattr(getattr(trained[-1], RESOLVED[config]), name) == value
    assert len(trained) == len(_accepted(config, name))


@pytest.mark.parametrize("case", [(c, n) for c, n in FLAGS if declared(c)[n].low is not None], ids=_id)
def test_the_flag_and_the_config_refuse_at_the_same_bound(case: tuple[type, str], trained: list[Any]) -> None:
    config, name = case
    for value in _just_outside(config, name):
        with pytest.raises(ConfigError, match=f"{name} must be"):
            config(**{name: value})
        result = runner.invoke(cli.app, ["train", _switches(config, name)[0], repr(value)])
        assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert trained == []


@pytest.mark.parametrize("case", [(c, n) for c, n in FLAGS if declared(c)[n].choices is not None], ids=_id)
def test_a_value_outside_the_choices_is_refused_by_both(case: tuple[type, str], trained: list[Any]) -> None:
    config, name = case
    with pytest.raises(ConfigError, match=f"{name} must be one of"):
        config(**{name: "nonsense"})
    result = runner.invoke(cli.app, ["train", _switches(config, name)[0], "nonsense"])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert trained == []


def test_the_scst_options_reach_their_config_and_refuse_at_its_bounds(trained: list[Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    saved = {"train": TrainConfig().to_dict(), "model": ModelConfig().to_dict()}
    monkeypatch.setattr(checkpoint, "read_run_config", lambda run: saved)
    scst = ["train", "--scst", "--resume", "a-run"]
    samples = declared(SCSTConfig)["samples"]
    for value, baseline in ((samples.low, "greedy"), (samples.high, "mean")):  # the mean needs 2 samples
        result = runner.invoke(cli.app, [*scst, "--scst-samples", str(value), "--scst-baseline", baseline])
        assert result.exit_code == 0, result.output
        assert (trained[-1].scst.samples, trained[-1].scst.baseline) == (value, baseline)
    for value in (samples.low - 1, samples.high + 1):
        with pytest.raises(ConfigError, match="samples must be"):
            SCSTConfig(samples=value, baseline="greedy")
        result = runner.invoke(cli.app, [*scst, "--scst-samples", str(value), "--scst-baseline", "greedy"])
        assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert runner.invoke(cli.app, [*scst, "--scst-baseline", "nonsense"]).exit_code == 2
    assert len(trained) == 2
