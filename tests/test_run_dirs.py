"""Run directories as places two processes could fight over: the run lock, refusing a folder that is not empty,
unique default names, and SCST's refusal to write into anything but a fresh folder outside its source."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from captioner import checkpoint
from captioner.config import SCSTConfig, TrainConfig, resolve
from captioner.errors import CheckpointError, ConfigError
from captioner.scst import prepare_scst
from captioner.training import train

from .conftest import tiny_train_config

REPO = Path(__file__).parent.parent


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder): what "touches nothing" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- the run lock


def test_second_lock_in_one_process_is_refused_until_the_first_is_released(tmp_path: Path) -> None:
    """flock belongs to an open file description, so a second open() in the same process conflicts too."""
    with checkpoint.lock_run_dir(tmp_path):
        with pytest.raises(CheckpointError) as caught:
            checkpoint.lock_run_dir(tmp_path)
        assert str(caught.value) == (f"{tmp_path}: another captioner process is writing to this run "
                                     f"(pid {os.getpid()})")
    lock = checkpoint.lock_run_dir(tmp_path)  # released on leaving the block
    lock.close()
    lock.close()  # closing twice is harmless
    checkpoint.lock_run_dir(tmp_path).close()


def test_lock_of_another_process_refuses_and_dies_with_it(tmp_path: Path) -> None:
    script = ("import sys, time\nfrom captioner import checkpoint\n"
              "lock = checkpoint.lock_run_dir(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"another captioner process is writing to this run \(pid "
                                                  rf"{child.pid}\)"):
            checkpoint.lock_run_dir(tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops the lock
        child.wait()
    assert (tmp_path / checkpoint.LOCK).exists()  # the stale lock file stays, and blocks nothing
    checkpoint.lock_run_dir(tmp_path).close()


def test_lock_in_a_missing_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing: could not create its lock file \(No such file"):
        checkpoint.lock_run_dir(tmp_path / "missing")


# ----------------------------------------------------------------------------- a fresh run's folder


@pytest.mark.parametrize("names, message", [
    ([checkpoint.CONFIG], r"already holds a run \(holds 1 file, e.g. config.json\)"),  # an inference-only run
    ([checkpoint.LAST], r"already holds a run \(holds 1 file, e.g. last.safetensors\)"),
    (["notes.txt", checkpoint.BEST], r"already holds a run \(holds 2 files, e.g. model.safetensors\)"),
    (["notes.txt", "b.txt"], r"is not empty \(holds 2 files, e.g. b.txt\)"),
    (["images/"], r"is not empty \(holds 1 file, e.g. images\)"),
])
def test_fresh_run_refuses_a_folder_that_is_not_empty_and_touches_nothing(
        tmp_path: Path, names: list[str], message: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in names:
        (run / name).mkdir() if name.endswith("/") else (run / name).write_text(name)
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match=rf"^{run}: {message}; give another --out$"):
        checkpoint.claim_fresh_run_dir(run)
    assert _snapshot(run) == before  # not even a lock file


def test_fresh_run_refuses_a_file_and_a_folder_another_process_holds(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        checkpoint.claim_fresh_run_dir(tmp_path / "file")
    with checkpoint.claim_fresh_run_dir(tmp_path / "run"), \
            pytest.raises(CheckpointError, match="another captioner process is writing to this run"):
        checkpoint.claim_fresh_run_dir(tmp_path / "run")


def test_fresh_run_takes_a_missing_or_empty_folder_or_one_a_killed_run_left(tmp_path: Path) -> None:
    with checkpoint.claim_fresh_run_dir(tmp_path / "a" / "b"):  # parents are created
        assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "empty").mkdir()
    checkpoint.claim_fresh_run_dir(tmp_path / "empty").close()
    killed = tmp_path / "killed"  # killed while writing its first config.json
    killed.mkdir()
    (killed / checkpoint.LOCK).write_text("12345\n")
    (killed / ".config.json.ab12cd34.tmp").write_text("{half")
    with checkpoint.claim_fresh_run_dir(killed) as lock:
        assert lock.run_dir == killed
        assert [p.name for p in killed.iterdir()] == [checkpoint.LOCK]  # the leftover is gone
        assert (killed / checkpoint.LOCK).read_text() == f"{os.getpid()}\n"


def test_default_run_names_differ_within_one_second(tmp_path: Path) -> None:
    when = datetime(2024, 5, 6, 7, 8, 9)
    made = [checkpoint.new_run_dir(tmp_path / "runs", "vit", when=when) for _ in range(3)]
    assert [p.name for p in made] == ["vit-20240506-070809", "vit-20240506-070809-2", "vit-20240506-070809-3"]
    assert all(p.is_dir() for p in made)
    now = [checkpoint.new_run_dir(tmp_path, "cnn") for _ in range(2)]  # two runs started back to back
    assert now[0] != now[1] and all(p.name.startswith("cnn-") for p in now)
    checkpoint.claim_fresh_run_dir(now[1]).close()  # a default folder is a fresh run's to take


# ----------------------------------------------------------------------------- SCST's output folder


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-entropy run of one step: the source of the SCST runs below."""
    run = tmp_path_factory.mktemp("runs") / "ce"
    train(tiny_train_config(synth_train=16, synth_val=4, synth_test=4, max_steps=1, batch_size=8), run)
    return run


def _scst_options(run: Path) -> TrainConfig:
    """What `captioner train --scst --resume RUN` resolves on the CPU."""
    saved = checkpoint.read_run_config(run)
    return resolve(cli={"device": "cpu", "precision": "fp32", "max_steps": 1, "batch_size": 4}, model_cli={},
                   saved=saved, scst={}).train


def test_scst_twice_from_one_run_is_refused(ce_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "ce"
    source.symlink_to(ce_run)  # the default --out is a sibling of the source: keep it inside tmp_path
    with checkpoint.claim_fresh_run_dir(tmp_path / "ce-scst"), \
            pytest.raises(CheckpointError, match="another captioner process is writing to this run"):
        prepare_scst(source, _scst_options(ce_run), SCSTConfig(samples=2))  # the first has not written yet
    run = prepare_scst(source, _scst_options(ce_run), SCSTConfig(samples=2))
    assert run.run_dir == tmp_path / "ce-scst" and (run.run_dir / checkpoint.CONFIG).is_file()
    run.lock.close()
    before = _snapshot(tmp_path / "ce-scst")
    with pytest.raises(CheckpointError, match=r"ce-scst: already holds a run .*; give another --out$"):
        prepare_scst(source, _scst_options(ce_run), SCSTConfig(samples=2))
    assert _snapshot(tmp_path / "ce-scst") == before


@pytest.mark.parametrize("names", [[checkpoint.CONFIG], [checkpoint.BEST], [checkpoint.LAST], ["notes.txt"],
                                   ["images/"]])
def test_scst_refuses_an_out_that_is_not_empty_and_touches_nothing(ce_run: Path, tmp_path: Path,
                                                                   names: list[str]) -> None:
    out = tmp_path / "other"
    out.mkdir()
    for name in names:
        (out / name).mkdir() if name.endswith("/") else (out / name).write_text(name)
    before, source_before = _snapshot(out), _snapshot(ce_run)
    with pytest.raises(CheckpointError, match=rf"^{out}: .*; give another --out$"):
        prepare_scst(ce_run, _scst_options(ce_run), SCSTConfig(samples=2), out=out)
    link = tmp_path / "link"  # the same folder through a symbolic link
    link.symlink_to(out)
    with pytest.raises(CheckpointError, match=rf"^{link}: .*; give another --out$"):
        prepare_scst(ce_run, _scst_options(ce_run), SCSTConfig(samples=2), out=link)
    assert _snapshot(out) == before and _snapshot(ce_run) == source_before


def test_scst_refuses_an_out_that_is_or_lies_inside_its_source(ce_run: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(ce_run)
    before = _snapshot(ce_run)
    for out in [link, ce_run.parent / "x" / ".." / ce_run.name, ce_run / "scst", link / "deeper" / "scst"]:
        with pytest.raises(ConfigError, match="--out must"):
            prepare_scst(ce_run, _scst_options(ce_run), SCSTConfig(samples=2), out=out)
    assert _snapshot(ce_run) == before
