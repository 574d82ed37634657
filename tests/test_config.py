"""Configuration: TrainConfig refuses bad values when built, and `resolve` merges every source in one order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from captioner import runtime
from captioner.cli import app
from captioner.config import (
    MAX_PARAMETERS,
    PHOTO_DEFAULTS,
    PHOTO_MODEL_DEFAULTS,
    SCST_DEFAULTS,
    ModelConfig,
    TrainConfig,
    parameter_estimate,
    preset,
    read_options_file,
    resolve,
)
from captioner.errors import ConfigError
from captioner.models.captioner import CaptionModel

from .conftest import TINY_MODEL


@pytest.mark.parametrize(("options", "message"), [
    (dict(schedule="linear"), "schedule must be one of cosine, inverse_sqrt"),
    (dict(encoder="rnn"), "encoder must be one of vit, cnn"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(device="tpu"), "device must be one of"),
    (dict(schedule=3), "schedule must be one of cosine, inverse_sqrt, got 3"),
    (dict(batch_size=0), "batch_size must be an integer in [1, 4096], got 0"),
    (dict(batch_size=-8), "batch_size must be an integer in [1, 4096], got -8"),
    (dict(batch_size="32"), "batch_size must be an integer in [1, 4096], got '32'"),
    (dict(batch_size=True), "batch_size must be an integer in [1, 4096], got True"),  # JSON true is not 1
    (dict(batch_size=8.0), "batch_size must be an integer in [1, 4096], got 8.0"),
    (dict(batch_size=10**6), "batch_size must be an integer in [1, 4096]"),
    (dict(accumulate=0), "accumulate must be an integer in [1, 1024], got 0"),
    (dict(max_steps="10"), "max_steps must be an integer in [1, 1e+09], got '10'"),
    (dict(seed=-1), "seed must be an integer in [0, 4.29497e+09], got -1"),
    (dict(synth_max_objects=4), "synth_max_objects must be an integer in [1, 3], got 4"),
    (dict(lr=-0.1), "lr must be a number in [0, 1], got -0.1"),
    (dict(lr=float("nan")), "lr must be a number in [0, 1], got nan"),
    (dict(lr="0.1"), "lr must be a number in [0, 1], got '0.1'"),
    (dict(label_smoothing=1.0), "label_smoothing must be a number in [0, 0.99], got 1.0"),
    (dict(label_smoothing=-0.1), "label_smoothing must be a number in [0, 0.99], got -0.1"),
    (dict(grad_clip=-1.0), "grad_clip must be a number in [0, 1e+09], got -1.0"),
    (dict(grad_clip=float("inf")), "grad_clip must be a number in [0, 1e+09], got inf"),
    (dict(weight_decay=False), "weight_decay must be a number in [0, 10], got False"),
    (dict(time_limit=0), "time_limit must be a number in [0.1, 1e+07], got 0"),  # the bounds of --time-limit
    (dict(time_limit=float("nan")), "time_limit must be a number in [0.1, 1e+07], got nan"),
    (dict(time_limit=float("inf")), "time_limit must be a number in [0.1, 1e+07], got inf"),
    (dict(compile="false"), "compile must be true or false, got 'false'"),  # a truthy string, never guessed
    (dict(data=7), "data must be a string or null, got 7"),
    (dict(device="cuda:x"), "device must be one of"),
    (dict(device=["cpu"]), "device must be one of auto, cpu, cuda, mps (or cuda:N), got ['cpu']"),
    (dict(extra={"encoder": "cnn"}), "choose the encoder with --encoder"),
    (dict(extra={"vocab_size": 10}), "vocab_size is set from the vocabulary"),
    (dict(extra={"d_modle": 64}), "unknown model options: d_modle"),
    (dict(extra={"d_model": "wide"}), "d_model must be an integer in [1, 8192], got 'wide'"),
    (dict(extra={"d_model": 30, "n_heads": 4}), "divisible by n_heads"),
    (dict(extra=[("d_model", 64)]), "model options must be a table"),
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


@pytest.mark.parametrize(("changes", "message"), [
    (dict(d_model="128"), "d_model must be an integer in [1, 8192], got '128'"),
    (dict(d_model=128.0), "d_model must be an integer in [1, 8192], got 128.0"),
    (dict(n_layers=True), "n_layers must be an integer in [1, 64], got True"),
    (dict(n_layers=None), "n_layers must be an integer in [1, 64], got None"),
    (dict(d_model=16384, n_heads=4), "d_model must be an integer in [1, 8192], got 16384"),
    (dict(n_heads=512, d_model=1024), "n_heads must be an integer in [1, 256], got 512"),
    (dict(d_ff=10**9), "d_ff must be an integer in [1, 65536]"),
    (dict(n_layers=65), "n_layers must be an integer in [1, 64], got 65"),
    (dict(enc_layers=-1), "enc_layers must be an integer in [0, 64], got -1"),
    (dict(vocab_size=10**7), "vocab_size must be an integer in [1, 1e+06]"),
    (dict(pad_id=64), "pad_id must be an integer in [0, 63], got 64"),  # vocab_size 64: ids 0..63
    (dict(image_size=2048, patch_size=16), "image_size must be an integer in [1, 1024], got 2048"),
    (dict(image_size=100, patch_size=12), "image_size (100) must be divisible by patch_size (12)"),
    (dict(image_size=1024, patch_size=4, vit_stem="conv"), "at most 128 patches a side, got 1024 / 4 = 256"),
    (dict(d_model=8192, n_heads=8, n_layers=32, d_ff=32768), "about 3.96e+10 parameters, more than the 2e+09"),
    (dict(d_model=8192, n_heads=8, vocab_size=1_000_000), "parameters, more than the 2e+09 allowed"),
    (dict(dropout=float("nan")), "dropout must be a number in [0, 1), got nan"),
    (dict(attn_dropout=1.0), "attn_dropout must be a number in [0, 1), got 1.0"),
    (dict(norm_first="false"), "norm_first must be true or false, got 'false'"),
    (dict(cls_token=0), "cls_token must be true or false, got 0"),
    (dict(encoder=["vit"]), "encoder must be one of vit, cnn, got ['vit']"),
    (dict(backbone_weights=3), "backbone_weights must be a string or null, got 3"),
    (dict(cnn_stride=16.0), "cnn_stride must be 16 or 32, got 16.0"),
    (dict(vit_stem="conv", patch_size=12, d_model=2, n_heads=1), "the conv stem needs d_model >= 4, got 2"),
])
def test_model_config_refuses_bad_types_and_sizes_on_load(changes: dict, message: str) -> None:
    """What a run's config.json holds goes through ModelConfig.from_dict: one line naming field, value and range."""
    data = {**ModelConfig(**TINY_MODEL).to_dict(), **changes}
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_model_config_bounds_admit_every_preset_and_the_largest_sensible_model() -> None:
    for name in ("tiny", "small", "base"):
        for encoder in ("vit", "cnn"):
            preset(name, encoder=encoder, vocab_size=50_000)
    # ViT-L-sized encoder and decoder, a 100k vocabulary, 1024 px images: still allowed.
    big = ModelConfig(d_model=1024, n_heads=16, n_layers=24, enc_layers=24, d_ff=4096, vocab_size=100_000,
                      image_size=1024, patch_size=16)
    assert 5e8 < parameter_estimate(big) <= MAX_PARAMETERS


def test_parameter_estimate_bounds_the_real_count_from_above() -> None:
    for overrides in (dict(TINY_MODEL), dict(TINY_MODEL, vit_pos="learned", cross_score="general"),
                      dict(TINY_MODEL, encoder="cnn"), dict(d_model=64, n_heads=2, vit_stem="resnet", patch_size=16)):
        cfg = ModelConfig(**{**overrides, "vocab_size": 500})
        real = sum(p.numel() for p in CaptionModel(cfg).parameters())
        if cfg.encoder == "cnn":
            real -= sum(p.numel() for p in CaptionModel(cfg).encoder.backbone.parameters())  # fixed size, not counted
        assert real <= parameter_estimate(cfg) <= 20 * real, overrides


@pytest.mark.parametrize("saved", [
    {"train": [1, 2], "model": ModelConfig().to_dict()},
    {"train": {}, "model": "vit"},
    {"train": {}},
    {"train": {"seed": "0"}, "model": ModelConfig().to_dict()},
    {"train": {"grad_clip": float("nan")}, "model": ModelConfig().to_dict()},  # SCST keeps these two
    {"train": {}, "model": {**ModelConfig().to_dict(), "d_model": 1e9}},
])
def test_resumed_config_json_is_validated_on_load(saved: dict) -> None:
    for scst in (None, {}):
        with pytest.raises(ConfigError):
            resolve(cli={}, model_cli={}, saved=saved, scst=scst)


def test_resolve_order_is_defaults_config_file_command_line(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('lr = 0.001\nbatch_size = 8\nencoder = "cnn"\n[model]\nd_model = 64\nn_heads = 2\n')
    resolved = resolve(cli={"batch_size": 4, "seed": None}, model_cli={"n_heads": 4}, config_file=file)
    assert (resolved.train.lr, resolved.train.batch_size, resolved.train.seed) == (0.001, 4, 0)
    assert (resolved.model.encoder, resolved.model.d_model, resolved.model.n_heads) == ("cnn", 64, 4)


def test_a_dataset_gets_the_photo_defaults_under_what_the_user_sets() -> None:
    world = resolve(cli={}, model_cli={})
    assert world.train.concept_loss == 0 and world.model.dropout == 0 and not world.model.concept_head
    photos = resolve(cli={"data": "captions.csv"}, model_cli={})
    for name, value in PHOTO_DEFAULTS.items():
        assert getattr(photos.train, name) == value
    assert photos.model.dropout == PHOTO_MODEL_DEFAULTS["dropout"] and photos.model.concept_head
    chosen = resolve(cli={"data": "captions.csv", "concept_loss": 0.0, "label_smoothing": 0.0},
                     model_cli={"dropout": 0.3})
    assert (chosen.train.concept_loss, chosen.train.label_smoothing, chosen.model.dropout) == (0, 0, 0.3)
    assert not chosen.model.concept_head


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


def test_scst_with_a_time_limit_trains_for_the_time_given() -> None:
    saved = {"train": TrainConfig(data="d.csv").to_dict(), "model": ModelConfig().to_dict()}
    limited = resolve(cli={"time_limit": 12}, model_cli={}, saved=saved, scst={}).train
    assert limited.default_length() and limited.time_limit == 12  # the data's default length, cut by the clock
    assert resolve(cli={}, model_cli={}, saved=saved, scst={}).train.epochs == SCST_DEFAULTS["epochs"]
    both = resolve(cli={"time_limit": 12, "epochs": 1}, model_cli={}, saved=saved, scst={}).train
    assert both.epochs == 1  # an explicit length is obeyed, the limit only cuts


@pytest.mark.parametrize(("text", "message"), [
    ('{"schedule": "linear"}', "schedule must be one of"),
    ('{"lr": 0.1, "model": {"encoder": "cnn"}}', "choose the encoder with --encoder"),
    ('{"epocs": 3}', "unknown training options: epocs"),
    ("[1, 2]", "expected a table of options"),
    ("{", "not valid JSON"),
    ('{"batch_size": 0}', "batch_size must be an integer in [1, 4096], got 0"),
    ('{"lr": NaN}', "lr must be a number in [0, 1], got nan"),  # Python's json reads NaN
    ('{"label_smoothing": 1.5}', "label_smoothing must be a number in [0, 0.99], got 1.5"),
    ('{"grad_clip": -1}', "grad_clip must be a number in [0, 1e+09], got -1"),
    ('{"model": "big"}', "model must be a table of option = value, got 'big'"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nesting deeper than the parser's recursion
])
def test_config_file_mistakes_are_one_line_before_any_work(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "cfg.json"
    file.write_text(text)
    result = CliRunner().invoke(app, ["train", "--config", str(file), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output and "internal error" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "message"), [
    ('{"model": {"d_model": 1e9}}', "d_model must be an integer in [1, 8192], got 1000000000.0"),
    ('{"model": {"image_size": 4096}}', "image_size must be an integer in [1, 1024], got 4096"),
    ('{"model": {"d_model": 4096, "n_layers": 64, "d_ff": 16384}}', "parameters, more than the 2e+09 allowed"),
])
def test_config_file_model_sizes_are_refused_when_resolved(tmp_path: Path, text: str, message: str) -> None:
    # Through `resolve`, not `captioner train`: were the check to go, the CLI would start training that model.
    file = tmp_path / "cfg.json"
    file.write_text(text)
    with pytest.raises(ConfigError) as err:
        resolve(cli={}, model_cli={}, config_file=file)
    assert message in str(err.value)


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


def test_unreadable_config_files_are_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "cfg.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not a text file"):
        read_options_file(binary)
    toml = tmp_path / "cfg.toml"
    toml.write_text("lr = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_options_file(toml)


def test_grad_clip_zero_means_no_clipping_and_is_accepted_everywhere(tmp_path: Path) -> None:
    assert TrainConfig(grad_clip=0).grad_clip == 0
    file = tmp_path / "cfg.toml"
    file.write_text("grad_clip = 0\n")
    assert resolve(cli={}, model_cli={}, config_file=file).train.grad_clip == 0


@pytest.mark.parametrize(("vendor", "flags", "faster"), [
    ("GenuineIntel", "fpu sse avx512f avx512_bf16 amx_bf16 amx_tile", True),
    ("GenuineIntel", "fpu sse avx512f avx512_bf16", False),  # no AMX: oneDNN's bf16 ran slower than fp32
    ("AuthenticAMD", "fpu sse avx512f avx512_bf16", True),
    ("AuthenticAMD", "fpu sse avx2", False),
    ("", "", False),
])
def test_auto_picks_bf16_where_it_is_the_faster(vendor: str, flags: str, faster: bool) -> None:
    cpuinfo = f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: amx_bf16\n"
    assert runtime.bf16_is_faster(cpuinfo) is faster
