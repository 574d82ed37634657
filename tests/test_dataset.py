"""CaptionDataset and collate: the caption shift, padding, truncation, per-epoch caption draws, loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.data.dataset import Batch, CaptionDataset, _mix, collate, make_loader
from captioner.data.images import Preprocess
from captioner.data.sources import Sample, load_samples
from captioner.data.vocab import Vocabulary
from captioner.errors import DataError

PRE = Preprocess(image_size=32)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return [s for s in load_samples(None, synth_train=24, synth_val=0, synth_test=0, seed=1)]


@pytest.fixture(scope="module")
def vocab(samples: list[Sample]) -> Vocabulary:
    return Vocabulary.build([c for s in samples for c in s.captions])


def test_collate_shapes_shift_and_padding(samples: list[Sample], vocab: Vocabulary) -> None:
    ds = CaptionDataset(samples, vocab, PRE, max_len=30)
    batch = collate([ds[i] for i in range(6)])
    assert isinstance(batch, Batch) and len(batch) == 6
    B, T = batch.inputs.shape
    assert batch.images.shape == (6, 3, 32, 32)
    assert batch.targets.shape == (B, T) and batch.pad_mask.shape == (B, T) and batch.lengths.shape == (B,)
    assert batch.inputs.dtype == torch.long and batch.pad_mask.dtype == torch.bool
    assert int(batch.lengths.max()) == T
    for b in range(B):
        L = int(batch.lengths[b])
        i, (j,) = ds.caption_indices(b)
        words = vocab.encode(samples[i].captions[j])
        assert len(words) + 1 == L
        assert batch.inputs[b, 0] == vocab.bos_id
        assert batch.inputs[b, 1:L].tolist() == batch.targets[b, :L - 1].tolist() == words
        assert batch.targets[b, L - 1] == vocab.eos_id
        assert not batch.pad_mask[b, :L].any() and batch.pad_mask[b, L:].all()
        assert (batch.inputs[b, L:] == vocab.pad_id).all() and (batch.targets[b, L:] == vocab.pad_id).all()
        assert batch.image_ids[b] == samples[b].image_id
    assert len(set(batch.lengths.tolist())) > 1  # the batch really needed padding
    with pytest.raises(DataError):
        collate([])


def test_truncation(samples: list[Sample], vocab: Vocabulary) -> None:
    ds = CaptionDataset(samples, vocab, PRE, max_len=3, mode="all")
    for k in range(len(ds)):
        item = ds[k]
        (inputs,), (targets,) = item.inputs, item.targets
        assert len(inputs) <= 4 and targets[-1] == vocab.eos_id
        i, (j,) = ds.caption_indices(k)
        assert inputs[1:].tolist() == vocab.encode(samples[i].captions[j])[:3]


def test_modes_and_epochs(samples: list[Sample], vocab: Vocabulary) -> None:
    all_pairs = CaptionDataset(samples, vocab, PRE, max_len=30, mode="all")
    assert len(all_pairs) == sum(len(s.captions) for s in samples)
    assert {(i, j) for i, (j,) in map(all_pairs.caption_indices, range(len(all_pairs)))} == \
        {(i, j) for i, s in enumerate(samples) for j in range(len(s.captions))}

    ds = CaptionDataset(samples, vocab, PRE, max_len=30, seed=7)
    assert len(ds) == len(samples)
    draws = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.append([ds.caption_indices(i)[1][0] for i in range(len(ds))])
    again = CaptionDataset(samples, vocab, PRE, max_len=30, seed=7)
    again.set_epoch(3)
    assert [again.caption_indices(i)[1][0] for i in range(len(ds))] == draws[3]  # deterministic in (seed, epoch)
    assert draws[0] != draws[1]  # a new caption per epoch
    assert len({d for row in draws for d in row}) == 5  # every reference gets used
    other = CaptionDataset(samples, vocab, PRE, max_len=30, seed=8)
    assert [other.caption_indices(i)[1][0] for i in range(len(ds))] != draws[0]
    with pytest.raises(DataError):
        CaptionDataset(samples, vocab, PRE, max_len=30, mode="some")


def test_several_captions_per_image_are_image_major_and_distinct(samples: list[Sample], vocab: Vocabulary) -> None:
    ds = CaptionDataset(samples, vocab, PRE, max_len=30, seed=7, captions_per_image=3)
    batch = collate([ds[i] for i in range(4)])
    assert batch.images.shape[0] == 4 and batch.inputs.shape[0] == 12 and batch.captions_per_image == 3
    for b in range(4):
        i, chosen = ds.caption_indices(b)
        assert len(set(chosen)) == 3  # distinct references while the image has enough
        for k, j in enumerate(chosen):  # rows b*3 .. b*3+2 are image b's captions, in draw order
            row, L = batch.inputs[b * 3 + k], int(batch.lengths[b * 3 + k])
            assert row[1:L].tolist() == vocab.encode(samples[i].captions[j])
    first = [ds.caption_indices(i)[1] for i in range(len(ds))]
    ds.set_epoch(1)
    assert [ds.caption_indices(i)[1] for i in range(len(ds))] != first  # drawn afresh each epoch
    # More captions asked than an image has: every one of them, then repeats.
    many = CaptionDataset(samples, vocab, PRE, max_len=30, captions_per_image=7)
    _, chosen = many.caption_indices(0)
    assert len(chosen) == 7 and set(chosen) == set(range(len(samples[0].captions)))
    with pytest.raises(DataError):
        CaptionDataset(samples, vocab, PRE, captions_per_image=0)
    with pytest.raises(DataError):
        CaptionDataset(samples, vocab, PRE, mode="all", captions_per_image=2)


def test_render_cache_and_file_samples(samples: list[Sample], vocab: Vocabulary, tmp_path: Path) -> None:
    ds = CaptionDataset(samples[:3], vocab, PRE, max_len=30)
    first = ds[0].image
    assert 0 in ds._renders
    assert torch.equal(first, ds[0].image) and torch.equal(first, PRE(samples[0].scene.render()))
    Image.new("RGB", (10, 20), (200, 10, 10)).save(tmp_path / "f.png")
    files = CaptionDataset([Sample("f", ["a red photograph"], "train", path=tmp_path / "f.png")], vocab, PRE,
                           max_len=30)
    item = files[0]
    assert item.image.shape == (3, 32, 32) and item.inputs[0][1:].tolist() == vocab.encode("a red photograph")
    assert vocab.unk_id in item.inputs[0].tolist()


def test_make_loader_seeded_and_persistent_workers_follow_set_epoch(samples: list[Sample],
                                                                    vocab: Vocabulary) -> None:
    def run(workers: int) -> list[list[tuple[str, list[int]]]]:
        ds = CaptionDataset(samples, vocab, PRE, max_len=30, seed=3)
        loader = make_loader(ds, batch_size=8, shuffle=True, workers=workers, seed=11)
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            out.append([(i, row[:n].tolist()) for b in loader
                        for i, row, n in zip(b.image_ids, b.inputs, b.lengths, strict=True)])
        return out

    inline = run(0)
    assert inline[0] != inline[1]
    assert run(0) == inline  # the shuffle is seeded
    # A persistent worker sees the new epoch through shared memory, so it draws the same captions
    # (DataLoader consumes its generator differently with persistent workers, so compare per image).
    assert [sorted(epoch) for epoch in run(1)] == [sorted(epoch) for epoch in inline]
    batch = next(iter(make_loader(CaptionDataset(samples, vocab, PRE, max_len=30), 5, False, 0, 0)))
    assert batch.images.shape == (5, 3, 32, 32)
    assert np.isfinite(batch.images.numpy()).all()


def _mix_before(*values: int) -> int:
    """The hash as it was written before (commit 7128327): the reference, so runs resume and pick the same."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(min_value=-(2**70), max_value=2**70) | st.integers(0, 10**6), max_size=5))
def test_the_item_hash_is_the_one_before(values: list[int]) -> None:
    """Each epoch's caption choice and augmentation seed come from _mix: it must stay bit for bit what it was."""
    assert _mix(*values) == _mix_before(*values)
