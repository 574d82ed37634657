"""A run directory whose weights are a pickle: loading refuses the weights file and never runs its code.

The run is complete and valid (its config.json loads with real weights), so the refusal can only come from
the planted weights, never from an earlier check on a missing config section.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.config import ModelConfig
from captioner.data.images import Preprocess
from captioner.data.vocab import Vocabulary
from captioner.errors import CheckpointError
from captioner.models.captioner import CaptionModel

from .conftest import TINY_MODEL


class _Payload:
    """Unpickling this creates the marker file: the proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _valid_run(run: Path) -> None:
    vocab = Vocabulary.build(["a red circle above a blue square"])
    model = CaptionModel(ModelConfig(**{**TINY_MODEL, "vocab_size": len(vocab)}))
    checkpoint.write_run_config(run, model_config=model.config.to_dict(), vocab=vocab.to_dict(),
                                preprocess=Preprocess(image_size=TINY_MODEL["image_size"]).to_dict(),
                                train={}, data={"source": "synthetic"})
    checkpoint.save_weights(run / checkpoint.BEST, model, meta={"step": 1})
    checkpoint.save_weights(run / checkpoint.LAST, model, meta={"step": 1})


@pytest.mark.parametrize("dump", [pickle.dumps, lambda obj: _torch_save(obj)], ids=["pickle", "torch.save"])
def test_pickled_weights_in_a_valid_run_are_refused_without_running(tmp_path: Path, dump) -> None:
    run = tmp_path / "run"
    _valid_run(run)
    assert checkpoint.load_run(run).which == "best"  # the run is loadable as written: only the weights change
    marker = tmp_path / "pwned"
    payload = dump(_Payload(str(marker)))
    for name in (checkpoint.BEST, checkpoint.LAST, "train_state.pt"):  # train_state.pt: what others torch.load
        (run / name).write_bytes(payload)
    for which, name in (("best", checkpoint.BEST), ("last", checkpoint.LAST)):
        with pytest.raises(CheckpointError) as err:
            checkpoint.load_run(run, which=which)
        assert str(run / name) in str(err.value) and "not a readable safetensors file" in str(err.value)
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            checkpoint.load_weights(run / name)  # what a resume reads
    assert not marker.exists()


def test_the_payload_does_run_when_unpickled(tmp_path: Path) -> None:
    """The control: the marker appears when a loader unpickles, so its absence above means something."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(str(marker))))  # noqa: S301
    assert marker.exists()


def _torch_save(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
