"""What a dataset run does without options: the backbone's own learning rate, a frozen start, early stop,
a vocabulary threshold that suits the data's size, and a schedule fitted to --time-limit."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.config import BACKBONE_LR_SHARE, DATASET_MAX_EPOCHS, DATASET_PATIENCE, LARGE_DATASET
from captioner.data.synthetic import write_synthetic
from captioner.models.captioner import CaptionModel
from captioner.training import make_optimizer, train

from .conftest import TINY_MODEL, tiny_model_config, tiny_train_config

CNN = {k: v for k, v in TINY_MODEL.items() if k not in ("patch_size", "vit_stem")}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scenes on disk as a plain COCO dataset (train 32 / val 8 / test 8, no boxes: ranked by CIDEr-D)."""
    import json

    root = tmp_path_factory.mktemp("defaults")
    images, annotations = [], []
    for split, n in (("train", 32), ("val", 8), ("test", 8)):
        part = json.loads(write_synthetic(root, n, split=split, image_size=48).read_text())
        images += part["images"]
        annotations += part["annotations"]
    for i, annotation in enumerate(annotations):
        annotation["id"] = i
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def _resnet18_file(path: Path) -> Path:
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_the_backbone_learns_at_its_own_rate() -> None:
    model = CaptionModel(tiny_model_config("cnn", **{**CNN, "cnn_arch": "resnet18", "image_size": 64}))
    optimizer = make_optimizer(model, tiny_train_config(encoder="cnn", lr=1e-3))
    backbone = {id(p) for p in model.encoder.backbone.parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = group["lr"]
    assert [rates[i] for i in backbone] == pytest.approx([1e-3 * BACKBONE_LR_SHARE] * len(backbone))
    assert {rates[i] for i in rates if i not in backbone} == {1e-3}
    assert len(rates) == len(list(model.parameters()))  # every parameter in exactly one group
    chosen = make_optimizer(model, tiny_train_config(encoder="cnn", lr=1e-3, backbone_lr=5e-5))
    assert {g["lr"] for g in chosen.param_groups} == {1e-3, 5e-5}


def test_a_frozen_start_trains_the_decoder_alone_then_the_backbone(data: Path, tmp_path: Path) -> None:
    """--freeze-backbone-epochs 1: the backbone is unchanged after the first epoch, changed after the second."""
    weights = _resnet18_file(tmp_path / "resnet18.pth")
    model = {**CNN, "cnn_arch": "resnet18", "image_size": 64, "backbone_weights": str(weights)}
    common = dict(data=str(data), encoder="cnn", extra=model, batch_size=8, freeze_backbone_epochs=1, workers=0)
    first = train(tiny_train_config(epochs=1, **common), tmp_path / "one").run_dir
    second = train(tiny_train_config(epochs=2, **common), tmp_path / "two").run_dir
    start = {f"encoder.backbone.{k}": v for k, v in torch.load(weights, weights_only=True).items()}
    after_one, after_two = (checkpoint.load_weights(r / checkpoint.LAST).model for r in (first, second))
    convs = [k for k in after_one if k.startswith("encoder.backbone.") and "conv" in k]
    assert convs and all(torch.equal(after_one[k], start[k]) for k in convs)  # frozen through epoch 1
    assert any(not torch.equal(after_two[k], start[k]) for k in convs)  # fine-tuned in epoch 2


def test_a_dataset_run_stops_when_validation_stops_improving(data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """No --epochs: up to DATASET_MAX_EPOCHS, ended by DATASET_PATIENCE validations without a better CIDEr-D,
    but not before half the schedule: until then a run at a high learning rate is noisy, not finished."""
    import captioner.evaluation as evaluation

    real = evaluation.score_samples
    scripted = itertools.chain([0.5, 0.6], itertools.repeat(0.55))

    def scores(*args, **kwargs):
        report = real(*args, **kwargs)
        report.scores["CIDEr-D"] = next(scripted)
        return report

    monkeypatch.setattr(evaluation, "score_samples", scores)
    events: list[tuple[str, dict]] = []
    result = train(tiny_train_config(data=str(data), epochs=None, batch_size=8, workers=0), tmp_path / "run",
                   on_event=lambda kind, d: events.append((kind, d)))
    start = next(d for kind, d in events if kind == "start")
    assert start["steps"] == DATASET_MAX_EPOCHS * 4  # 32 images, batch 8
    assert result.epochs == DATASET_MAX_EPOCHS // 2  # best at epoch 2, stale from epoch 5, stopped at half
    assert result.best["step"] == 8
    assert any("early stop" in d.get("message", "") for kind, d in events if kind == "warning")


@pytest.mark.parametrize(("data", "captions", "want"), [(None, 10**6, 1), ("d.json", 1000, 2),
                                                         ("d.json", LARGE_DATASET, 5)])
def test_the_vocabulary_threshold_follows_the_data(data: str | None, captions: int, want: int) -> None:
    assert tiny_train_config(data=data).resolved_min_count(captions) == want
    assert tiny_train_config(data=data, min_count=3).resolved_min_count(captions) == 3  # an explicit choice wins


def test_early_stop_is_a_default_only_for_a_dataset_of_default_length() -> None:
    assert tiny_train_config(data="d.json", epochs=None).resolved_early_stop() == DATASET_PATIENCE
    assert tiny_train_config(data="d.json", epochs=5).resolved_early_stop() is None
    assert tiny_train_config(data=None, epochs=None).resolved_early_stop() is None
    assert tiny_train_config(data="d.json", epochs=5, early_stop=2).resolved_early_stop() == 2
