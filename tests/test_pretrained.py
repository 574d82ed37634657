"""--pretrained from the defaults: the switch to an encoder with ImageNet weights, and where the weights come from.

No test touches the network: the fetch (`encoders.urlopen`, or `_download`) is replaced, and TORCH_HOME
points at a temporary folder so the real cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from captioner.checkpoint import LAST, load_weights
from captioner.cli import app
from captioner.config import PRETRAINED_IMAGE_SIZE, ModelConfig, TrainConfig, resolve
from captioner.data.images import Preprocess
from captioner.data.synthetic import write_synthetic
from captioner.errors import ConfigError
from captioner.models import encoders
from captioner.models.encoders import CNNEncoder

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
RESNET18_FILE = "resnet18-f37072fd.pth"


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def resnet18_file(resnet18_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / RESNET18_FILE
    torch.save(resnet18_state, path)
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torchvision's checkpoint folder under a fresh TORCH_HOME (not created: an empty cache)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _fetch_fails(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> list[float | None]:
    """Make every request raise `error`; the list gets the timeout each request was given."""
    timeouts: list[float | None] = []

    def fetch(request: object, *, timeout: float | None = None) -> object:
        assert socket.getdefaulttimeout() is None  # the process's default is never touched
        timeouts.append(timeout)
        raise error

    monkeypatch.setattr(encoders, "urlopen", fetch)
    return timeouts


def _resnet18(**overrides: object) -> CNNEncoder:
    return CNNEncoder(ModelConfig(**{**dict(encoder="cnn", cnn_arch="resnet18", d_model=32, n_heads=2, image_size=64),
                                     **overrides}))


# ----------------------------------------------------------------------------- the switch (config level)


@pytest.mark.parametrize("encoder, field, arch", [("cnn", "cnn_arch", "resnet50"), ("vit", "vit_backbone", "vit_b_16")])
@pytest.mark.parametrize("asked", [dict(pretrained=True), dict(backbone_weights="weights.pth")])
def test_defaults_switch_to_a_pretrained_encoder_at_224(encoder: str, field: str, arch: str, asked: dict) -> None:
    resolved = resolve(cli={"encoder": encoder}, model_cli=asked)
    assert getattr(resolved.model, field) == arch and resolved.model.image_size == PRETRAINED_IMAGE_SIZE == 224
    [note] = resolved.notes
    assert "\n" not in note and f"torchvision {arch} at 224 px" in note and "ImageNet normalisation" in note
    # The run builds its model from the training options: the switch must live there too.
    assert resolved.train.model_config() == resolved.model


@pytest.mark.parametrize("chosen, arch, size", [
    (dict(cnn_arch="resnet18"), "resnet18", 224),
    (dict(image_size=160), "resnet50", 160),
    (dict(cnn_arch="resnet34", image_size=128), "resnet34", 128),
])
def test_explicit_arch_and_image_size_are_kept(chosen: dict, arch: str, size: int) -> None:
    resolved = resolve(cli={"encoder": "cnn"}, model_cli={"pretrained": True, **chosen})
    assert (resolved.model.cnn_arch, resolved.model.image_size) == (arch, size)
    assert len(resolved.notes) == (0 if len(chosen) == 2 else 1)  # nothing switched, nothing said


def test_a_config_file_choice_counts_as_explicit(tmp_path: Path) -> None:
    file = tmp_path / "train.toml"
    file.write_text('encoder = "cnn"\n[model]\ncnn_arch = "resnet34"\npretrained = true\n')
    resolved = resolve(cli={}, model_cli={}, config_file=file)
    assert (resolved.model.cnn_arch, resolved.model.image_size, resolved.model.pretrained) == ("resnet34", 224, True)


@pytest.mark.parametrize("encoder, model_cli", [
    ("cnn", {}), ("vit", {"pretrained": False}),  # not asked
    ("cnn", {"pretrained": True, "cnn_arch": "resnet_small"}),  # the user's own choice: the encoder says more
    ("vit", {"pretrained": True, "vit_backbone": "ours"}),
])
def test_no_switch_unless_asked_and_left_to_the_preset(encoder: str, model_cli: dict) -> None:
    resolved = resolve(cli={"encoder": encoder}, model_cli=model_cli)
    assert resolved.notes == []
    assert (resolved.model.cnn_arch, resolved.model.vit_backbone, resolved.model.image_size) == \
        ("resnet_small", model_cli.get("vit_backbone", "ours"), 96)


def test_a_preset_with_a_torchvision_backbone_is_kept() -> None:
    resolved = resolve(cli={"encoder": "cnn", "preset": "small"}, model_cli={"pretrained": True})
    assert (resolved.model.cnn_arch, resolved.model.image_size, resolved.notes) == ("resnet18", 96, [])


def test_a_resumed_run_never_switches() -> None:
    train = TrainConfig(encoder="cnn", extra={"pretrained": True, "cnn_arch": "resnet_small"})
    model = ModelConfig(encoder="cnn", cnn_arch="resnet_small", pretrained=True)
    resolved = resolve(cli={"max_steps": 10}, model_cli={}, saved={"train": train.to_dict(), "model": model.to_dict()})
    assert resolved.model == model and resolved.model.cnn_arch == "resnet_small" and resolved.notes == []


def test_vit_b_16_refuses_an_image_size_its_patches_do_not_divide() -> None:
    with pytest.raises(ConfigError, match="vit_b_16.*divisible by 16, got 100") as err:
        resolve(cli={}, model_cli={"pretrained": True, "image_size": 100})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["resnet50", "vit_b_16"])
def test_preprocessing_is_the_normalisation_the_weights_were_trained_with(arch: str) -> None:
    weights = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    ours = Preprocess(image_size=PRETRAINED_IMAGE_SIZE)
    assert list(ours.mean) == list(weights.mean) and list(ours.std) == list(weights.std)
    assert list(weights.crop_size) == [PRETRAINED_IMAGE_SIZE]


# ----------------------------------------------------------------------------- where the weights come from


def test_backbone_weights_file_loads_exactly_those_weights(resnet18_file: Path,
                                                           resnet18_state: dict[str, torch.Tensor],
                                                           cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fetch_fails(monkeypatch, AssertionError("a local file must not be fetched"))
    encoder = _resnet18(backbone_weights=str(resnet18_file), pretrained=True)
    assert torch.equal(encoder.backbone.conv1.weight, resnet18_state["conv1.weight"])
    assert torch.equal(encoder.backbone.layer3[1].bn2.running_var, resnet18_state["layer3.1.bn2.running_var"])


def test_the_cache_is_read_without_fetching(resnet18_file: Path, resnet18_state: dict[str, torch.Tensor], cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache.mkdir(parents=True)
    (cache / RESNET18_FILE).write_bytes(resnet18_file.read_bytes())
    timeouts = _fetch_fails(monkeypatch, AssertionError("the cache holds the file: no fetch"))
    encoder = _resnet18(pretrained=True)
    assert torch.equal(encoder.backbone.conv1.weight, resnet18_state["conv1.weight"]) and timeouts == []


def test_missing_weights_are_fetched_into_the_cache(resnet18_state: dict[str, torch.Tensor], cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def download(url: str, path: Path) -> None:
        calls.append((url, path))
        path.parent.mkdir(parents=True)
        torch.save(resnet18_state, path)

    monkeypatch.setattr(encoders, "_download", download)
    encoder = _resnet18(pretrained=True)
    assert torch.equal(encoder.backbone.conv1.weight, resnet18_state["conv1.weight"])
    assert calls == [(RESNET18_URL, cache / RESNET18_FILE)]  # into torchvision's own cache


def test_a_download_is_checked_against_the_digits_in_its_name(tmp_path: Path) -> None:
    """A file:// URL stands in for the server: the request itself, with its timeout, but no network."""
    payload = b"weights" * 1000
    digits = hashlib.sha256(payload).hexdigest()[:8]
    for name in (f"net-{digits}.pth", "net-00000000.pth"):
        (tmp_path / name).write_bytes(payload)
    out = tmp_path / "cache"
    encoders._download((tmp_path / f"net-{digits}.pth").as_uri(), out / f"net-{digits}.pth")
    assert (out / f"net-{digits}.pth").read_bytes() == payload
    with pytest.raises(ValueError, match="SHA-256"):
        encoders._download((tmp_path / "net-00000000.pth").as_uri(), out / "net-00000000.pth")
    assert sorted(p.name for p in out.iterdir()) == [f"net-{digits}.pth"]  # no partial file left


@pytest.mark.parametrize("error", [URLError(OSError(-3, "Temporary failure in name resolution")),
                                   TimeoutError("timed out")])
def test_no_network_is_one_line_naming_the_url_and_the_cache(error: BaseException, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = socket.getdefaulttimeout()
    timeouts = _fetch_fails(monkeypatch, error)
    with pytest.raises(ConfigError) as err:
        _resnet18(pretrained=True)
    message = str(err.value)
    assert "\n" not in message and RESNET18_URL in message and f"{cache}/" in message
    assert "--backbone-weights" in message
    assert timeouts and timeouts[0] is not None and timeouts[0] <= 30  # a short wait, given to the request
    assert socket.getdefaulttimeout() == before


def test_a_fetch_that_gives_no_state_dict_is_one_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def download(url: str, path: Path) -> None:
        path.parent.mkdir(parents=True)
        torch.save(["not", "weights"], path)

    monkeypatch.setattr(encoders, "_download", download)
    with pytest.raises(ConfigError, match="is not a state dict") as err:
        _resnet18(pretrained=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, arch, message", [
    (["a", "list"], "resnet18", "is not a state dict"),
    ({"conv1.weight": 3}, "resnet18", "is not a state dict"),
    (b"not a checkpoint", "resnet18", "cannot read backbone weights"),
    ("resnet18", "resnet34", "does not hold resnet34 weights"),  # a resnet18 file for a resnet34
])
def test_a_wrong_weights_file_is_one_line(content: object, arch: str, message: str, resnet18_file: Path,
                                          tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    if content == "resnet18":
        path = resnet18_file
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=message) as err:
        _resnet18(cnn_arch=arch, backbone_weights=str(path))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- end to end


def test_train_pretrained_from_the_defaults_end_to_end(resnet18_file: Path, resnet18_state: dict[str, torch.Tensor],
                                                       cache: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _fetch_fails(monkeypatch, AssertionError("--backbone-weights is given: no fetch"))
    annotations = write_synthetic(tmp_path / "data", 6, image_size=64)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--data", str(annotations), "--images", str(tmp_path / "data" / "images"), "--encoder", "cnn",
        "--pretrained", "--backbone-weights", str(resnet18_file), "--set", "cnn_arch=resnet18", "--max-steps", "1",
        "--batch-size", "2", "--out", str(out), "--device", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "using torchvision resnet18 at 224 px" in result.output
    saved = json.loads((out / "config.json").read_text())
    model = saved["model"]
    assert (model["cnn_arch"], model["image_size"], model["pretrained"]) == ("resnet18", 224, True)
    assert model["backbone_weights"] == str(resnet18_file)
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()
    assert saved["preprocess"] == {"image_size": 224, "mean": list(weights.mean), "std": list(weights.std)}
    # One step at a warm-up learning rate moves the loaded weights by far less than a fresh init differs.
    trained = load_weights(out / LAST).model["encoder.backbone.conv1.weight"]
    torch.testing.assert_close(trained, resnet18_state["conv1.weight"], atol=1e-4, rtol=0)
