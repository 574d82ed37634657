"""Training options are declared once, with their TrainConfig (or SCSTConfig) field: `captioner train` refuses
what the config refuses, at the same bound, and a value it accepts arrives in the resolved config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from captioner import checkpoint, cli
from captioner.config import (
    TRAIN_CHOICES,
    TRAIN_INTS,
    TRAIN_NUMBERS,
    TRAIN_OPTIONS,
    TRAIN_TYPES,
    ModelConfig,
    SCSTConfig,
    TrainConfig,
    declared,
)
from captioner.errors import ConfigError

runner = CliRunner()
ON_THE_CLI = [name for name, declared in TRAIN_OPTIONS.items() if declared.cli]
BOUNDS = {**TRAIN_INTS, **TRAIN_NUMBERS}


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What `captioner train` would train, captured after resolving: nothing runs."""
    runs: list[Any] = []
    monkeypatch.setattr(cli, "_run_training", lambda resolved, **_: runs.append(resolved))
    monkeypatch.setattr(cli, "_print_result", lambda result: None)
    return runs


def _flag(name: str) -> str:
    return TRAIN_OPTIONS[name].flag or "--" + name.replace("_", "-")


def _args(name: str, value: Any) -> list[str]:
    if TRAIN_TYPES[name] == "bool":
        return [_flag(name) if value else "--no-" + name.replace("_", "-")]
    return [_flag(name), str(value)]


def _accepted(name: str) -> list[Any]:
    """Values the option takes: every choice, both switches, both bounds, or a name for a string."""
    if name in TRAIN_CHOICES:
        return list(TRAIN_CHOICES[name])
    if TRAIN_TYPES[name] == "bool":
        return [True, False]
    if name in BOUNDS:
        return [bound for bound in BOUNDS[name] if bound is not None]
    return ["some/where.json"]


def _just_outside(name: str) -> list[Any]:
    """The nearest values below the lower bound and above the upper one."""
    low, high = BOUNDS[name]
    if name in TRAIN_INTS:
        return [low - 1] + ([high + 1] if high is not None else [])
    return [math.nextafter(low, -math.inf), math.nextafter(high, math.inf)]


def test_every_field_is_declared_once_with_option() -> None:
    declared = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}  # extra: the model's, not an option
    assert set(TRAIN_OPTIONS) == declared
    assert set(declared) - set(ON_THE_CLI) == {"synth_train", "synth_val", "synth_test", "synth_max_objects",
                                               "max_len"}  # set by a config file only


@pytest.mark.parametrize("name", ON_THE_CLI)
def test_the_flag_and_its_help_come_from_the_declaration(name: str) -> None:
    command = typer.main.get_command(cli.app).commands["train"]  # type: ignore[attr-defined]
    param = next(p for p in command.params if p.name == name)
    assert _flag(name) in param.opts and param.help == TRAIN_OPTIONS[name].help
    assert param.default is None  # not given: resolve() leaves the field to the config file or the default


@pytest.mark.parametrize("name", ON_THE_CLI)
def test_every_option_reaches_its_config_field(name: str, trained: list[Any]) -> None:
    for value in _accepted(name):
        result = runner.invoke(cli.app, ["train", *_args(name, value)])
        assert result.exit_code == 0, result.output
        assert getattr(trained[-1].train, name) == value
    assert len(trained) == len(_accepted(name))


@pytest.mark.parametrize("name", [name for name in ON_THE_CLI if name in BOUNDS])
def test_the_flag_and_the_config_refuse_at_the_same_bound(name: str, trained: list[Any]) -> None:
    for value in _just_outside(name):
        with pytest.raises(ConfigError, match=f"{name} must be"):
            TrainConfig(**{name: value})
        result = runner.invoke(cli.app, ["train", _flag(name), repr(value)])
        assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert trained == []


@pytest.mark.parametrize("name", list(TRAIN_CHOICES))
def test_a_value_outside_the_choices_is_refused_by_both(name: str, trained: list[Any]) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be one of"):
        TrainConfig(**{name: "nonsense"})
    result = runner.invoke(cli.app, ["train", _flag(name), "nonsense"])
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
