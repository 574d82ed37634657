"""Fixtures shared by the tests: tiny model settings, tiny training configs, a briefly trained run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from captioner.config import ModelConfig, TrainConfig

# Two threads like CI; tests are small enough that more threads only add contention. On a shared, busy
# machine set CAPTIONER_TEST_THREADS=1: OpenMP threads that wait on a descheduled partner crawl.
torch.set_num_threads(int(os.environ.get("CAPTIONER_TEST_THREADS", min(2, os.cpu_count() or 1))))

# A model small enough that a test trains it in seconds on a CPU.
# The conv stem (12 px patches: a multiple of its stride 4); the tiny preset's hybrid stem needs 16 px patches,
# and the hybrid is covered by tests/test_models.py.
TINY_MODEL: dict[str, Any] = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, enc_layers=1, image_size=48,
                                  patch_size=12, dropout=0.0, vit_stem="conv")


def tiny_model_config(encoder: str = "vit", **overrides: Any) -> ModelConfig:
    """The tiny model for one encoder (vocabulary size and pad id are placeholders)."""
    return ModelConfig(**{**TINY_MODEL, "encoder": encoder, "vocab_size": 40, **overrides})


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """A training config on a small slice of the built-in world, CPU, fp32, deterministic."""
    base: dict[str, Any] = dict(
        encoder="vit", synth_train=64, synth_val=16, synth_test=16, batch_size=8, lr=2e-3, warmup_steps=2,
        device="cpu", precision="fp32", seed=0, extra=dict(TINY_MODEL), epochs=1,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT run trained for a short while on the built-in world (shared by the CLI tests)."""
    from captioner.training import train

    run = tmp_path_factory.mktemp("runs") / "vit"
    cfg = tiny_train_config(synth_train=512, max_steps=150, val_every=150, batch_size=16, lr=3e-3,
                            warmup_steps=20, extra={**TINY_MODEL, "d_model": 64, "d_ff": 128})
    train(cfg, run)
    return run


@pytest.fixture(autouse=True)
def _private_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset scan and feature caches write under XDG_CACHE_HOME: keep the tests' out of the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
