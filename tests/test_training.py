"""The training loop: schedule, loss masking, exact resume, interruption, bad losses, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import checkpoint, evaluation, training
from captioner.config import DEFAULT_STEPS
from captioner.errors import CheckpointError
from captioner.training import (
    EpochSampler,
    NonFiniteLoss,
    TimeBudget,
    TrainingInterrupted,
    caption_loss,
    lr_factor,
    prepare,
    selection_score,
    train,
)

from .conftest import TINY_MODEL, tiny_train_config


def test_warmup_then_inverse_sqrt() -> None:
    f = [lr_factor(s, warmup=10, schedule="inverse_sqrt", total=100) for s in range(1, 101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear ramp to the peak
    assert all(a < b for a, b in zip(f[:9], f[1:10], strict=True))
    assert f[39] == pytest.approx(math.sqrt(10 / 40))  # then 1/sqrt(step)
    assert max(f) == pytest.approx(1.0)


def test_warmup_then_cosine_reaches_zero() -> None:
    f = [lr_factor(s, warmup=10, schedule="cosine", total=100) for s in range(1, 101)]
    assert f[9] == pytest.approx(1.0) and f[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))


def test_time_budget_fits_the_schedule_to_the_time_left() -> None:
    budget = TimeBudget(limit_s=100.0, started=0.0, cap=1000, steps_per_epoch=100)
    budget.eval_s = 1.0
    budget.train_s = 2.0
    assert budget.plan(10, now=3.0) is None  # opens the pace window
    budget.train_s += 100 * 0.2  # 100 steps at 0.2 s each
    # 96 s usable (3 % + 1 s margin) - 25 s gone - 1 s for the last validation = 70 s, at 0.2 s per step
    # plus one 1 s validation every 100 steps (0.21 s per step): 333 more steps
    assert budget.plan(110, now=25.0) == 110 + 333
    budget.train_s += 100 * 0.001  # a much faster pace never plans more than the configured steps
    assert budget.plan(210, now=26.0) == 1000
    budget.train_s += 100 * 10.0  # out of time: the schedule ends at the next step
    assert budget.plan(310, now=99.0) == 311
    # Validating every 50 steps as well as every epoch: 0.2 s + 1 s x (1/100 + 1/50) = 0.23 s per step
    often = TimeBudget(limit_s=100.0, started=0.0, cap=1000, steps_per_epoch=100, val_every=50)
    often.eval_s, often.train_s = 1.0, 2.0
    often.plan(10, now=3.0)
    often.train_s += 100 * 0.2
    assert often.plan(110, now=25.0) == 110 + 304  # 70 s / 0.23 s


def test_default_run_with_a_time_limit_ends_annealed_within_it(tmp_path: Path) -> None:
    # Default step count (DEFAULT_STEPS["vit"]): far more than fits in 6 s, so the schedule is fitted to the clock
    # and the run ends finished with the learning rate at the bottom of its cosine, not cut off at its peak.
    events: list[tuple[str, dict]] = []
    cfg = tiny_train_config(epochs=None, time_limit=6 / 60, synth_train=256, warmup_steps=5)
    result = train(cfg, tmp_path / "run", on_event=lambda kind, data: events.append((kind, data)))
    plans = [data for kind, data in events if kind == "plan"]
    assert plans and plans[0]["first"] and plans[0]["configured"] == DEFAULT_STEPS["vit"]
    assert 32 < result.steps == plans[-1]["steps"] < DEFAULT_STEPS["vit"]  # past the first epoch, short of the default
    state = checkpoint.load_weights(tmp_path / "run" / checkpoint.LAST).train_state
    assert state["finished"] and state["total_steps"] == result.steps  # a resume keeps the fitted length
    steps = [data for kind, data in events if kind == "step"]
    assert steps[-1]["lr"] < 0.05 * cfg.lr  # annealed
    assert not any(kind == "warning" and "time limit" in data["message"] for kind, data in events)


def test_best_is_kept_by_accuracy_where_truth_is_known_else_by_cider() -> None:
    sharper = {"CIDEr-D": 6.925, "accuracy": 0.92}  # a real pair of validations, the later one truer
    earlier = {"CIDEr-D": 6.928, "accuracy": 0.86}
    assert selection_score(sharper, knows_truth=True) > selection_score(earlier, knows_truth=True)
    assert selection_score(sharper, knows_truth=False) < selection_score(earlier, knows_truth=False)
    tie = {"CIDEr-D": 7.0, "accuracy": 0.92}
    assert selection_score(tie, knows_truth=True) > selection_score(sharper, knows_truth=True)  # CIDEr-D breaks ties


def test_a_collapsed_checkpoint_is_best_only_when_it_scores_over_5_percent_more() -> None:
    varied = {"CIDEr-D": 0.40}
    assert selection_score({"CIDEr-D": 0.41, "collapsed": True}, False) < selection_score(varied, False)
    assert selection_score({"CIDEr-D": 0.43, "collapsed": True}, False) > selection_score(varied, False)


def test_the_warm_up_takes_at_most_a_fifth_of_a_short_fitted_run(tmp_path: Path) -> None:
    run = prepare(tiny_train_config(epochs=None, time_limit=1.0, warmup_steps=500), tmp_path / "run")
    run.lock.close()
    run.total_steps = 100  # what a time limit on a slow machine fits
    factor = run.scheduler.lr_lambdas[0]  # of the 0-based step index
    assert factor(9) == pytest.approx(0.5) and factor(19) == pytest.approx(1.0)  # peak at step 20, not 500
    assert factor(99) == pytest.approx(0.0)  # and still annealed at the end
    explicit = prepare(tiny_train_config(max_steps=100, warmup_steps=500), tmp_path / "explicit")
    explicit.lock.close()
    assert explicit.scheduler.lr_lambdas[0](19) == pytest.approx(20 / 500)  # --max-steps keeps its warm-up


def test_the_collapse_advice_fits_the_run(tmp_path: Path) -> None:
    run = prepare(tiny_train_config(max_steps=100, warmup_steps=10), tmp_path / "run")
    run.lock.close()
    run.step = 5
    assert "let it run" in training._collapse_advice(run)
    run.step = 80
    assert "not using the image" in training._collapse_advice(run)
    run.record_tags = {"phase": "scst"}
    assert "SCST is trading variety" in training._collapse_advice(run)


@pytest.fixture
def varied_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validations never marked collapsed: a model whose learning rate is too small to learn writes one caption
    for every image, and early stop (rightly) does not count that as a model that stopped improving."""
    real = evaluation.score_samples

    def scored(*args, **kwargs):
        report = real(*args, **kwargs)
        report.diversity["collapsed"] = False
        return report

    monkeypatch.setattr(evaluation, "score_samples", scored)


def test_collapsed_validations_never_count_towards_early_stop(tmp_path: Path) -> None:
    result = train(tiny_train_config(max_steps=12, val_every=2, early_stop=2, lr=1e-12), tmp_path / "run")
    assert result.last["collapsed"] and result.steps == 12  # one caption for every image: not finished


def test_default_early_stop_waits_for_half_the_schedule_and_ignores_the_warm_up(tmp_path: Path,
                                                                                 varied_captions: None) -> None:
    # A learning rate too small to change any caption: no validation after the first can improve on it.
    cfg = tiny_train_config(data=None, max_steps=None, epochs=None, val_every=2, lr=1e-12, warmup_steps=6)
    run = prepare(cfg, tmp_path / "run")
    run.lock.close()
    run.total_steps, run.stale = 40, 9
    for step, patience, expected in [(10, None, False), (19, 3, False), (20, 3, True), (12, 3, False)]:
        run.step, run.cfg.early_stop = step, patience
        if patience is None:  # the built-in world has no default patience
            assert not run.converged()
            continue
        run.cfg.early_stop = None
        run.cfg.data = "photos.csv"  # a dataset's default patience (3) waits for half the schedule (20)
        assert run.converged() is expected, step
        run.cfg.early_stop, run.cfg.data = 3, None  # an explicit --early-stop does not wait
        assert run.converged()
    result = train(tiny_train_config(max_steps=12, val_every=2, early_stop=2, lr=1e-12, warmup_steps=6),
                   tmp_path / "warm")
    assert result.steps == 10  # validations at 2, 4, 6 in the warm-up do not count; 8 and 10 do


def test_early_stop_after_validations_without_improvement(tmp_path: Path, varied_captions: None) -> None:
    # A learning rate too small to change any caption: CIDEr-D cannot improve after the first validation.
    events: list[tuple[str, dict]] = []
    cfg = tiny_train_config(max_steps=20, val_every=2, early_stop=2, lr=1e-12)
    result = train(cfg, tmp_path / "run", on_event=lambda kind, data: events.append((kind, data)))
    assert result.steps == 6  # validations at 2 (best), 4 and 6 (no improvement twice): stop
    assert [d["message"] for k, d in events if k == "warning" and "early stop" in d["message"]] == [result.stopped]
    assert checkpoint.load_weights(tmp_path / "run" / checkpoint.LAST).train_state["finished"]


def test_metrics_log_the_training_loss_every_50_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_train_config(max_steps=100, val_every=100, synth_train=128), run)
    records = checkpoint.read_jsonl(run / checkpoint.METRICS)
    curve = [r for r in records if r.get("phase") == "train"]
    assert [r["step"] for r in curve] == [50, 100]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in curve)
    assert curve[0]["lr"] > curve[1]["lr"] >= 0  # the cosine ends at zero on the last step
    assert curve[-1]["loss"] < curve[0]["loss"]  # it learns
    validations = [r for r in records if "phase" not in r]  # every epoch (16 steps) and at the end
    assert validations[-1]["step"] == 100 and all("CIDEr-D" in r for r in validations)


def test_loss_ignores_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.tensor([[3, 4, 2, 0, 0], [5, 2, 0, 0, 0]])  # 0 = <pad>
    loss = caption_loss(logits, targets, pad_id=0)
    real = targets != 0
    expected = torch.nn.functional.cross_entropy(logits[real], targets[real])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[~real].abs().sum() == 0  # padded positions get no gradient
    changed = logits.detach().clone()
    changed[~real] = 100.0
    assert caption_loss(changed, targets, pad_id=0).item() == pytest.approx(loss.item(), rel=1e-6)


def test_epoch_sampler_resumes_mid_epoch_and_shards() -> None:
    full = EpochSampler(20, seed=3)
    full.set_epoch(2)
    order = list(full)
    part = EpochSampler(20, seed=3)
    part.set_epoch(2, start=8)
    assert list(part) == order[8:]
    ranks = [EpochSampler(20, seed=3, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(order)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_weights(run / checkpoint.LAST).model


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_after_n_steps_is_exact(tmp_path: Path) -> None:
    """N steps + resume for N more == 2N steps straight (same seed, CPU; a schedule that ignores the total)."""
    straight = tmp_path / "straight"
    train(tiny_train_config(max_steps=12, val_every=6, schedule="inverse_sqrt"), straight)
    halves = tmp_path / "halves"
    train(tiny_train_config(max_steps=6, val_every=6, schedule="inverse_sqrt"), halves)
    first = _weights(halves)
    train(tiny_train_config(max_steps=12, val_every=6, schedule="inverse_sqrt"), halves, resume=True)
    b = _weights(halves)
    assert any(not torch.equal(first[k], b[k]) for k in b)  # the resume really trained
    _assert_same_weights(_weights(straight), b)
    with pytest.raises(CheckpointError, match="already finished"):
        train(tiny_train_config(max_steps=12, val_every=6, schedule="inverse_sqrt"), halves, resume=True)


def test_resume_of_a_run_saved_when_best_was_ranked_by_one_number(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs saved before `best` was ranked by (accuracy, CIDEr-D) hold a float best_score: they still resume."""
    run = tmp_path / "run"
    at_step: dict[int, dict[str, torch.Tensor]] = {}  # the weights of every resumable save, by its step
    real_save = checkpoint.save_weights

    def spy(path: Path, model: torch.nn.Module, **kwargs) -> None:
        real_save(path, model, **kwargs)
        if kwargs.get("train_state") is not None:  # last.safetensors: the model as it was at that step
            at_step[kwargs["train_state"]["step"]] = checkpoint.load_weights(path).model

    monkeypatch.setattr(checkpoint, "save_weights", spy)
    # Scripted (accuracy, CIDEr-D) per validation, so the ranking has something to decide: the third wins on
    # CIDEr-D between equal accuracies, over a higher CIDEr-D at a lower accuracy, and keeps `best` when the
    # fourth only equals it.
    scripted = iter([(0.5, 2.0), (0.7, 1.0), (0.7, 1.5), (0.7, 1.5)])
    real_evaluate = evaluation.evaluate_samples

    def scored(*args, **kwargs):
        report = real_evaluate(*args, **kwargs)
        accuracy, cider = next(scripted, (0.1, 0.0))
        summary = report.summary()
        report.summary = lambda: {**summary, "accuracy": accuracy, "CIDEr-D": cider}
        return report

    monkeypatch.setattr(evaluation, "evaluate_samples", scored)
    train(tiny_train_config(max_steps=6, val_every=3), run)
    weights = checkpoint.load_weights(run / checkpoint.LAST)
    state = {**weights.train_state, "optimizer": weights.optimizer, "rng": weights.rng, "best_score": 0.5}
    model = checkpoint.load_run(run, which="last").model
    checkpoint.save_weights(run / checkpoint.LAST, model, meta=weights.meta, train_state=state)
    result = train(tiny_train_config(max_steps=9, val_every=3), run, resume=True)
    assert result.steps == 9
    # `best` is the validation record that ranks highest over the validations before and after the resume
    # (the first of equals: only a gain replaces it); the built-in world knows its truth, so accuracy ranks.
    records = checkpoint.read_jsonl(run / checkpoint.METRICS)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and {3, 6, 9} <= set(steps)
    top = max(records, key=lambda r: selection_score(r, knows_truth=True))  # max keeps the first of equals
    # The script's winner: after the resume, before the end (an epoch of 64 scenes in batches of 8 ends at step 8).
    assert top == records[2] and 6 < top["step"] < 9
    assert result.best == top
    # model.safetensors holds that record and that step's weights, which differ from the final ones.
    best = checkpoint.load_weights(run / checkpoint.BEST)
    assert best.meta == top and set(best.model) == set(at_step[top["step"]])
    for key, value in best.model.items():
        assert torch.equal(value, at_step[top["step"]][key]), key
    assert any(not torch.equal(value, at_step[9][key]) for key, value in best.model.items())


def test_resume_after_interrupt_mid_epoch_is_exact(tmp_path: Path) -> None:
    """Ctrl-C mid-epoch, then --resume: the same weights as a run never stopped (cosine schedule)."""
    cfg = tiny_train_config(max_steps=14, val_every=7, schedule="cosine")  # 8 steps per epoch
    straight = tmp_path / "straight"
    train(cfg, straight)

    def stop_at_10(kind: str, data: dict) -> None:
        if kind == "step" and data["step"] == 10:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted):
        train(cfg, stopped, on_event=stop_at_10)
    assert checkpoint.load_weights(stopped / checkpoint.LAST).train_state["step"] == 10
    train(cfg, stopped, resume=True)
    _assert_same_weights(_weights(straight), _weights(stopped))


def test_new_run_refuses_existing_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_train_config(max_steps=2, val_every=2), run)
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(tiny_train_config(max_steps=2), run)


def test_interrupt_saves_and_says_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def on_event(kind: str, data: dict) -> None:
        if kind == "step" and data["step"] == 10:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    with pytest.raises(TrainingInterrupted, match=f"--resume {run}"):
        train(tiny_train_config(max_steps=40), run, on_event=on_event)
    state = checkpoint.load_weights(run / checkpoint.LAST).train_state
    assert state["step"] == 10 and not state["finished"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    train(tiny_train_config(max_steps=4, val_every=4), run)
    good = (run / checkpoint.LAST).read_bytes()
    import captioner.training as training

    real_loss = training.caption_loss
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(training, "caption_loss", exploding)
    with pytest.raises(NonFiniteLoss, match="keeps the last good checkpoint"):
        train(tiny_train_config(max_steps=10, val_every=4), run, resume=True)
    assert (run / checkpoint.LAST).read_bytes() == good


def test_metrics_and_config_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(tiny_train_config(max_steps=6, val_every=3), run)
    records = checkpoint.read_jsonl(run / checkpoint.METRICS)
    assert [r["step"] for r in records] == [3, 6]  # validations only: the loss is logged every 50 steps
    for key in ("BLEU-4", "CIDEr-D", "accuracy", "distinct_share", "vocab_used", "mean_length"):
        assert key in records[-1]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["d_model"] == TINY_MODEL["d_model"]
    assert config["train"]["max_steps"] == 6
    assert result.steps == 6
    loaded = checkpoint.load_run(run)
    assert loaded.model.config.d_model == TINY_MODEL["d_model"]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes: trains, only rank 0 writes, the run loads."""
    run = tmp_path / "ddp"
    cfg = tiny_train_config(max_steps=4, val_every=4)
    config_file = tmp_path / "cfg.json"
    options = cfg.to_dict()
    options["model"] = options.pop("extra")
    config_file.write_text(json.dumps(options))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "captioner", "train", "--config", str(config_file), "--out", str(run), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = checkpoint.load_weights(run / checkpoint.LAST).train_state
    assert state["step"] == 4
    assert checkpoint.load_run(run).model is not None


@pytest.mark.parametrize(("native", "want"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, native: bool, want) -> None:
    from captioner import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == want
    assert runtime.resolve_precision("fp32", torch.device("cpu")) == torch.float32  # an explicit choice wins
    assert runtime.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_bf16_autocast_training_learns_on_cpu(tmp_path: Path) -> None:
    # The mixed-precision path that auto picks on CPUs with native bf16 (emulated, slower, elsewhere).
    cfg = tiny_train_config(precision="bf16", epochs=3)
    losses: list[float] = []
    train(cfg, tmp_path / "bf16", on_event=lambda kind, data: losses.append(data["loss"]) if kind == "step" else None)
    assert losses and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
