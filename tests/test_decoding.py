"""Decoding: cached == naive, beam 1 == greedy, beam >= greedy, batched == one by one, sampling filters."""

from __future__ import annotations

import pytest
import torch

from captioner.decoding import SearchOptions, beam_search, filter_logits, greedy, sample
from captioner.models.captioner import CaptionModel

from .conftest import tiny_model_config
from .reference import naive_greedy

OPTS = SearchOptions(bos_id=1, eos_id=2, max_len=12, pad_id=0, unk_id=3)


def _model(encoder: str, seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    model = CaptionModel(tiny_model_config(encoder, vocab_size=24)).eval()
    # Random weights give near-uniform distributions; sharpen them so searches make real choices and
    # some captions end early (<eos>) while others run to max_len.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model


def _images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 48, 48, generator=g)


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_cached_greedy_equals_naive(encoder: str) -> None:
    model, images = _model(encoder), _images(6)
    cached = greedy(model, images, OPTS)
    naive = naive_greedy(model, images, OPTS)
    assert [h.tokens for h in cached] == [h.tokens for h in naive]
    for a, b in zip(cached, naive, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_beam_one_equals_greedy(encoder: str) -> None:
    model, images = _model(encoder), _images(6)
    g = greedy(model, images, OPTS)
    b = beam_search(model, images, OPTS, beam=1)
    assert [h.tokens for h in g] == [h.tokens for h in b]


def test_beam_never_worse_than_greedy_and_batched_equals_single() -> None:
    model, images = _model("vit", seed=2), _images(8, seed=3)
    g = greedy(model, images, OPTS)
    b = beam_search(model, images, OPTS, beam=4)
    for hg, hb in zip(g, b, strict=True):
        assert hb.logprob >= hg.logprob - 1e-4
    one_by_one = [beam_search(model, images[i:i + 1], OPTS, beam=4)[0] for i in range(len(images))]
    assert [h.tokens for h in one_by_one] == [h.tokens for h in b]
    assert [h.tokens for h in greedy(model, images[:1], OPTS)] == [g[0].tokens]


def test_beam_logprob_is_the_captions_logprob() -> None:
    """The score beam search reports is the model's own log-probability of the returned caption."""
    model, images = _model("vit", seed=4), _images(3, seed=5)
    for i, h in enumerate(beam_search(model, images, OPTS, beam=3)):
        seq = [OPTS.bos_id, *h.tokens]
        logits, _ = model.decode(model.encode(images[i:i + 1]).memory, torch.tensor([seq]))
        logits[..., [OPTS.bos_id, OPTS.pad_id, OPTS.unk_id]] = float("-inf")
        logp = torch.log_softmax(logits[0], -1)
        ended = len(h.tokens) < OPTS.max_len  # a caption cut at max_len has no <eos> to count
        targets = [*h.tokens, OPTS.eos_id] if ended else h.tokens
        expected = sum(logp[t, w].item() for t, w in enumerate(targets))
        assert h.logprob == pytest.approx(expected, abs=1e-3)


def test_specials_are_never_generated_and_no_repeat_ngram_holds() -> None:
    model, images = _model("vit", seed=6), _images(4, seed=7)
    for h in beam_search(model, images, OPTS, beam=3, no_repeat_ngram=2):
        assert not {OPTS.bos_id, OPTS.pad_id, OPTS.unk_id, OPTS.eos_id} & set(h.tokens)
        bigrams = list(zip(h.tokens, h.tokens[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))


def test_attention_weights_follow_the_caption() -> None:
    model, images = _model("vit"), _images(2)
    for h in greedy(model, images, OPTS, need_weights=True) + beam_search(model, images, OPTS, beam=2,
                                                                           need_weights=True):
        assert h.cross is not None and h.grid == (4, 4)
        T = len(h.tokens) + (1 if len(h.tokens) < OPTS.max_len else 0)
        assert h.cross.shape[0] == T  # one map per word (+ the <eos> step)
        torch.testing.assert_close(h.cross.sum(-1), torch.ones(h.cross.shape[:-1]), atol=1e-4, rtol=0)


def test_sampling_is_seeded_and_filters() -> None:
    model, images = _model("vit"), _images(2)
    a = sample(model, images, OPTS, n=3, generator=torch.Generator().manual_seed(0))
    b = sample(model, images, OPTS, n=3, generator=torch.Generator().manual_seed(0))
    assert [[h.tokens for h in row] for row in a] == [[h.tokens for h in row] for row in b]
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), -1)
    assert torch.isinf(filter_logits(logp, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logp, top_p=0.7)[0])
    assert kept.tolist() == [True, True, False, False]  # 0.64 < 0.7, so the second word is needed too
