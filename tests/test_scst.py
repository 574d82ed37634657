"""SCST and scheduled sampling: the baselines, the teacher-forced log-probabilities, the CIDEr-D reward with
training document frequencies, a step that raises the reward, the CLI resume path, and the input mixing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from typer.testing import CliRunner

from captioner import checkpoint, metrics, scst
from captioner.cli import app
from captioner.config import SCSTConfig, TrainConfig, resolve
from captioner.data.images import Preprocess
from captioner.data.sources import load_samples
from captioner.data.vocab import Vocabulary
from captioner.decoding import SearchOptions, sample
from captioner.errors import ConfigError
from captioner.evaluation import run_samples
from captioner.metrics import CiderD, ptb_tokenize
from captioner.models.captioner import CaptionModel
from captioner.scst import advantages, scst_loss, sequence_logprobs, train_scst
from captioner.training import NonFiniteLoss, _scheduled_sampling, caption_loss, train

from .conftest import tiny_model_config, tiny_train_config


def _world(n: int, seed: int = 0) -> tuple[Vocabulary, torch.Tensor, list[list[str]]]:
    """A vocabulary over n scenes of the built-in world, their images (n, 3, 48, 48) and references."""
    samples = load_samples(None, synth_train=n, synth_val=0, synth_test=0, seed=seed)
    vocab = Vocabulary.build([c for s in samples for c in s.captions])
    preprocess = Preprocess(image_size=48)
    images = torch.stack([preprocess(s.scene.render()) for s in samples])
    return vocab, images, [s.captions for s in samples]


def _scst_options(run: Path, **options: object) -> TrainConfig:
    """The training options `captioner train --scst --resume RUN` would resolve, with `options` given."""
    saved = checkpoint.read_run_config(run)
    return resolve(cli={"device": "cpu", "precision": "fp32", **options}, model_cli={}, saved=saved, scst={}).train


def _model(vocab: Vocabulary, *, seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    return CaptionModel(tiny_model_config("vit", vocab_size=len(vocab), pad_id=vocab.pad_id))


def _sharpen(model: CaptionModel) -> CaptionModel:
    """Spread the (tied) word embeddings so an untrained model's logits differ clearly between words."""
    with torch.no_grad():
        model.decoder.embed.weight.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-entropy run of a few steps on a small slice of the world: what SCST resumes from."""
    run = tmp_path_factory.mktemp("scst") / "ce"
    train(tiny_train_config(synth_train=32, synth_val=8, synth_test=8, max_steps=4, batch_size=8), run)
    return run


# ----------------------------------------------------------------------------- baselines


def test_mean_baseline_is_leave_one_out_and_zero_mean() -> None:
    rewards = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    adv = advantages(rewards, "mean")
    B, K = rewards.shape
    expected = torch.tensor([[float(rewards[b, k] - torch.cat([rewards[b, :k], rewards[b, k + 1:]]).mean())
                              for k in range(K)] for b in range(B)])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(B), atol=1e-6, rtol=0)


def test_greedy_baseline_subtracts_the_greedy_reward() -> None:
    rewards = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    greedy_rewards = torch.tensor([0.1, 0.5, 2.0])
    torch.testing.assert_close(advantages(rewards, "greedy", greedy_rewards), rewards - greedy_rewards[:, None])
    with pytest.raises(ValueError, match="greedy"):
        advantages(rewards, "greedy")
    with pytest.raises(ConfigError, match="2 samples"):
        SCSTConfig(samples=1)
    with pytest.raises(ConfigError, match="baseline"):
        SCSTConfig(baseline="max")


# ----------------------------------------------------------------------------- log-probabilities


def test_sequence_logprobs_is_the_sum_of_the_models_token_logprobs() -> None:
    vocab, images, refs = _world(3)
    model = _sharpen(_model(vocab))
    captions = [vocab.encode(refs[0][0]), vocab.encode(refs[1][1])[:3], []]  # different lengths, one empty
    ended = [True, False, True]  # the second was cut at the length limit: no <eos> term
    got = sequence_logprobs(model, images, captions, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
                            pad_id=vocab.pad_id, ended=ended)
    for r, seq in enumerate(captions):
        memory = model.encode(images[r:r + 1]).memory  # (1, N, D)
        logits, _ = model.decode(memory, torch.tensor([[vocab.bos_id, *seq]]))  # (1, T, V)
        logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
        targets = [*seq, vocab.eos_id] if ended[r] else seq
        expected = sum(logp[t, w] for t, w in enumerate(targets))
        torch.testing.assert_close(got[r], torch.as_tensor(expected), atol=1e-4, rtol=1e-5)
    # Without `ended`, every caption counts its <eos>: the cut one gains exactly that term.
    every = sequence_logprobs(model, images, captions, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
                              pad_id=vocab.pad_id)
    torch.testing.assert_close(every[[0, 2]], got[[0, 2]])
    assert every[1] < got[1]
    got.sum().backward()  # it carries the gradient REINFORCE needs
    assert model.decoder.embed.weight.grad is not None and model.decoder.embed.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the update


class _SpyCiderD(CiderD):
    """CiderD that records how it was built and every batch it scored."""

    built: list[_SpyCiderD] = []

    def __init__(self, corpus_refs, **kwargs) -> None:
        super().__init__(corpus_refs, **kwargs)
        self.corpus = [list(r) for r in corpus_refs]
        self.calls: list[tuple[list[str], list[list[str]], list[float]]] = []
        _SpyCiderD.built.append(self)

    def batch(self, candidates, refs_list):
        out = super().batch(candidates, refs_list)
        self.calls.append((list(candidates), [list(r) for r in refs_list], out.tolist()))
        return out


def _mean_reward(model: CaptionModel, images: torch.Tensor, refs: list[list[str]], vocab: Vocabulary,
                 cider: CiderD, *, n: int) -> float:
    opts = SearchOptions(bos_id=vocab.bos_id, eos_id=vocab.eos_id, max_len=20, pad_id=vocab.pad_id,
                         unk_id=vocab.unk_id)
    drawn = sample(model, images, opts, n=n, generator=torch.Generator().manual_seed(123))
    texts = [vocab.decode(h.tokens) for per_image in drawn for h in per_image]
    return float(cider.batch(texts, [refs[i] for i, per_image in enumerate(drawn) for _ in per_image]).mean())


def test_scst_steps_raise_the_expected_reward_on_a_fixed_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab, images, refs = _world(4)
    model = _model(vocab)
    # A short cross-entropy warm start on every caption, so samples look like captions and rewards vary.
    rows = [(i, vocab.encode(c)) for i, captions in enumerate(refs) for c in captions]
    T = max(len(w) for _, w in rows) + 1
    inputs = torch.full((len(rows), T), vocab.pad_id)
    targets = torch.full((len(rows), T), vocab.pad_id)
    for r, (_, words) in enumerate(rows):
        inputs[r, : len(words) + 1] = torch.tensor([vocab.bos_id, *words])
        targets[r, : len(words) + 1] = torch.tensor([*words, vocab.eos_id])
    row_images = images[[i for i, _ in rows]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = caption_loss(model(row_images, inputs, pad_mask=inputs == vocab.pad_id), targets,
                            pad_id=vocab.pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    monkeypatch.setattr(_SpyCiderD, "built", [])
    cider = _SpyCiderD(refs)
    # 4 images x 100 samples: the mean's standard error is about 0.03; SCST gains 0.1 to 0.4 here.
    before = _mean_reward(model, images, refs, vocab, cider, n=100)
    cfg = SCSTConfig(samples=16)
    optimizer = torch.optim.AdamW(model.parameter_groups(0.0), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        loss, stats = scst_loss(model, images, refs, cider, vocab, cfg, max_len=20, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert stats["reward"] >= 0.0
    # Each image's samples (image-major) were scored against that image's references.
    expected_refs = [refs[j // cfg.samples] for j in range(len(refs) * cfg.samples)]
    assert [refs_list for _, refs_list, _ in cider.calls[1:]] == [expected_refs] * 20  # calls[0]: `before`
    after = _mean_reward(model, images, refs, vocab, cider, n=100)
    assert after > before + 0.05, (before, after)


# ----------------------------------------------------------------------------- the reward in train_scst


def test_reward_is_pycocoevalcap_cider_with_training_document_frequencies(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "CiderD", _SpyCiderD)
    monkeypatch.setattr(scst, "CiderD", _SpyCiderD, raising=False)  # in case it is ever imported at the top
    monkeypatch.setattr(_SpyCiderD, "built", [])
    steps: list[dict] = []
    cfg, scst_cfg = _scst_options(tiny_run, max_steps=2, batch_size=4, max_len=12), SCSTConfig(samples=3)
    train_scst(tiny_run, cfg, scst_cfg, out=tmp_path / "scst",
               on_event=lambda kind, data: steps.append(data) if kind == "step" else None)

    samples = run_samples(checkpoint.read_run_config(tiny_run)["train"])
    train_samples = [s for s in samples if s.split == "train"]
    refs_by_id = {s.image_id: s.captions for s in train_samples}
    assert len(_SpyCiderD.built) == 1, "document frequencies are computed once per run"
    cider = _SpyCiderD.built[0]
    assert cider.corpus == [s.captions for s in train_samples]  # the training references, not val/test
    assert len(train_samples) < len(samples)
    assert len(cider.calls) == len(steps) == 2
    for (texts, refs_list, rewards), step in zip(cider.calls, steps, strict=True):
        assert len(texts) == cfg.batch_size * scst_cfg.samples
        assert all(refs in refs_by_id.values() for refs in refs_list)  # each sample against its image's refs
        assert all(refs_list[j] == refs_list[j - j % scst_cfg.samples] for j in range(len(refs_list)))  # image-major
        assert step["reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
        assert 0.0 < step["reward_share"] < 1.0

    # pycocoevalcap's Cider over the whole training set (so its document frequencies are the same) gives
    # the same reward to each scored caption, PTB-tokenized as in the COCO pipeline (samples may hold ":").
    ids = list(refs_by_id)
    gts = {i: [ptb_tokenize(r) for r in refs_by_id[i]] for i in ids}
    texts, refs_list, rewards = cider.calls[0]
    assert max(rewards) > 0
    for text, refs, reward in zip(texts, refs_list, rewards, strict=True):
        image = next(i for i in ids if refs_by_id[i] == refs)
        res = {i: [ptb_tokenize(text) if i == image else "a shape"] for i in ids}
        _, each = Cider().compute_score(gts, res)
        assert reward == pytest.approx(each[ids.index(image)], abs=1e-6)


# ----------------------------------------------------------------------------- CLI


runner = CliRunner()


def test_cli_scst_resume_writes_a_new_run_and_keeps_the_source(tiny_run: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir()}
    out = tmp_path / "scst"
    result = runner.invoke(app, ["train", "--scst", "--resume", str(tiny_run), "--max-steps", "3",
                                 "--batch-size", "4", "--out", str(out), "--scst-samples", "3",
                                 "--scst-baseline", "greedy", "--device", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / checkpoint.CONFIG).read_text())
    options = config["scst"]  # the command line's options reached SCSTConfig and the run's TrainConfig
    assert (config["train"]["max_steps"], config["train"]["batch_size"], options["samples"], options["baseline"]) \
        == (3, 4, 3, "greedy")
    assert config["train"]["lr"] == 2e-5  # SCST's own default, not the cross-entropy run's
    assert options["from_run"] == str(tiny_run)
    loaded = checkpoint.load_run(out)
    assert loaded.vocab.to_dict() == config["vocab"]
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    records = checkpoint.read_jsonl(out / checkpoint.METRICS)
    assert records and all(r["phase"] == "scst" for r in records)
    assert records[-1]["step"] == 3
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir()} == before  # the CE run is left as it was


@pytest.mark.parametrize("args, message", [
    (["--scst"], "--resume"),
    (["--scst-samples", "3"], "only apply with --scst"),
    (["--scst", "--resume", "RUN", "--scst-samples", "1"], "at least 2 samples"),
    (["--scst", "--resume", "RUN", "--label-smoothing", "0.1", "--set", "d_model=64"],
     "--label-smoothing, --d-model: not used by --scst"),
])
def test_cli_scst_refuses_bad_options(args: list[str], message: str, tiny_run: Path) -> None:
    result = runner.invoke(app, ["train", *[str(tiny_run) if a == "RUN" else a for a in args]])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- scheduled sampling


def _teacher_forced_batch() -> tuple[CaptionModel, torch.Tensor, torch.Tensor, torch.Tensor, Vocabulary]:
    vocab, images, refs = _world(3)
    captions = [vocab.encode(refs[0][0]), vocab.encode(refs[1][0])[:4], vocab.encode(refs[2][0])[:7]]
    T = max(len(c) for c in captions) + 1
    inputs = torch.full((3, T), vocab.pad_id)
    for r, words in enumerate(captions):
        inputs[r, : len(words) + 1] = torch.tensor([vocab.bos_id, *words])
    pad_mask = inputs == vocab.pad_id
    return _sharpen(_model(vocab)), images, inputs, pad_mask, vocab


def test_scheduled_sampling_probability_zero_and_one() -> None:
    model, images, inputs, pad_mask, vocab = _teacher_forced_batch()
    original = inputs.clone()
    cpu = torch.device("cpu")
    assert torch.equal(_scheduled_sampling(model, images, inputs, pad_mask, 0.0, torch.float32, cpu), original)

    mixed = _scheduled_sampling(model, images, inputs, pad_mask, 1.0, torch.float32, cpu)
    assert torch.equal(inputs, original), "the caller's inputs are not modified"
    with torch.no_grad():
        guesses = model(images, inputs, pad_mask=pad_mask).argmax(-1)  # (B, T): the guess for position t+1
    expected = inputs.clone()
    expected[:, 1:] = torch.where(pad_mask[:, 1:], inputs[:, 1:], guesses[:, :-1])
    assert torch.equal(mixed, expected)
    assert (mixed[:, 0] == vocab.bos_id).all() and (mixed[pad_mask] == vocab.pad_id).all()
    assert (mixed != inputs).sum() > 3  # the model's guesses differ from the caption: the check has teeth


def test_scheduled_sampling_mixes_only_real_positions() -> None:
    model, images, inputs, pad_mask, vocab = _teacher_forced_batch()
    torch.manual_seed(0)
    mixed = _scheduled_sampling(model, images, inputs, pad_mask, 0.5, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        guesses = model(images, inputs, pad_mask=pad_mask).argmax(-1)
    shifted = torch.cat([inputs[:, :1], guesses[:, :-1]], dim=1)  # (B, T): the guess aligned to each input
    assert ((mixed == inputs) | (mixed == shifted)).all()
    assert torch.equal(mixed[:, 0], inputs[:, 0]) and torch.equal(mixed[pad_mask], inputs[pad_mask])
    differs = (shifted != inputs) & ~pad_mask
    replaced = (mixed != inputs).sum()
    assert 0 < replaced < differs.sum()


def test_scst_keeps_best_by_caption_accuracy_on_the_built_in_world(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranked like cross-entropy training: a validation that raises CIDEr-D but lowers accuracy is not best."""
    from captioner import evaluation

    scripted = iter([{"accuracy": 0.5, "CIDEr-D": 1.0},   # step 0: the cross-entropy weights
                     {"accuracy": 0.4, "CIDEr-D": 3.0},   # step 1: CIDEr-D up, accuracy down
                     {"accuracy": 0.6, "CIDEr-D": 0.5}])  # step 2: accuracy up

    class Report:
        def __init__(self, record: dict) -> None:
            self.record = record

        def summary(self) -> dict:
            return self.record

    monkeypatch.setattr(evaluation, "evaluate_samples", lambda *a, **k: Report(next(scripted)))
    out = tmp_path / "scst"
    cfg = _scst_options(tiny_run, max_steps=2, val_every=1, batch_size=4, max_len=8)
    result = train_scst(tiny_run, cfg, SCSTConfig(samples=2), out=out)
    assert result.best["step"] == 2 and result.last["step"] == 2
    assert checkpoint.load_weights(out / checkpoint.BEST).meta["step"] == 2
    steps = [r["step"] for r in checkpoint.read_jsonl(out / checkpoint.METRICS)]
    assert steps == [0, 1, 2]


def test_scst_stops_on_non_finite_gradients_before_the_update(tiny_run: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """SCST had no check at all: a NaN reward gradient would have been applied and saved."""
    real_loss = scst.scst_loss

    class NaNGradient(torch.autograd.Function):  # identity forward, NaN backward: a finite loss, NaN gradients
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def nan_gradients(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return NaNGradient.apply(loss), stats

    monkeypatch.setattr(scst, "scst_loss", nan_gradients)
    out = tmp_path / "scst"
    with pytest.raises(NonFiniteLoss, match="non-finite at step 1"):
        train_scst(tiny_run, _scst_options(tiny_run, max_steps=2, batch_size=4), SCSTConfig(samples=2), out=out)
    assert not (out / checkpoint.LAST).exists()  # nothing NaN was saved
    assert all(torch.isfinite(p).all() for p in checkpoint.load_run(out).model.parameters())  # best: step 0's
