"""Where the decoder looks: on the one-object world a briefly trained model points at the object."""

from __future__ import annotations

from pathlib import Path

from captioner.checkpoint import load_run
from captioner.evaluation import evaluate_samples, run_samples
from captioner.training import train

from .conftest import TINY_MODEL, tiny_train_config


def test_attention_points_at_the_object_more_often_than_chance(tmp_path: Path) -> None:
    # The pure ViT (linear patch embedding): each token is strictly its own 12 px patch, and this small
    # budget (400 steps) was sized for it.
    run = tmp_path / "one-object"
    cfg = tiny_train_config(synth_max_objects=1, synth_train=512, synth_val=32, synth_test=64, max_steps=400,
                            val_every=400, batch_size=16, lr=3e-3, warmup_steps=20,
                            extra={**TINY_MODEL, "d_model": 64, "d_ff": 128, "vit_stem": "linear"})
    train(cfg, run)
    loaded = load_run(run)
    test = [s for s in run_samples(cfg.to_dict()) if s.split == "test"]
    assert all(len(s.scene.objects) == 1 for s in test)
    report = evaluate_samples(loaded.model, test, loaded.vocab, loaded.preprocess, synthetic=True, grounding=True,
                              java=False)
    g = report.grounding
    assert g is not None and g["words"] >= 10  # colour/shape words of captions that name the object right
    assert g["hit_rate"] > 2 * g["chance"], g
