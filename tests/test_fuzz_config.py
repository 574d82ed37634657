"""Fuzzing what a config file or a run directory can hold: every outcome is a success or a CaptionerError.

A config file (`--config`), a resumed run's config.json and a run directory from elsewhere are input we do
not control. Whatever they hold, the CLI must print one line and exit, so any exception type other than a
CaptionerError (a TypeError from comparing a string with a number, an OverflowError from `int(inf)`, a
RecursionError) is a bug. Sizes stay small so no example builds a big model: the bounds themselves are
checked in tests/test_config.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from captioner import checkpoint
from captioner.config import (
    CNN_ARCHS,
    DEVICES,
    ENCODERS,
    SCORES,
    VIT_STEM_STRIDES,
    ModelConfig,
    TrainConfig,
    resolve,
)
from captioner.data.images import Preprocess
from captioner.data.vocab import Vocabulary
from captioner.errors import CaptionerError
from captioner.models.captioner import CaptionModel

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A model that builds in milliseconds: the fuzz's valid starting point.
TINY: dict[str, Any] = dict(encoder="vit", image_size=32, d_model=8, n_heads=2, n_layers=1, d_ff=16, enc_layers=1,
                            patch_size=16, vocab_size=11, dropout=0.0)

TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]

# Integers small enough to build a model in milliseconds, or far past every bound: never in between, where a
# valid size would build a model of gigabytes (load_run builds what it accepts).
ints = st.one_of(st.integers(-3, 48), st.integers(min_value=10**6), st.integers(max_value=-4))
# Any JSON value: what json.loads or tomllib can put in a field (NaN and inf too: Python's json reads them).
scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["vit", "cnn", "cosine", "inverse_sqrt", "cpu", "cuda:0", "cuda:", "fp32", "auto", "tiny",
                     "linear", "conv", "resnet", "learned", "additive", *CNN_ARCHS]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=6)

model_values = st.one_of(ints, st.sampled_from([12, 16, 24, 32, 48]), json_values,
                         st.sampled_from([*ENCODERS, *SCORES, *VIT_STEM_STRIDES]))
train_values = st.one_of(json_values, st.sampled_from(DEVICES), st.integers(0, 10**10))  # no model is built


def _dicts(keys: list[str], values: st.SearchStrategy) -> st.SearchStrategy[dict[str, Any]]:
    """Known keys (any subset: missing keys too) with fuzzed values, sometimes an unknown key."""
    key = st.one_of(st.sampled_from(keys), st.sampled_from(keys), st.text(max_size=8))
    return st.dictionaries(key, values, max_size=6)


model_dicts = st.one_of(
    _dicts(MODEL_FIELDS, model_values),
    # Mostly valid: the tiny model with a few fields changed, so the checks after the first one run too.
    _dicts(MODEL_FIELDS, model_values).map(lambda d: {**TINY, **d}),
)
train_dicts = _dicts(TRAIN_FIELDS + ["images"], train_values).flatmap(
    lambda d: st.one_of(st.just(d), model_dicts.map(lambda m: {**d, "extra": m})))


def _outcome(call, *args: Any, **kwargs: Any) -> Any:
    """The result of `call`, or None when it raised a CaptionerError; any other exception fails the test."""
    try:
        return call(*args, **kwargs)
    except CaptionerError as err:
        assert "\n" not in str(err), f"a multi-line message: {err}"
        return None


@FUZZ
@given(data=train_dicts)
def test_train_options_are_built_or_refused_with_one_line(data: dict[str, Any]) -> None:
    cfg = _outcome(TrainConfig.from_dict, data)
    if cfg is not None:  # whatever was accepted stays valid, round-trips through JSON, and builds its model config
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert isinstance(cfg.model_config(vocab_size=50, pad_id=0), ModelConfig)


@FUZZ
@given(data=model_dicts)
def test_model_config_from_a_run_is_built_or_refused_with_one_line(data: dict[str, Any]) -> None:
    model = _outcome(ModelConfig.from_dict, data)
    if model is not None:
        assert all(isinstance(getattr(model, f), int) and not isinstance(getattr(model, f), bool)
                   for f in ("image_size", "d_model", "n_heads", "n_layers", "d_ff", "vocab_size", "patch_size"))
        assert math.isfinite(model.dropout) and ModelConfig.from_dict(model.to_dict()) == model


@FUZZ
@given(file_text=st.one_of(json_values.map(lambda v: json.dumps(v)), train_dicts.map(json.dumps),
                           st.text(max_size=40)),
       cli=st.one_of(st.just({}), _dicts(["max_steps", "batch_size", "lr", "seed", "device", "grad_clip"],
                                          train_values)),
       model_cli=st.one_of(st.just({}), _dicts(["d_model", "n_heads", "image_size", "patch_size"], model_values)),
       saved=st.one_of(st.none(), st.fixed_dictionaries({}, optional={"train": st.one_of(train_dicts, json_values),
                                                                      "model": st.one_of(model_dicts, json_values)})),
       scst=st.one_of(st.none(), _dicts(["samples", "baseline", "temperature"], train_values)))
@example(file_text="{}", cli={}, model_cli={}, saved={"model": TINY}, scst={"samples": "5"})  # "5" < 2: TypeError
@example(file_text="{}", cli={}, model_cli={}, saved={"model": TINY}, scst={"beam": 3})  # not an SCSTConfig field
def test_resolve_merges_or_refuses_with_one_line(file_text: str, cli: dict, model_cli: dict, saved: dict | None,
                                                 scst: dict | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "options.json"
        file.write_text(file_text)
        _outcome(resolve, cli=cli, model_cli=model_cli, config_file=file, saved=saved, scst=scst)


# ----------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The parts of one small, loadable run directory: config.json's dict and the weights file's bytes."""
    vocab = Vocabulary.build(["a red circle above a blue square", "two green triangles"])
    model_config = ModelConfig(**{**TINY, "vocab_size": len(vocab)})
    path = tmp_path_factory.mktemp("valid") / checkpoint.BEST
    checkpoint.save_weights(path, CaptionModel(model_config), meta={"step": 3})
    config = {"format_version": checkpoint.FORMAT_VERSION, "captioner_version": "0", "model": model_config.to_dict(),
              "vocab": vocab.to_dict(), "preprocess": Preprocess(image_size=32).to_dict(),
              "train": TrainConfig(extra={k: v for k, v in TINY.items() if k not in ("encoder", "vocab_size")}
                                   ).to_dict(), "data": {}}
    return {"config": config, "weights": path.read_bytes()}


def _safetensors_with(header: dict[str, str]) -> bytes:
    """A real safetensors file holding one tensor and the given metadata (fuzzed)."""
    from safetensors.torch import save

    return save({"model.x": torch.zeros(2)}, metadata=header)


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle ran",))


def _write_run(run: Path, config: bytes, weights: bytes | None, which: str) -> None:
    (run / checkpoint.CONFIG).write_bytes(config)
    if weights is not None:
        (run / (checkpoint.BEST if which == "best" else checkpoint.LAST)).write_bytes(weights)


def _load(run: Path, which: str) -> checkpoint.LoadedRun | None:
    """read_run_config and load_run on `run`: the loaded run, or None when refused with one line."""
    _outcome(checkpoint.read_run_config, run)
    loaded = _outcome(checkpoint.load_run, run, which=which)
    if loaded is not None:
        assert not loaded.model.training and loaded.model.config.vocab_size == len(loaded.vocab)
    return loaded


def _mutated(config: dict[str, Any], changes: list[tuple[str | None, str, Any]]) -> dict[str, Any]:
    config = json.loads(json.dumps(config))
    for section, key, value in changes:
        target = config if section is None else config.get(section)
        if not isinstance(target, dict):
            continue
        if value == "<delete>":
            target.pop(key, None)
        else:
            target[key] = value
    return config


SECTION_KEYS = {"model": MODEL_FIELDS, "vocab": ["tokens"], "preprocess": ["image_size", "mean", "std"],
                "train": TRAIN_FIELDS, None: ["format_version", "model", "vocab", "preprocess", "train"]}
change = st.sampled_from(list(SECTION_KEYS)).flatmap(lambda section: st.tuples(
    st.just(section), st.one_of(st.sampled_from(SECTION_KEYS[section]), st.text(max_size=6)),
    st.one_of(st.just("<delete>"), model_values, json_values)))
RUN_FUZZ = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@RUN_FUZZ
@given(changes=st.lists(change, min_size=1, max_size=3), which=st.sampled_from(["best", "last"]))
# Found by this fuzz outside config.py, in images.py's Preprocess.from_dict (its fix is not in this file):
@example(changes=[("preprocess", "image_size", math.inf)], which="best")  # int(inf): OverflowError
@example(changes=[("preprocess", "mean", [10**400, 0, 0])], which="best")  # float(10**400): OverflowError
def test_fuzzed_config_json_loads_or_is_refused_with_one_line(valid_run: dict[str, Any], changes: list,
                                                             which: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = _mutated(valid_run["config"], changes)
        _write_run(Path(tmp), json.dumps(config).encode(), valid_run["weights"], which)
        loaded = _load(Path(tmp), which)
        if loaded is not None:  # what loaded is what config.json says (a change it accepted, or none at all)
            saved = ModelConfig.from_dict(config["model"])
            saved.pretrained, saved.backbone_weights = False, None  # the run's own weights replace a backbone's
            assert loaded.model.config == saved


@RUN_FUZZ
@given(config=st.one_of(json_values.map(json.dumps).map(str.encode), st.binary(max_size=40)))
# Found by this fuzz in checkpoint.py's read_run_config (its fix is not in this file):
@example(config=b"[" * 100_000 + b"]" * 100_000)  # deeper than json's recursion: RecursionError
@example(config=b'{"format_version": 1, "model": {}, "vocab": {}, "preprocess": []}')
def test_any_config_json_bytes_are_refused_with_one_line(valid_run: dict[str, Any], config: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _write_run(Path(tmp), config, valid_run["weights"], "best")
        assert _load(Path(tmp), "best") is None


header_values = st.one_of(st.sampled_from(["1", "{}", "[]", "null", "{", '{"scalars": {}}', '{"param_groups": []}']),
                          json_values.map(json.dumps), st.text(max_size=8))
headers = st.fixed_dictionaries({"format_version": st.sampled_from(["1", "1", "2", ""])}, optional={
    k: header_values for k in ("meta", "optimizer", "train_state")})


@RUN_FUZZ
@given(kind=st.sampled_from(["truncated", "garbage", "pickle", "header", "missing"]), garbage=st.binary(max_size=64),
       header=headers, which=st.sampled_from(["best", "last"]))
# Found by this fuzz in checkpoint.py's load_weights (its fix is not in this file):
@example(kind="header", garbage=b"", header={"format_version": "1", "meta": "{"}, which="best")  # JSONDecodeError
@example(kind="header", garbage=b"", header={"format_version": "1", "optimizer": "{}"}, which="last")  # KeyError
@example(kind="header", garbage=b"", header={"format_version": "1", "optimizer": "[]"}, which="last")  # TypeError
@example(kind="header", garbage=b"", header={"format_version": "1", "train_state": "{"}, which="last")
def test_fuzzed_weights_are_refused_with_one_line(valid_run: dict[str, Any], kind: str, garbage: bytes,
                                                  header: dict[str, str], which: str) -> None:
    body = {"truncated": valid_run["weights"][: 8 * len(garbage)], "garbage": garbage,
            "pickle": pickle.dumps(_Payload()), "header": _safetensors_with(header), "missing": None}[kind]
    with tempfile.TemporaryDirectory() as tmp:
        _write_run(Path(tmp), json.dumps(valid_run["config"]).encode(), body, which)
        assert _load(Path(tmp), which) is None
        if body is not None:  # the weights file alone, as a resume reads it
            _outcome(checkpoint.load_weights, Path(tmp) / (checkpoint.BEST if which == "best" else checkpoint.LAST))


def test_the_valid_run_loads(valid_run: dict[str, Any], tmp_path: Path) -> None:
    """The fuzz's starting point is loadable, so refusals above come from the fuzzed part."""
    _write_run(tmp_path, json.dumps(valid_run["config"]).encode(), valid_run["weights"], "best")
    assert _load(tmp_path, "best") is not None
