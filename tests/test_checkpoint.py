"""Checkpoint files: round trips, atomic writes, and loading that never runs code."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.errors import CheckpointError


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # tied, like the decoder's output projection


def test_weights_and_optimizer_round_trip(tmp_path: Path) -> None:
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.emb.weight.sum().backward()
    opt.step()
    rng = {"torch": torch.get_rng_state()}
    path = tmp_path / "last.safetensors"
    checkpoint.save_weights(path, model, meta={"step": 3},
                            train_state={"optimizer": opt.state_dict(), "rng": rng, "step": 3, "best": 0.5})
    loaded = checkpoint.load_weights(path)
    assert loaded.meta == {"step": 3}
    assert loaded.train_state == {"step": 3, "best": 0.5}
    assert torch.equal(loaded.rng["torch"], rng["torch"])
    fresh = Tied()
    fresh.load_state_dict(loaded.model)
    assert torch.equal(fresh.emb.weight, model.emb.weight)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded.optimizer)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])


def test_failed_write_leaves_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(path, Tied(), meta={"step": 1})
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        checkpoint.save_weights(path, Tied(), meta={"step": 2})
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    assert checkpoint.load_weights(path).meta == {"step": 1}


def test_kill_mid_write_leaves_previous_file_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed after writing half the bytes never renamed them over the old file."""
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(path, Tied(), meta={"step": 1})

    def half_written(tmp: Path) -> None:
        tmp.write_bytes(b"\x00" * 10)
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(path, half_written)
    assert checkpoint.load_weights(path).meta == {"step": 1}


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_or_truncated_weights_give_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load_weights(path)


def test_truncated_real_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    checkpoint.save_weights(path, Tied())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load_weights(path)


class _Payload:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_never_executes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    payload = pickle.dumps(_Payload(str(marker)))
    (run / "model.safetensors").write_bytes(payload)  # a pickle disguised as weights
    (run / "last.safetensors").write_bytes(payload)
    (run / "train_state.pt").write_bytes(payload)  # what other tools would torch.load
    (run / "config.json").write_text(json.dumps({"format_version": checkpoint.FORMAT_VERSION}))
    with pytest.raises(CheckpointError):
        checkpoint.load_run(run)
    with pytest.raises(CheckpointError):
        checkpoint.load_weights(run / "last.safetensors")
    assert not marker.exists()


def test_run_config_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.read_run_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        checkpoint.read_run_config(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        checkpoint.read_run_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 999}))
    with pytest.raises(CheckpointError, match="999"):
        checkpoint.read_run_config(tmp_path)


def test_latest_run_picks_newest(tmp_path: Path) -> None:
    for i, name in enumerate(["a", "b"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        weights = tmp_path / name / "model.safetensors"
        weights.write_bytes(b"x")
        os.utime(weights, (1000 + i, 1000 + i))
    assert checkpoint.latest_run(tmp_path) == tmp_path / "b"
    with pytest.raises(CheckpointError, match="no trained run"):
        checkpoint.latest_run(tmp_path / "empty")


def test_jsonl_skips_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    checkpoint.append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "CIDEr')  # killed mid-line
    assert checkpoint.read_jsonl(path) == [{"step": 1}]
