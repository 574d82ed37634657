"""Self-critical sequence training (Rennie et al. 2017): optimise CIDEr-D directly after cross-entropy.

For each image we sample K captions, reward each with CIDEr-D against the image's references, and
subtract a baseline: the mean reward of the image's *other* samples (Luo's "new self-critical"), or the
reward of the greedy caption. REINFORCE then raises the log-probability of captions that beat the
baseline and lowers the others. Sampling runs without gradients through the cached decoder; the
sampled captions are then re-scored in one teacher-forced pass that carries the gradient.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from captioner import checkpoint
from captioner.api import search_options
from captioner.decoding import greedy, sample
from captioner.errors import ConfigError
from captioner.training import Event, TrainResult, autocast, resolve_device, resolve_precision, selection_score


@dataclass
class SCSTConfig:
    """Options of the self-critical phase."""

    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 16  # images per step; each gives `samples` captions
    samples: int = 5  # captions sampled per image (K)
    lr: float = 2e-5  # small: the model is already good, SCST only re-ranks what it can say
    baseline: str = "mean"  # "mean" of the other samples of the image, or "greedy"
    max_len: int = 30
    temperature: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    val_every: int | None = None

    def __post_init__(self) -> None:
        if self.baseline not in ("mean", "greedy"):
            raise ConfigError(f"baseline must be mean or greedy, got {self.baseline!r}")
        if self.samples < 2 and self.baseline == "mean":
            raise ConfigError("the mean baseline needs at least 2 samples per image")


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


def scst_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
              refs: list[list[str]], cider: Any, vocab: Any, cfg: SCSTConfig, *,
              generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """One REINFORCE update on a batch; returns mean reward, loss and the share of time spent on rewards."""
    B, K = images.shape[0], cfg.samples
    opts = search_options(vocab, cfg.max_len)
    t_start = time.perf_counter()
    model.eval()  # no dropout: the sampled captions and their re-scoring see the same model
    with autocast(images.device, dtype):
        drawn = sample(model, images, opts, n=K, temperature=cfg.temperature, generator=generator)
        best = greedy(model, images, opts) if cfg.baseline == "greedy" else None  # decoding, not reward time
    flat = [h for per_image in drawn for h in per_image]  # B*K, image-major
    t_reward = time.perf_counter()
    texts = [vocab.decode(h.tokens) for h in flat]
    rewards = torch.tensor(cider.batch(texts, [refs[i // K] for i in range(B * K)]),
                           dtype=torch.float32).reshape(B, K)
    greedy_rewards = None
    if best is not None:
        greedy_rewards = torch.tensor(cider.batch([vocab.decode(h.tokens) for h in best], refs),
                                      dtype=torch.float32)
    adv = advantages(rewards, cfg.baseline, greedy_rewards).to(images.device)  # (B, K)
    reward_seconds = time.perf_counter() - t_reward
    expanded = images.repeat_interleave(K, dim=0)  # (B*K, 3, S, S)
    # A caption as long as max_len was cut there: the sampler never drew its <eos>.
    ended = [len(h.tokens) < cfg.max_len for h in flat]
    with autocast(images.device, dtype):
        logp = sequence_logprobs(model, expanded, [h.tokens for h in flat], bos_id=vocab.bos_id,
                                 eos_id=vocab.eos_id, pad_id=vocab.pad_id, ended=ended)  # (B*K,)
    loss = -(adv.reshape(-1) * logp).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    loss_value = loss.item()  # waits for the update on a GPU, so `total` covers all of the step
    total = time.perf_counter() - t_start
    return {"reward": float(rewards.mean()), "loss": loss_value, "reward_share": reward_seconds / total,
            "seconds": total}


def train_scst(run_dir: Path | str, cfg: SCSTConfig, *, out: Path | None = None,
               on_event: Event | None = None) -> TrainResult:
    """Fine-tune a cross-entropy run with SCST into `out` (default: `<run_dir>-scst`)."""
    from captioner.data.dataset import CaptionDataset, make_loader
    from captioner.evaluation import evaluate_samples, knows_truth, run_samples
    from captioner.metrics import CiderD

    emit = on_event or (lambda kind, data: None)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir.with_name(run_dir.name + "-scst")
    if out.resolve() == run_dir.resolve():
        raise ConfigError("--out must differ from the cross-entropy run, which SCST keeps as it is")
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    loaded = checkpoint.load_run(run_dir, which="best", device=str(device))
    model, vocab, preprocess = loaded.model, loaded.vocab, loaded.preprocess
    train_options = loaded.config.get("train", {})
    samples = run_samples(train_options)
    synthetic = train_options.get("data") is None
    train_samples = [s for s in samples if s.split == "train"]
    val_samples = [s for s in samples if s.split == "val"] or [s for s in samples if s.split == "test"]
    # `best` is ranked as cross-entropy training ranks it: caption accuracy first where the scenes know
    # their truth (SCST can raise CIDEr-D while making more false claims), CIDEr-D on a dataset.
    ranks_by_accuracy = knows_truth(val_samples)
    # Document frequencies come from the training references, computed once.
    cider = CiderD([s.captions for s in train_samples])
    refs_by_id = {s.image_id: s.captions for s in train_samples}

    out.mkdir(parents=True, exist_ok=True)
    config = dict(loaded.config)
    config["scst"] = {**asdict(cfg), "from_run": str(run_dir)}
    checkpoint.write_json(out / checkpoint.CONFIG, config)
    # Start `best` at the cross-entropy weights: SCST keeps them unless its validation ranks higher.
    checkpoint.save_weights(out / checkpoint.BEST, model, meta={"step": 0, "phase": "cross-entropy"})

    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    dataset = CaptionDataset(train_samples, vocab, preprocess, max_len=cfg.max_len, mode="random", seed=cfg.seed)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, workers=0, seed=cfg.seed, drop_last=True)
    total = cfg.max_steps or cfg.epochs * len(loader)
    optimizer = torch.optim.AdamW(model.parameter_groups(0.0), lr=cfg.lr)

    def validate(step: int) -> dict[str, Any]:
        report = evaluate_samples(model, val_samples, vocab, preprocess, device=device, max_len=cfg.max_len,
                                  java=False, synthetic=synthetic)
        record = {"step": step, "phase": "scst", **report.summary()}
        checkpoint.append_jsonl(out / checkpoint.METRICS, record)
        emit("validate", record)
        return record

    best = validate(0)
    best_score = selection_score(best, ranks_by_accuracy)
    emit("start", {"run_dir": str(out), "device": str(device), "precision": str(dtype).replace("torch.", ""),
                   "steps": total, "start_step": 0, "parameters": sum(p.numel() for p in model.parameters()),
                   "train_images": len(dataset), "val_images": len(val_samples), "world": 1,
                   "model": model.config.to_dict()})
    t0 = time.perf_counter()
    step, epoch, last = 0, 0, best
    reward_share: list[float] = []
    while step < total:
        dataset.set_epoch(epoch)
        for batch in loader:
            images = batch.images.to(device)
            refs = [refs_by_id[i] for i in batch.image_ids]
            stats = scst_step(model, optimizer, images, refs, cider, vocab, cfg, generator=generator, dtype=dtype)
            reward_share.append(stats["reward_share"])
            step += 1
            emit("step", {"step": step, "total": total, "epoch": epoch, "loss": stats["loss"], "lr": cfg.lr,
                          "reward": stats["reward"], "images_per_s": images.shape[0] / stats["seconds"]})
            if (cfg.val_every and step % cfg.val_every == 0) or step >= total:
                last = validate(step)
                score = selection_score(last, ranks_by_accuracy)
                if score > best_score:
                    best, best_score = last, score
                    checkpoint.save_weights(out / checkpoint.BEST, model, meta=last)
            if step >= total:
                break
        epoch += 1
    checkpoint.save_weights(out / checkpoint.LAST, model, meta={"step": step, "phase": "scst"})
    seconds = time.perf_counter() - t0
    share = sum(reward_share) / max(len(reward_share), 1)
    best = {**best, "reward_share": round(share, 4)}
    emit("end", {"run_dir": str(out), "steps": step, "seconds": seconds, "best": best, "last": last})
    return TrainResult(out, step, epoch, seconds, best, last)
