"""The frozen-feature cache: the backbone split, parity of cached and fresh features, reuse, and every rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import feature_cache
from captioner.data.dataset import CaptionDataset, collate
from captioner.data.images import Preprocess, train_transform
from captioner.data.sources import Sample
from captioner.data.vocab import Vocabulary
from captioner.errors import ConfigError, DataError
from captioner.models.captioner import CaptionModel
from captioner.models.encoders import CNNEncoder
from tests.conftest import tiny_model_config

S = 64  # a ResNet-18 cut after layer3 (stride 16) gives a 4 x 4 grid of 256 channels
N = 10
PRE = Preprocess(S)
FP16 = dict(rtol=2e-3, atol=2e-3)  # float16 rounding of the stored features


def resnet_weights(path: Path, seed: int) -> Path:
    """A random ResNet-18 state dict in a local file (never a download)."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():  # non-trivial BatchNorm statistics, so eval mode is really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return path


def frozen_model(weights: Path) -> CaptionModel:
    cfg = tiny_model_config("cnn", cnn_arch="resnet18", image_size=S, backbone_weights=str(weights),
                            freeze_backbone=True)
    torch.manual_seed(0)
    return CaptionModel(cfg).eval()


def write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """Image files with captions, a frozen ResNet-18 captioner, and a cache folder of its own."""
    (tmp_path / "img").mkdir()
    samples = []
    for i in range(N):
        path = tmp_path / "img" / f"{i}.png"
        write_image(path, i)
        samples.append(Sample(f"im{i}", [f"a red square number {i}", f"a blue circle {i} here"], "train", path))
    vocab = Vocabulary.build([c for s in samples for c in s.captions])
    return {"samples": samples, "vocab": vocab, "cache": tmp_path / "cache", "tmp": tmp_path,
            "model": frozen_model(resnet_weights(tmp_path / "r18.pt", seed=1)),
            "dataset": CaptionDataset(samples, vocab, PRE, captions_per_image=2)}


@pytest.fixture
def backbone_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every call of the CNN's backbone, as the number of images it was given."""
    calls: list[int] = []
    real = CNNEncoder.backbone_features

    def counting(self: CNNEncoder, images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        return real(self, images)

    monkeypatch.setattr(CNNEncoder, "backbone_features", counting)
    return calls


def cache(world: dict, model: CaptionModel | None = None, **kw) -> feature_cache.FeatureDataset:
    return feature_cache.cached_dataset(model or world["model"], world["dataset"], PRE, cache_dir=world["cache"],
                                        batch_size=4, workers=0, **kw)


def fresh(model: CaptionModel, samples: list[Sample]) -> torch.Tensor:
    """The backbone's features of the samples' images, computed now: (N, C, h, w)."""
    images = torch.stack([PRE(Image.open(s.path)) for s in samples])
    with torch.no_grad():
        return model.encoder.backbone_features(images)


def rows(store: feature_cache.FeatureStore) -> torch.Tensor:
    return torch.stack([store[r] for r in range(len(store))])


@pytest.mark.parametrize("backbone", ["resnet18", "vit_b_16"])
def test_forward_is_backbone_then_the_rest(backbone: str) -> None:
    extra = dict(cnn_arch=backbone) if backbone.startswith("resnet") else dict(encoder="vit", vit_backbone=backbone)
    cfg = tiny_model_config(extra.pop("encoder", "cnn"), image_size=32, freeze_backbone=True, **extra)
    model = CaptionModel(cfg).eval()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(4, 40, (4, 5))
    with torch.no_grad():
        features = model.encoder.backbone_features(images)  # (B, C, h, w)
        assert features.dim() == 4 and features.shape[0] == 2
        whole, split = model.encoder(images), model.encoder.from_backbone(features)
        torch.testing.assert_close(split.memory, whole.memory)
        assert split.grid == whole.grid == tuple(features.shape[-2:])
        torch.testing.assert_close(model(features, tokens, from_features=True), model(images, tokens))


def test_cached_features_equal_fresh_ones(world: dict) -> None:
    progress: list[tuple[int, int]] = []
    ds = cache(world, on_progress=lambda done, total: progress.append((done, total)))
    assert ds.store.rebuilt == "not built yet"
    assert progress[0] == (0, N) and progress[-1] == (N, N)
    got = rows(ds.store)
    assert got.dtype == torch.float16 and got.shape == (N, 256, 4, 4)
    torch.testing.assert_close(got.float(), fresh(world["model"], world["samples"]), **FP16)


def test_teacher_forced_logits_from_features_match_images(world: dict) -> None:
    model, ds = world["model"], cache(world)
    for epoch in (0, 3):  # the same captions at every position, epoch after epoch
        ds.set_epoch(epoch)
        assert world["dataset"].epoch == epoch
        from_images = collate([world["dataset"][i] for i in range(N)])
        from_cache = collate([ds[i] for i in range(N)])
        assert from_cache.holds_features and not from_images.holds_features
        assert torch.equal(from_cache.inputs, from_images.inputs) and from_cache.image_ids == from_images.image_ids
        with torch.no_grad():
            want = model(from_images.images, from_images.inputs, pad_mask=from_images.pad_mask)
            got = model(from_cache.images, from_cache.inputs, pad_mask=from_cache.pad_mask,
                        from_features=from_cache.holds_features)
        torch.testing.assert_close(got, want, **FP16)
        assert abs(got - want).max() < 0.05 * want.std()  # far below the logits' own spread


def test_the_cache_ignores_augmentation(world: dict) -> None:
    augmented = CaptionDataset(world["samples"], world["vocab"], train_transform(PRE))
    ds = feature_cache.cached_dataset(world["model"], augmented, PRE, cache_dir=world["cache"], workers=0)
    torch.testing.assert_close(ds[0].image.float(), fresh(world["model"], world["samples"][:1])[0], **FP16)


def test_second_use_runs_no_backbone(world: dict, backbone_calls: list[int]) -> None:
    first = rows(cache(world).store)
    assert sum(backbone_calls) == 1 + N  # a blank image for the row shape, then every image once
    backbone_calls.clear()
    progress: list[tuple[int, int]] = []
    again = cache(world, model=frozen_model(world["tmp"] / "r18.pt"),  # a later run: a new model, same weights
                  on_progress=lambda done, total: progress.append((done, total)))
    items = [again[i] for i in range(N)]
    assert backbone_calls == [] and progress == [] and again.store.rebuilt is None
    assert torch.equal(torch.stack([it.image for it in items]), first)


def test_a_changed_image_recomputes_its_row_only(world: dict, backbone_calls: list[int]) -> None:
    before = rows(cache(world).store)
    write_image(world["samples"][3].path, seed=99)
    backbone_calls.clear()
    store = cache(world).store
    assert "1 images changed" in store.rebuilt and sum(backbone_calls) == 1 + 1
    after = rows(store)
    torch.testing.assert_close(after[3].float(), fresh(world["model"], world["samples"][3:4])[0], **FP16)
    assert not torch.allclose(after[3], before[3])
    assert torch.equal(after[torch.arange(N) != 3], before[torch.arange(N) != 3])


def test_other_weights_rebuild(world: dict, backbone_calls: list[int]) -> None:
    before = rows(cache(world).store)
    other = frozen_model(resnet_weights(world["tmp"] / "other.pt", seed=2))
    backbone_calls.clear()
    store = cache(world, model=other).store
    assert "weights changed" in store.rebuilt and sum(backbone_calls) == 1 + N
    torch.testing.assert_close(rows(store).float(), fresh(other, world["samples"]), **FP16)
    assert not torch.allclose(rows(store), before)
    assert len(list(world["cache"].iterdir())) == 2  # replaced, not kept beside: one .bin, one .json


def damage_truncate(bin_path: Path) -> None:
    with open(bin_path, "rb+") as f:
        f.truncate(bin_path.stat().st_size - 100)


def damage_index(bin_path: Path) -> None:
    index_path = bin_path.with_suffix(".json")
    index = json.loads(index_path.read_text())
    index["crc32"][5] += 1  # still well-formed JSON, still the right fields: only the digest notices
    index_path.write_text(json.dumps(index))


def damage_first_row(bin_path: Path) -> None:
    with open(bin_path, "rb+") as f:
        f.seek(feature_cache.HEADER + 10)
        f.write(b"\x12\x34")


def damage_swap_data(bin_path: Path) -> None:
    """Another build's data file under this index (as a crash between the two moves would leave)."""
    data = bytearray(bin_path.read_bytes())
    data[len(feature_cache.MAGIC)] ^= 1  # another build id
    bin_path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [(damage_truncate, "truncated"), (damage_index, "index was edited"),
                                            (damage_first_row, "checksum"),
                                            (damage_swap_data, "not the one its index describes")])
def test_a_damaged_cache_is_rebuilt(world: dict, backbone_calls: list[int], damage, reason: str) -> None:
    before = rows(cache(world).store)
    (bin_path,) = world["cache"].glob("*.bin")
    damage(bin_path)
    backbone_calls.clear()
    store = cache(world).store
    assert reason in store.rebuilt and sum(backbone_calls) >= 1 + 1
    # The same computation; a row recomputed in a batch of another size may round differently in the last bit.
    torch.testing.assert_close(rows(store).float(), before.float(), **FP16)
    assert cache(world).store.rebuilt is None  # and now it is used as found


def test_a_damaged_row_is_never_served(world: dict) -> None:
    """A row the cheap checks on open do not sample is still checked when it is read."""
    store = cache(world).store
    spot = {round(i * (N - 1) / (feature_cache.SPOT_CHECKS - 1)) for i in range(feature_cache.SPOT_CHECKS)}
    (r,) = sorted(set(range(N)) - spot)[:1]
    with open(store.path, "rb+") as f:
        f.seek(feature_cache.HEADER + r * store[0].numel() * 2 + 6)
        f.write(b"\x00\x7c")  # +inf in float16
    ds = cache(world)
    assert ds.store.rebuilt is None
    with pytest.raises(DataError, match="does not match its checksum"):
        ds[r]


def test_refuses_a_backbone_that_trains(world: dict) -> None:
    trains = CaptionModel(tiny_model_config("cnn", cnn_arch="resnet18", image_size=S))
    with pytest.raises(ConfigError, match="frozen torchvision backbone"):
        cache(world, model=trains)
    ours = CaptionModel(tiny_model_config("vit", image_size=48))
    with pytest.raises(ConfigError, match="frozen torchvision backbone"):
        cache(world, model=ours)


def test_default_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert feature_cache.default_cache_dir() == tmp_path / "captioner" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert feature_cache.default_cache_dir() == Path.home() / ".cache" / "captioner" / "features"


def test_training_with_a_frozen_backbone_uses_the_cache_across_runs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --freeze-backbone` on a dataset: the first run builds the cache, a second run's steps never run the
    backbone; --no-feature-cache recomputes it (with augmentation) at every step."""
    from captioner.data.synthetic import write_synthetic
    from captioner.training import train
    from tests.conftest import TINY_MODEL, tiny_train_config

    data = write_synthetic(tmp_path / "data", 16, image_size=S)  # one split (train): no validation decoding
    weights = resnet_weights(tmp_path / "resnet18.pth", seed=1)
    cnn = {k: v for k, v in TINY_MODEL.items() if k not in ("patch_size", "vit_stem")}
    model = {**cnn, "image_size": S, "cnn_arch": "resnet18", "backbone_weights": str(weights),
             "freeze_backbone": True}
    calls = {"n": 0}
    real = CNNEncoder.backbone_features

    def counted(self, images):
        calls["n"] += images.shape[0]
        return real(self, images)

    monkeypatch.setattr(CNNEncoder, "backbone_features", counted)

    def run(name: str, **options) -> list[str]:
        notes: list[str] = []
        cfg = tiny_train_config(data=str(data), encoder="cnn", extra=model, max_steps=2, batch_size=8, **options)
        train(cfg, tmp_path / name, on_event=lambda kind, d: notes.append(d["message"]) if kind == "note" else None)
        return notes

    first = run("first")
    assert calls["n"] == 16 + 1 and any("feature cache built" in n for n in first)  # each image once (+ a shape probe)
    calls["n"] = 0
    second = run("second")
    assert calls["n"] == 0 and not any("feature cache built" in n for n in second)
    run("recomputing", feature_cache=False)
    assert calls["n"] == 2 * 8  # two steps of 8 images through the backbone
