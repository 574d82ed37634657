"""The visual-concept loss: which words it asks for, its value, and that training on it teaches the encoder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from captioner.concepts import concept_loss_sum, concept_words
from captioner.config import TrainConfig
from captioner.data.vocab import Vocabulary
from captioner.errors import ConfigError
from captioner.models.captioner import CaptionModel
from captioner.training import train

from .conftest import tiny_model_config, tiny_train_config


def test_concept_words_leave_out_specials_and_words_most_images_share() -> None:
    groups = [["a dog runs", "a dog"], ["a cat sits"], ["a red car"], ["a bird"], ["a tree"]]
    vocab = Vocabulary.build([c for g in groups for c in g])
    allowed = concept_words(groups, vocab)
    assert not allowed[vocab.stoi["a"]]  # in every image: says nothing about one
    assert allowed[vocab.stoi["dog"]] and allowed[vocab.stoi["car"]]
    assert not allowed[[vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id]].any()


def test_concept_loss_is_the_cross_entropy_against_the_bag_of_caption_words() -> None:
    V, pad = 6, 0
    allowed = torch.tensor([False, True, True, True, True, False])
    targets = torch.tensor([[1, 2, 5, 0], [2, 2, 0, 0],  # image 0: words {1, 2} (5 not allowed), two captions
                            [3, 0, 0, 0], [3, 4, 0, 0]])  # image 1: words {3, 4}
    logits = torch.randn(2, V)
    logp = logits.log_softmax(-1)
    want = -(logp[0, 1] + logp[0, 2]) / 2 - (logp[1, 3] + logp[1, 4]) / 2
    assert torch.allclose(concept_loss_sum(logits, targets, allowed), want)
    assert pad == 0 and not allowed[pad]


def test_an_image_with_no_allowed_word_adds_nothing() -> None:
    allowed = torch.tensor([False, True, False])
    targets = torch.tensor([[2, 2, 0], [1, 0, 0]])  # two images, one caption each; image 0 has only word 2
    logits = torch.zeros(2, 3)
    assert math.isclose(float(concept_loss_sum(logits, targets, allowed)), math.log(3), rel_tol=1e-6)


def test_the_head_exists_only_when_the_loss_is_on() -> None:
    assert CaptionModel(tiny_model_config()).concepts is None
    cfg = tiny_train_config(concept_loss=0.5)
    model = CaptionModel(cfg.model_config(vocab_size=50))
    images, tokens = torch.randn(2, 3, 48, 48), torch.randint(4, 50, (6, 5))
    logits, concepts = model(images, tokens, with_concepts=True)
    assert logits.shape == (6, 5, 50) and concepts.shape == (2, 50)
    with pytest.raises(ConfigError, match="concept_head is set from --concept-loss"):
        TrainConfig(extra={"concept_head": True})


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_training_with_the_concept_loss_lowers_it_and_logs_it(tmp_path: Path, encoder: str) -> None:
    steps: list[dict] = []
    cfg = tiny_train_config(encoder=encoder, concept_loss=1.0, max_steps=60, val_every=60, synth_train=64)
    train(cfg, tmp_path / "run", on_event=lambda kind, data: steps.append(data) if kind == "step" else None)
    losses = [s["concept_loss"] for s in steps]
    assert len(losses) >= 2 and losses[-1] < 0.9 * losses[0]
    assert (tmp_path / "run" / "curves.png").is_file()
