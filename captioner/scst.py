"""Self-critical sequence training (Rennie et al. 2017): optimise CIDEr-D directly after cross-entropy.

For each image we sample K captions, reward each with CIDEr-D against the image's references, and
subtract a baseline: the mean reward of the image's *other* samples (Luo's "new self-critical"), or the
reward of the greedy caption. REINFORCE then raises the log-probability of captions that beat the
baseline and lowers the others. Sampling runs without gradients through the cached decoder; the
sampled captions are then re-scored in one teacher-forced pass that carries the gradient.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from captioner import checkpoint, metrics, training
from captioner.config import SCSTConfig, TrainConfig
from captioner.data.dataset import Batch
from captioner.decoding import fixed_caches_pay, greedy, sample, search_options
from captioner.errors import ConfigError
from captioner.runtime import Dist, autocast, precision_plan, resolve_device


def advantages(rewards: torch.Tensor, baseline: str = "mean", greedy_rewards: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Rewards (B, K) minus the baseline: the mean of the other K-1 samples, or the greedy reward (B,)."""
    B, K = rewards.shape
    if baseline == "mean":
        others = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)  # (B, K) leave-one-out mean
        return rewards - others
    if greedy_rewards is None:
        raise ValueError("the greedy baseline needs the greedy captions' rewards")
    return rewards - greedy_rewards[:, None]


def sequence_logprobs(model: torch.nn.Module, images: torch.Tensor, tokens: list[list[int]], *, bos_id: int,
                      eos_id: int, pad_id: int, ended: list[bool] | None = None) -> torch.Tensor:
    """Sum of log p(token) over each caption and its <eos>, with gradient, in one teacher-forced pass.

    images (R, 3, S, S) and R captions (token ids, no specials) -> (R,) log-probabilities. `ended[r]` False
    marks a caption cut at the length limit: it never drew <eos>, so that term is left out (counting it
    would teach a long caption with a low reward to end later still).
    """
    R = len(tokens)
    T = max(len(t) for t in tokens) + 1
    inputs = torch.full((R, T), pad_id, dtype=torch.long, device=images.device)
    targets = torch.full((R, T), pad_id, dtype=torch.long, device=images.device)
    for r, seq in enumerate(tokens):
        inputs[r, : len(seq) + 1] = torch.tensor([bos_id, *seq], device=images.device)
        targets[r, : len(seq) + 1] = torch.tensor([*seq, eos_id], device=images.device)
        if ended is not None and not ended[r]:
            targets[r, len(seq)] = pad_id  # no <eos> was drawn after the last word
    pad_mask = inputs == pad_id
    pad_mask[:, 0] = False  # <bos> is never padding (pad_id != bos_id, but be explicit)
    logits = model(images, inputs, pad_mask=pad_mask)  # (R, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # (R, T)
    return (logp * (targets != pad_id)).sum(dim=1)


def scst_loss(model: torch.nn.Module, images: torch.Tensor, refs: list[list[str]], cider: Any, vocab: Any,
              scst: SCSTConfig, *, max_len: int, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, float]]:
    """The REINFORCE loss of a batch (with gradient) and its statistics: mean reward, share of time on rewards."""
    B, K = images.shape[0], scst.samples
    opts = search_options(vocab, max_len)
    t_start = time.perf_counter()
    model.eval()  # no dropout: the sampled captions and their re-scoring see the same model
    static = fixed_caches_pay(images.device)
    with autocast(images.device, dtype):
        drawn = sample(model, images, opts, n=K, temperature=scst.temperature, generator=generator, static=static)
        best = greedy(model, images, opts, static=static) if scst.baseline == "greedy" else None  # not reward time
    flat = [h for per_image in drawn for h in per_image]  # B*K, image-major
    t_reward = time.perf_counter()
    rewards = torch.tensor(cider.batch([vocab.decode(h.tokens) for h in flat], [refs[i // K] for i in range(B * K)]),
                           dtype=torch.float32).reshape(B, K)
    greedy_rewards = None
    if best is not None:
        greedy_rewards = torch.tensor(cider.batch([vocab.decode(h.tokens) for h in best], refs), dtype=torch.float32)
    adv = advantages(rewards, scst.baseline, greedy_rewards).to(images.device)  # (B, K)
    reward_seconds = time.perf_counter() - t_reward
    expanded = images.repeat_interleave(K, dim=0)  # (B*K, 3, S, S)
    ended = [len(h.tokens) < max_len for h in flat]  # a caption as long as max_len never drew its <eos>
    with autocast(images.device, dtype):
        logp = sequence_logprobs(model, expanded, [h.tokens for h in flat], bos_id=vocab.bos_id,
                                 eos_id=vocab.eos_id, pad_id=vocab.pad_id, ended=ended)  # (B*K,)
    loss = -(adv.reshape(-1) * logp).mean()
    return loss, {"reward": float(rewards.mean()), "reward_seconds": reward_seconds,
                  "started": t_start}


def scst_step_fn(scst: SCSTConfig, cider: Any, refs_by_id: dict[str, list[str]], generator: torch.Generator,
                 shares: list[float]) -> training.StepFn:
    """The SCST step for `training.fit`: sample, reward, and one update through the shared gradient path.

    Each step's share of time spent on rewards is appended to `shares` as well as reported.
    """
    def step(run: training.Run, group: list[Batch]) -> dict[str, Any]:
        (batch,) = group  # SCST steps on one batch: its options leave --accumulate at 1
        images = batch.images.to(run.device)
        refs = [refs_by_id[i] for i in batch.image_ids]
        loss, stats = scst_loss(run.model, images, refs, cider, run.data.vocab, scst, max_len=run.cfg.max_len,
                                generator=generator, dtype=run.precision.train_autocast)
        training.apply_gradients(run, loss)
        loss_value = loss.item()  # waits for the update on a GPU, so the share covers all of the step
        shares.append(stats["reward_seconds"] / (time.perf_counter() - stats["started"]))
        return {"loss": loss_value, "reward": stats["reward"], "reward_share": shares[-1], "images": images.shape[0]}

    return step


def train_scst(source: Path | str, cfg: TrainConfig, scst: SCSTConfig, *, out: Path | None = None,
               on_event: training.Event | None = None) -> training.TrainResult:
    """Fine-tune a cross-entropy run with SCST into `out` (default: `<source>-scst`), leaving the source as it is."""
    run = prepare_scst(source, cfg, scst, out=out, on_event=on_event)
    train_samples = run.data.train_set.samples
    # Document frequencies come from the training references, computed once.
    cider = metrics.CiderD([s.captions for s in train_samples])
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
    shares: list[float] = []
    step = scst_step_fn(scst, cider, {s.image_id: s.captions for s in train_samples}, generator, shares)
    training.validate(run)  # step 0: the cross-entropy weights, which stay `best` unless SCST beats them
    result = training.fit(run, step)
    result.best = {**result.best, "reward_share": round(sum(shares) / max(len(shares), 1), 4)}
    return result


def prepare_scst(source: Path | str, cfg: TrainConfig, scst: SCSTConfig, *, out: Path | None = None,
                 on_event: training.Event | None = None) -> training.Run:
    """A run state for SCST in `out`: the source run's best weights, data and vocabulary; a constant learning rate."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--scst runs in one process; start it without torchrun")
    started = time.perf_counter()
    source = Path(source)
    out = Path(out) if out is not None else source.with_name(source.name + "-scst")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ConfigError("--out must lie outside the cross-entropy run, which SCST keeps as it is")
    lock = checkpoint.claim_fresh_run_dir(out)  # refuses a folder that is not empty, leaving it as it was
    try:
        device = resolve_device(cfg.device)
        loaded = checkpoint.load_run(source, which="best", device=str(device))
        emit = on_event or (lambda kind, data: None)
        torch.manual_seed(cfg.seed)
        data = training.load_data(cfg, loaded.config, emit)
        sampler, loader, steps_per_epoch = training.batches(cfg, data.train_set, Dist(), device)
        optimizer = training.make_optimizer(loaded.model, cfg)
        run = training.Run(cfg, out, data, loaded.model, optimizer, Dist(), device,
                           precision_plan(cfg.precision, device), sampler, loader, steps_per_epoch,
                           cfg.resolved_steps(steps_per_epoch), emit, started,
                           record_tags={"phase": "scst"}, log_every=1)  # SCST steps take seconds: report each
        run.lock = lock  # held until the run ends
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)  # constant: no warm-up, no decay
        training.write_config(run, scst={**scst.to_dict(), "from_run": str(source)})
        training.wrap_for_training(run)
    except BaseException:
        lock.close()
        raise
    return run
