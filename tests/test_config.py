"""Configuration: TrainConfig refuses bad values when built, and `resolve` merges every source in one order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from captioner import runtime
from captioner.cli import app
from captioner.config import SCST_DEFAULTS, ModelConfig, TrainConfig, resolve
from captioner.errors import ConfigError

from .conftest import TINY_MODEL


@pytest.mark.parametrize(("options", "message"), [
    (dict(schedule="linear"), "schedule must be one of cosine, inverse_sqrt"),
    (dict(encoder="rnn"), "encoder must be one of vit, cnn"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(device="tpu"), "device must be one of"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(batch_size="32"), "batch_size must be an integer >= 1"),
    (dict(lr=-0.1), "lr must be a number in [0, 1]"),
    (dict(time_limit=0), "time_limit must be a positive number"),
    (dict(extra={"encoder": "cnn"}), "choose the encoder with --encoder"),
    (dict(extra={"vocab_size": 10}), "vocab_size is set from the vocabulary"),
    (dict(extra={"d_modle": 64}), "unknown model options: d_modle"),
    (dict(extra={"d_model": "wide"}), "model options"),
    (dict(extra={"d_model": 30, "n_heads": 4}), "divisible by n_heads"),
])
def test_train_config_refuses_bad_values_when_built(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(**options)
    assert message in str(err.value)


def test_model_config_is_built_in_one_place() -> None:
    cfg = TrainConfig(encoder="cnn", extra={"d_model": 64, "n_heads": 2})
    model = cfg.model_config(vocab_size=99, pad_id=0)
    assert (model.encoder, model.d_model, model.n_heads, model.vocab_size) == ("cnn", 64, 2, 99)
    assert model.cnn_arch == "resnet_small"  # the tiny preset's, under the overrides


def test_resolve_order_is_defaults_config_file_command_line(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('lr = 0.001\nbatch_size = 8\nencoder = "cnn"\n[model]\nd_model = 64\nn_heads = 2\n')
    resolved = resolve(cli={"batch_size": 4, "seed": None}, model_cli={"n_heads": 4}, config_file=file)
    assert (resolved.train.lr, resolved.train.batch_size, resolved.train.seed) == (0.001, 4, 0)
    assert (resolved.model.encoder, resolved.model.d_model, resolved.model.n_heads) == ("cnn", 64, 4)


def test_resolve_resume_keeps_the_model_and_extends_the_run() -> None:
    saved_train = TrainConfig(max_steps=10, extra=dict(TINY_MODEL)).to_dict()
    saved = {"train": saved_train, "model": ModelConfig(**TINY_MODEL).to_dict()}
    resolved = resolve(cli={"max_steps": 20}, model_cli={}, saved=saved)
    assert resolved.train.max_steps == 20 and resolved.model.d_model == TINY_MODEL["d_model"]
    with pytest.raises(ConfigError, match="a resumed run keeps its model"):
        resolve(cli={}, model_cli={"d_model": 64}, saved=saved)


def test_resolve_scst_starts_from_its_own_defaults_and_refuses_what_it_ignores() -> None:
    saved = {"train": TrainConfig(lr=3e-3, max_steps=500).to_dict(), "model": ModelConfig().to_dict()}
    resolved = resolve(cli={"max_steps": 3}, model_cli={}, saved=saved, scst={"samples": 4})
    assert resolved.train.lr == SCST_DEFAULTS["lr"] and resolved.train.max_steps == 3
    assert resolved.scst is not None and resolved.scst.samples == 4
    with pytest.raises(ConfigError, match="--warmup-steps: not used by --scst"):
        resolve(cli={"warmup_steps": 3}, model_cli={}, saved=saved, scst={})


@pytest.mark.parametrize(("text", "message"), [
    ('{"schedule": "linear"}', "schedule must be one of"),
    ('{"lr": 0.1, "model": {"encoder": "cnn"}}', "choose the encoder with --encoder"),
    ('{"epocs": 3}', "unknown training options: epocs"),
    ("[1, 2]", "expected a table of options"),
    ("{", "not valid JSON"),
])
def test_config_file_mistakes_are_one_line_before_any_work(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "cfg.json"
    file.write_text(text)
    result = CliRunner().invoke(app, ["train", "--config", str(file), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output and "internal error" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [["--set", "encoder=cnn"], ["--set", "vocab_size=12"], ["--set", "pad_id=3"]])
def test_set_of_fields_that_are_not_options_is_a_clear_error(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "error:" in result.output and "internal error" not in result.output


@pytest.mark.parametrize(("word", "native", "dtype"), [("auto", True, torch.bfloat16), ("auto", False, torch.float32),
                                                        ("bf16", False, torch.bfloat16), ("fp32", True, torch.float32)])
def test_one_precision_plan_for_training_and_inference(monkeypatch: pytest.MonkeyPatch, word: str, native: bool,
                                                       dtype: torch.dtype) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    plan = runtime.precision_plan(word, torch.device("cpu"))
    assert plan.train_autocast == plan.encoder == dtype  # what training autocasts is what inference stores
    assert plan.decoder == torch.float32  # word choice at full precision
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        runtime.precision_plan("fp16", torch.device("cpu"))


def test_precision_help_is_one_text_in_every_command() -> None:
    runner = CliRunner()
    for command in ("train", "caption", "attend", "evaluate"):
        out = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output.split())
        assert "training autocasts the model" in " ".join(out.replace("│", " ").split()), command


def test_saved_options_round_trip() -> None:
    cfg = TrainConfig(encoder="cnn", max_steps=7, extra={"d_model": 64, "n_heads": 2})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
