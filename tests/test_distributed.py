"""Several processes (torchrun, gloo on CPU): stop decisions agreed by every rank, reductions on the model's device,
sharded validation, per-rank random state; and gradient accumulation, which must equal one big batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import checkpoint, runtime
from captioner.runtime import Dist
from captioner.training import train

from .conftest import TINY_MODEL, tiny_train_config

# Run by each torchrun process: train the tiny model, making rank 1 alone want to stop (MODE), and write
# how the run ended on this rank to RUN.rank<r>.json.
SCRIPT = r'''
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[3])
import captioner.training as training
from conftest import tiny_train_config

mode, out, rank = sys.argv[1], sys.argv[2], int(os.environ["RANK"])
real_loss, real_clock, steps = training.caption_loss, time.perf_counter, {"n": 0}

def on_event(kind, data):
    if rank != 1 or kind != "start":
        return
    if mode == "signal":
        os.kill(os.getpid(), signal.SIGTERM)  # as if only this rank's host were shutting down
    elif mode == "time":
        training.time.perf_counter = lambda: real_clock() + 3600  # this rank's clock says the hour is up

def exploding(*args, **kwargs):  # rank 1's loss turns NaN at its 3rd step; DDP spreads its gradients
    steps["n"] += 1
    loss = real_loss(*args, **kwargs)
    return loss * float("nan") if rank == 1 and steps["n"] >= 3 else loss

if mode == "nan":
    training.caption_loss = exploding
cfg = tiny_train_config(max_steps=6, val_every=2, time_limit=30.0 if mode == "time" else None)
try:
    result = training.train(cfg, out, on_event=on_event)
    ended = {"rank": rank, "ended": "finished", "steps": result.steps}
except training.CaptionerError as err:
    ended = {"rank": rank, "ended": type(err).__name__, "message": str(err)}
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(ended, f)
'''


def _torchrun(tmp_path: Path, mode: str, port: int) -> list[dict]:
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), mode, str(tmp_path / "run"), str(Path(__file__).parent)],
        capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"run.rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "port", "ended", "step"), [
    ("signal", 29531, "TrainingInterrupted", 1),
    ("time", 29532, "finished", 1),
    ("nan", 29533, "NonFiniteLoss", 2),
])
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step(mode: str, port: int, ended: str, step: int,
                                                              tmp_path: Path) -> None:
    """SIGTERM, the time limit or a NaN on rank 1 alone: both ranks end cleanly (no hang) after the same step."""
    results = _torchrun(tmp_path, mode, port)
    assert [r["ended"] for r in results] == [ended, ended]
    state = checkpoint.load_weights(tmp_path / "run" / checkpoint.LAST).train_state
    assert state["step"] == step and state["world"] == 2
    assert any(k.startswith("rank1.") for k in checkpoint.load_weights(tmp_path / "run" / checkpoint.LAST).rng)
    if mode == "time":  # validated at the stop, on both ranks' shares of the split
        records = checkpoint.read_jsonl(tmp_path / "run" / checkpoint.METRICS)
        assert records[-1]["step"] == 1 and records[-1]["images"] == 16


def test_reductions_run_on_the_models_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL reduces only CUDA tensors: the tensors handed to all_reduce live on the device asked for."""
    import torch.distributed as dist

    seen: list[torch.device] = []

    def fake_all_reduce(t: torch.Tensor, op=None) -> None:
        seen.append(t.device)
        raise StopIteration

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    two = Dist(rank=0, world=2)
    for call in (lambda: runtime.all_mean(1.0, two, torch.device("meta")),
                 lambda: runtime.any_rank([True, False], two, torch.device("meta"))):
        with pytest.raises(StopIteration):
            call()
    assert seen == [torch.device("meta"), torch.device("meta")]


def test_accumulating_two_batches_equals_one_batch_of_twice_the_size(tmp_path: Path) -> None:
    """--accumulate 2 --batch-size 4 makes the same updates as --batch-size 8 (same images, same order).

    With the linear patch stem: BatchNorm (the conv stem's) normalises over the batch, so it is the one
    layer where a batch of 4 is not half of a batch of 8. One step: Adam's first update is about lr * sign(g),
    so later steps would amplify the rounding of near-zero gradients into lr-sized differences.
    """
    def cfg(**batching):
        return tiny_train_config(max_steps=1, val_every=1, extra={**TINY_MODEL, "vit_stem": "linear"}, **batching)

    big = train(cfg(batch_size=8), tmp_path / "big").run_dir
    acc = train(cfg(batch_size=4, accumulate=2), tmp_path / "acc").run_dir
    a = checkpoint.load_weights(big / checkpoint.LAST)
    b = checkpoint.load_weights(acc / checkpoint.LAST)
    for key in a.model:
        torch.testing.assert_close(a.model[key], b.model[key], rtol=0, atol=1e-5, msg=key)
    assert b.train_state["step"] == 1
    four_alone = train(cfg(batch_size=4), tmp_path / "four").run_dir
    c = checkpoint.load_weights(four_alone / checkpoint.LAST).model
    assert any(not torch.allclose(a.model[k], c[k], rtol=0, atol=1e-5) for k in c)  # the test can tell
