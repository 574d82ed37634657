"""The training loop keeps every run: exact resume in every mode, a save before any error, no NaN ever saved.

Each test here failed on the loop before it was made to hold (see the commit that added it).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

import captioner.training as training
from captioner import checkpoint
from captioner.data.dataset import CaptionDataset
from captioner.data.synthetic import write_synthetic
from captioner.errors import ConfigError, ImageError
from captioner.training import NonFiniteLoss, TrainingInterrupted, train

from .conftest import TINY_MODEL, tiny_train_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 images on disk: training on files goes through the augmentation (the built-in world skips it)."""
    return write_synthetic(tmp_path_factory.mktemp("data") / "synth", 48, image_size=48)


def _random_everywhere(data: Path, **overrides) -> training.TrainConfig:
    """Dropout, augmentation, scheduled sampling and worker processes: everything that draws random numbers."""
    options = dict(data=str(data), extra={**TINY_MODEL, "dropout": 0.2}, scheduled_sampling=0.5, batch_size=8,
                   max_steps=16, val_every=100, schedule="cosine", workers=2, captions_per_image=2)
    return tiny_train_config(**{**options, **overrides})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_weights(run / checkpoint.LAST).model


def _stop_at(step: int):
    def on_event(kind: str, data: dict) -> None:
        if kind == "step" and data["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_event


def _interrupted_then_resumed(cfg: training.TrainConfig, run: Path, stop: int,
                              resumed: training.TrainConfig | None = None) -> dict[str, torch.Tensor]:
    with pytest.raises(TrainingInterrupted):
        train(cfg, run, on_event=_stop_at(stop))
    assert checkpoint.load_weights(run / checkpoint.LAST).train_state["step"] == stop
    train(resumed or cfg, run, resume=True)
    return _weights(run)


@pytest.mark.slow
def test_resume_is_exact_with_dropout_augmentation_workers_and_scheduled_sampling(dataset: Path,
                                                                                  tmp_path: Path) -> None:
    """A run stopped mid-epoch (6 steps an epoch, stopped at 10) and resumed ends bit-identical to one never stopped.

    The straight run uses no workers and the resumed one two: augmentation depends on the item alone.
    """
    straight = tmp_path / "straight"
    train(_random_everywhere(dataset, workers=0), straight)
    resumed = _interrupted_then_resumed(_random_everywhere(dataset), tmp_path / "stopped", 10)
    expected = _weights(straight)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


@pytest.mark.slow
def test_resume_without_the_random_state_restore_is_not_exact(dataset: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact-resume test above can fail: with the RNG restore removed, dropout draws other masks."""
    straight = tmp_path / "straight"
    train(_random_everywhere(dataset), straight)
    with pytest.raises(TrainingInterrupted):
        train(_random_everywhere(dataset), tmp_path / "stopped", on_event=_stop_at(10))
    monkeypatch.setattr(training, "set_rng_state", lambda state: None)
    train(_random_everywhere(dataset), tmp_path / "stopped", resume=True)
    expected, got = _weights(straight), _weights(tmp_path / "stopped")
    assert any(not torch.equal(expected[k], got[k]) for k in expected)


def test_augmentation_depends_on_the_item_alone_not_on_the_generator(dataset: Path) -> None:
    """The same (seed, epoch, index) gives the same augmented image whatever the global RNG did before."""
    from captioner.data.images import Preprocess, train_transform
    from captioner.data.sources import load_samples
    from captioner.data.vocab import Vocabulary

    samples = load_samples(str(dataset))
    vocab = Vocabulary.build([c for s in samples for c in s.captions])
    data = CaptionDataset(samples, vocab, train_transform(Preprocess(image_size=48)), seed=3)
    torch.manual_seed(0)
    first = data[5].image
    torch.manual_seed(1)
    state = torch.get_rng_state()
    again = data[5].image
    assert torch.equal(first, again)
    assert torch.equal(state, torch.get_rng_state())  # the training stream is left as it was
    data.set_epoch(1)
    assert not torch.equal(first, data[5].image)  # another epoch, another augmentation


@pytest.mark.parametrize(("option", "value"), [("seed", 1), ("batch_size", 4), ("captions_per_image", 1)])
def test_resume_refuses_a_changed_data_order(option: str, value: int, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_train_config(max_steps=2, val_every=2), run)
    before = (run / checkpoint.LAST).read_bytes()
    flag = "--" + option.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{flag} {value} differs from this run's"):
        train(tiny_train_config(max_steps=4, **{option: value}), run, resume=True)
    assert (run / checkpoint.LAST).read_bytes() == before


def test_grad_clip_zero_means_no_clipping(tmp_path: Path) -> None:
    """--grad-clip 0 used to multiply every gradient by zero: the model never learned."""
    unclipped = train(tiny_train_config(max_steps=3, val_every=3, grad_clip=1e9), tmp_path / "big").run_dir
    zero = train(tiny_train_config(max_steps=3, val_every=3, grad_clip=0.0), tmp_path / "zero").run_dir
    a, b = _weights(unclipped), _weights(zero)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def test_non_finite_gradients_with_a_finite_loss_stop_before_the_update(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    train(tiny_train_config(max_steps=4, val_every=4), run)
    good = (run / checkpoint.LAST).read_bytes()
    real_loss, calls = training.caption_loss, {"n": 0}

    def finite_loss_nan_gradients(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return _NaNGradient.apply(loss) if calls["n"] >= 2 else loss

    monkeypatch.setattr(training, "caption_loss", finite_loss_nan_gradients)
    with pytest.raises(NonFiniteLoss, match="non-finite at step 6"):
        train(tiny_train_config(max_steps=8, val_every=2), run, resume=True)
    assert (run / checkpoint.LAST).read_bytes() == good  # never a NaN weight on disk


def test_an_error_mid_epoch_saves_a_resumable_state_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that goes bad mid-epoch (any error) no longer loses the steps since the last validation."""
    real_getitem, calls = CaptionDataset.__getitem__, {"n": 0}

    def breaks_later(self, index):
        calls["n"] += 1
        if calls["n"] > 8 * 5:  # batch 8: the 6th step's first image
            raise ImageError("photo.jpg", "image file is truncated")
        return real_getitem(self, index)

    monkeypatch.setattr(CaptionDataset, "__getitem__", breaks_later)
    events: list[tuple[str, dict]] = []
    run = tmp_path / "run"
    with pytest.raises(ImageError):
        train(tiny_train_config(max_steps=8, val_every=100), run, on_event=lambda k, d: events.append((k, d)))
    state = checkpoint.load_weights(run / checkpoint.LAST).train_state
    assert state["step"] == 5 and not state["finished"]
    assert any(k == "warning" and "resume with" in d["message"] for k, d in events)
    monkeypatch.setattr(CaptionDataset, "__getitem__", real_getitem)
    assert train(tiny_train_config(max_steps=8, val_every=100), run, resume=True).steps == 8


def test_the_loss_scale_of_fp16_is_saved_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16's GradScaler state (its grown or shrunk scale) used to restart from 65536 on every resume."""
    monkeypatch.setattr(training, "grad_scaler",
                        lambda plan: torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1))
    run = tmp_path / "run"
    train(tiny_train_config(max_steps=3, val_every=3), run)
    saved = checkpoint.load_weights(run / checkpoint.LAST).train_state["scaler"]
    assert saved["scale"] == 8.0 * 2 ** 3  # grew at each of the 3 finite steps
    scales: list[float] = []
    real_restore = training.restore

    def spy(run_state, weights):
        real_restore(run_state, weights)
        scales.append(run_state.scaler.get_scale())

    monkeypatch.setattr(training, "restore", spy)
    train(tiny_train_config(max_steps=4, val_every=4), run, resume=True)
    assert scales == [64.0]


def test_resume_reads_weights_only_from_the_runs_own_checkpoint(tmp_path: Path) -> None:
    """A resumed run never loads the backbone file its config.json names (a crafted run could name any file)."""
    import json

    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cnn = {k: v for k, v in TINY_MODEL.items() if k not in ("patch_size", "vit_stem")}
    cfg = tiny_train_config(encoder="cnn", max_steps=4, val_every=2,
                            extra={**cnn, "image_size": 64, "cnn_arch": "resnet18", "backbone_weights": str(weights)})
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(cfg, run, on_event=lambda kind, data: os.kill(os.getpid(), signal.SIGINT) if kind == "start" else None)
    config = json.loads((run / checkpoint.CONFIG).read_text())
    config["model"]["backbone_weights"] = str(tmp_path / "planted.pth")  # what a crafted run directory would name
    (run / checkpoint.CONFIG).write_text(json.dumps(config))
    weights.unlink()
    assert train(cfg, run, resume=True).steps == 4
