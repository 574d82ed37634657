"""Checkpoint files: round trips, atomic writes, and loading that never runs code."""

from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
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


# A pickle planted as the weights of a complete run: tests/test_hostile_weights.py.


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


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_a_normal_file_gets(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        checkpoint.write_json(tmp_path / "config.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("x")  # what any other program would have created
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def spy_replace(src: object, dst: object) -> None:
        events.append("rename")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    checkpoint.write_json(tmp_path / "config.json", {"a": 1})
    assert events == ["fsync file", "rename", "fsync folder"]


def test_stale_temporaries_left_by_a_kill_are_removed(tmp_path: Path) -> None:
    """A real SIGKILL mid-write leaves `.NAME.xxxxxxxx.tmp`; the cleanup removes only names of that form."""
    checkpoint.write_json(tmp_path / "config.json", {"step": 1})
    script = ("import os, signal, sys\nfrom pathlib import Path\nfrom captioner import checkpoint\n"
              "def killed(tmp):\n    tmp.write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              "checkpoint.atomic_write(Path(sys.argv[1]) / 'config.json', killed)\n")
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=Path(__file__).parent.parent)
    assert child.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".config.json.")]
    assert len(left) == 1 and left[0].name.endswith(".tmp")
    others = ["notes.tmp", ".hidden", ".x.tmp", ".a.ABCDEFGH.tmp", "model.safetensors.tmp"]  # not names we make
    for name in others:
        (tmp_path / name).write_text("theirs")
    old = time.time() - 600
    for name in [left[0].name, *others]:
        os.utime(tmp_path / name, (old, old))
    young = tmp_path / ".last.safetensors.k2j4h6g8.tmp"  # perhaps another process writing right now
    young.write_text("young")

    assert checkpoint.remove_stale_temporaries(tmp_path) == [left[0]]
    assert young.exists()
    assert checkpoint.remove_stale_temporaries(tmp_path, min_age=0) == [young]  # a lock holder removes all
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", *others])
    assert json.loads((tmp_path / "config.json").read_text()) == {"step": 1}
    assert checkpoint.remove_stale_temporaries(tmp_path / "missing") == []


def _deny_writes(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Make every file opened for writing under `folder` fail as a read-only or forbidden folder would (we run as
    root in CI containers, where chmod forbids nothing)."""
    os_open, builtin_open = os.open, builtins.open

    def denied(path: object) -> OSError:
        return OSError(code, os.strerror(code), str(path))

    def guarded_os_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return os_open(path, flags, *args, **kwargs)

    def guarded_open(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(folder)) and set(mode) & set("wax+"):
            raise denied(path)
        return builtin_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(builtins, "open", guarded_open)


WRITERS = {
    "write_json": lambda run: checkpoint.write_json(run / "predictions.json", [1]),
    "append_jsonl": lambda run: checkpoint.append_jsonl(run / checkpoint.METRICS, {"step": 1}),
    "write_run_config": lambda run: checkpoint.write_run_config(run, model_config={}, vocab={}, preprocess={},
                                                                train={}, data={}),
    "save_weights": lambda run: checkpoint.save_weights(run / checkpoint.LAST, Tied()),
}


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_unwritable_folder_is_a_one_line_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          writer: str, code: int) -> None:
    _deny_writes(monkeypatch, tmp_path, code)
    with pytest.raises(CheckpointError) as caught:
        WRITERS[writer](tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path)) and os.strerror(code) in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into a read-only folder")
@pytest.mark.parametrize("writer", list(WRITERS))
def test_read_only_folder_is_a_one_line_checkpoint_error(tmp_path: Path, writer: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            WRITERS[writer](run)
    finally:
        run.chmod(0o700)
