"""The training run's bookkeeping: its clock, its place in an epoch, its one loss scaler, its stop messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captioner import training
from captioner.training import Clock, prepare

from .conftest import tiny_train_config


def test_a_clock_starts_every_reading_at_one_instant() -> None:
    clock = Clock.start(7)
    assert clock.t0 == clock.tick == clock.window_start
    assert (clock.window_images, clock.start_step) == (0, 7)


def test_step_in_epoch_counts_from_the_epochs_first_step(tmp_path: Path) -> None:
    run = prepare(tiny_train_config(epochs=3), tmp_path / "run")
    run.lock.close()
    per_epoch = run.steps_per_epoch
    run.step, run.epoch = per_epoch + 2, 1
    assert run.step_in_epoch == 2
    run.step = 2 * per_epoch  # the epoch's last step taken, `epoch` not yet advanced
    assert run.step_in_epoch == per_epoch


def test_the_loss_scaler_is_made_once_and_kept_through_rewrapping(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[torch.amp.GradScaler] = []

    def scaler(plan):
        made.append(torch.amp.GradScaler("cpu"))
        return made[-1]

    monkeypatch.setattr(training, "grad_scaler", scaler)
    run = prepare(tiny_train_config(), tmp_path / "run")
    run.lock.close()
    training.wrap_for_training(run)  # as when the backbone joins: the scaler and its scale stay
    assert made == [run.scaler]

