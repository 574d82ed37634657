"""The model: shapes, causality, padding, cache == full pass, gradients, overfitting, pretrained loading,
freezing and config round-trips, for both encoders."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
import torchvision

from captioner.config import PRESETS, ModelConfig, preset
from captioner.errors import ConfigError
from captioner.models import encoders
from captioner.models.attention import MultiHeadAttention
from captioner.models.captioner import CaptionModel
from captioner.models.encoders import CNNEncoder, TorchvisionViTEncoder, ViTEncoder
from captioner.models.kernels import Kernels
from captioner.models.positional import sinusoidal_2d

from .conftest import tiny_model_config

ENCODERS = ["vit", "cnn"]
V = 40


def _model(encoder: str, **overrides: object) -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel(tiny_model_config(encoder, vocab_size=V, **overrides))


def _images(n: int, size: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tokens(B: int, T: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))  # never the pad id 0


# ------------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize(("encoder", "size", "grid"), [
    ("vit", 48, (4, 4)), ("vit", 36, (3, 3)), ("vit", 96, (8, 8)),
    ("cnn", 48, (3, 3)), ("cnn", 32, (2, 2)), ("cnn", 80, (5, 5)),
])
def test_shapes_at_several_image_sizes(encoder: str, size: int, grid: tuple[int, int]) -> None:
    model = _model(encoder).eval()  # trained size is 48; the others must work too
    with torch.no_grad():
        encoded = model.encode(_images(2, size))
        logits = model(_images(2, size), _tokens(2, 5))
    assert encoded.grid == grid
    assert encoded.memory.shape == (2, grid[0] * grid[1], 32)
    assert logits.shape == (2, 5, V)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name: str, encoder: str) -> None:
    # Small images keep the big presets fast; the parameter shapes do not depend on the image size.
    size = 2 * PRESETS[name].get("patch_size", ModelConfig.patch_size)
    config = preset(name, encoder=encoder, vocab_size=50, image_size=size)
    model = CaptionModel(config).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size), torch.ones(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 50)
    assert len(model.decoder.layers) == config.n_layers


def test_default_cnn_grid_is_six_by_six() -> None:
    encoder = CNNEncoder(ModelConfig(encoder="cnn", d_model=32, n_heads=2)).eval()
    with torch.no_grad():
        encoded = encoder(torch.randn(1, 3, 96, 96))
    assert encoded.grid == (6, 6) and encoded.memory.shape == (1, 36, 32)
    assert [name for name, _ in encoder.backbone.named_children()] == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]


def test_cnn_stride_32_keeps_layer4() -> None:
    encoder = CNNEncoder(tiny_model_config("cnn", cnn_stride=32, image_size=64)).eval()
    with torch.no_grad():
        encoded = encoder(torch.randn(1, 3, 64, 64))
    assert encoded.grid == (2, 2) and hasattr(encoder.backbone, "layer4")


@pytest.mark.parametrize(("stride", "grid"), [(16, (6, 6)), (32, (3, 3))])
def test_small_resnet_gives_the_same_grid_as_torchvisions(stride: int, grid: tuple[int, int]) -> None:
    config = ModelConfig(encoder="cnn", cnn_arch="resnet_small", cnn_stride=stride, d_model=32, n_heads=2)
    encoder = CNNEncoder(config).eval()
    with torch.no_grad():
        encoded = encoder(torch.randn(2, 3, 96, 96))
    assert encoded.grid == grid and encoded.memory.shape == (2, grid[0] * grid[1], 32)
    assert sum(p.numel() for p in encoder.backbone.parameters()) < 2_000_000  # a fraction of ResNet-18's 11M
    assert [name for name, _ in encoder.backbone.named_children()][:3] == ["conv1", "bn1", "relu"]


def test_small_resnet_has_no_imagenet_weights_to_find() -> None:
    with pytest.raises(ConfigError, match="resnet_small has no ImageNet weights"):
        CNNEncoder(ModelConfig(encoder="cnn", cnn_arch="resnet_small", pretrained=True))


def test_small_resnet_loads_its_own_weight_file(tmp_path) -> None:
    config = tiny_model_config("cnn", cnn_arch="resnet_small")
    source = CNNEncoder(config)
    path = tmp_path / "small.pt"
    torch.save(source.backbone.state_dict(), path)
    loaded = CNNEncoder(tiny_model_config("cnn", cnn_arch="resnet_small", backbone_weights=str(path)))
    for (name, a), b in zip(source.backbone.state_dict().items(), loaded.backbone.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_conv_stem_keeps_the_patch_grid() -> None:
    linear, conv = _model("vit", vit_stem="linear").eval(), _model("vit", vit_stem="conv").eval()
    with torch.no_grad():
        a, b = linear.encode(_images(2)), conv.encode(_images(2))
    assert a.grid == b.grid == (4, 4) and a.memory.shape == b.memory.shape
    assert isinstance(conv.encoder.to_patch_embedding, torch.nn.Sequential)
    stem = conv.encoder.to_patch_embedding
    assert stem[-1].kernel_size == stem[-1].stride == (3, 3)  # 12 px patches = 4x (stem) * 3x3 cells
    with pytest.raises(ConfigError, match="multiple of 4"):
        tiny_model_config("vit", vit_stem="conv", patch_size=6)


def test_hybrid_stem_cuts_patches_from_a_cnn_feature_map() -> None:
    model = _model("vit", vit_stem="resnet", patch_size=16).eval()  # 48 px images: a 3x3 grid of 16 px patches
    with torch.no_grad():
        encoded = model.encode(_images(2))
    assert encoded.grid == (3, 3) and encoded.memory.shape == (2, 9, 32)
    cnn, patches = model.encoder.to_patch_embedding
    assert cnn(torch.randn(1, 3, 48, 48)).shape == (1, 128, 3, 3)  # stride 16, 128 channels
    assert patches.kernel_size == patches.stride == (1, 1)  # one cell of the feature map per patch
    with pytest.raises(ConfigError, match="multiple of 16"):
        tiny_model_config("vit", vit_stem="resnet", patch_size=12)


def test_cnn_regions_are_row_major() -> None:
    encoder = CNNEncoder(tiny_model_config("cnn")).eval()
    with torch.no_grad():
        features = encoder.backbone(_images(1))[0]  # (C, 3, 3)
        content = encoder(_images(1)).memory[0] - sinusoidal_2d(3, 3, 32)  # (9, D) without positions
        for row in range(3):
            for col in range(3):  # region (row, col) sits at index row*w + col
                want = encoder.norm(encoder.proj(features[:, row, col]))
                torch.testing.assert_close(content[row * 3 + col], want, atol=1e-5, rtol=1e-5)


def test_vit_learned_positions_resize_to_other_grids() -> None:
    model = _model("vit", vit_pos="learned", cls_token=True).eval()
    vit = model.encoder
    torch.testing.assert_close(vit.positions(4, 4, torch.zeros(1)), vit.pos_embedding)  # training grid: as is
    with torch.no_grad():
        encoded = model.encode(_images(2, 72))
    assert encoded.grid == (6, 6) and encoded.memory.shape == (2, 36, 32)


def test_vit_attention_weights_for_rollout() -> None:
    model = _model("vit", cls_token=True, enc_layers=2).eval()
    with torch.no_grad():
        encoded = model.encode(_images(3), need_weights=True)
        plain = model.encode(_images(3))
    assert plain.attn is None and encoded.memory.shape == (3, 16, 32)  # CLS dropped from the memory
    assert len(encoded.attn) == 2
    for weights in encoded.attn:
        assert weights.shape == (3, 2, 17, 17)  # ... but kept in the weights
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 17))
    torch.testing.assert_close(encoded.memory, plain.memory, atol=1e-5, rtol=1e-5)  # both paths agree


def test_bad_inputs_are_refused_clearly() -> None:
    model = _model("vit")
    with pytest.raises(AssertionError, match=r"images \(B, 3, H, W\)"):
        model.encode(torch.randn(2, 48, 48))
    with pytest.raises(AssertionError, match="multiple of the patch size"):
        model.encode(torch.randn(1, 3, 50, 50))
    with pytest.raises(AssertionError, match="torch.long"):
        model(_images(1), torch.ones(1, 3))


# ------------------------------------------------------------------------------------------------
# Decoder semantics


@pytest.mark.parametrize("encoder", ENCODERS)
def test_causality(encoder: str) -> None:
    model = _model(encoder).eval()
    images, tokens = _images(2), _tokens(2, 8)
    with torch.no_grad():
        logits = model(images, tokens)
        for t in range(7):
            changed = tokens.clone()
            changed[:, t + 1:] = _tokens(2, 7 - t, seed=10 + t)
            other = model(images, changed)
            torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(other[:, t + 1], logits[:, t + 1])  # the changed position does move


@pytest.mark.parametrize("encoder", ENCODERS)
def test_padding_does_not_change_real_positions(encoder: str) -> None:
    model = _model(encoder).eval()
    images, tokens = _images(3), _tokens(3, 7)
    lengths = [7, 4, 2]
    pad_mask = torch.arange(7)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T) True = padding
    padded = tokens.masked_fill(pad_mask, 0)
    junk = tokens.masked_fill(pad_mask, 5)  # other tokens in the padding
    with torch.no_grad():
        a = model(images, padded, pad_mask=pad_mask)
        b = model(images, junk, pad_mask=pad_mask)
        for i, n in enumerate(lengths):  # each caption alone, unpadded
            alone = model(images[i:i + 1], tokens[i:i + 1, :n])
            torch.testing.assert_close(a[i, :n], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b[i, :n], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("cross_score", ["dot", "scaled_dot", "general", "additive"])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_step_with_caches_reproduces_forward(encoder: str, cross_score: str) -> None:
    model = _model(encoder, cross_score=cross_score, n_layers=2, norm_first=cross_score != "general").eval()
    images, tokens = _images(3), _tokens(3, 9)
    with torch.no_grad():
        want = model(images, tokens)  # fused full pass
        memory = model.encode(images).memory
        _, want_cross = model.decode(memory, tokens, need_weights=True)
        stepper = model.begin(memory)
        steps = [stepper.step(tokens[:, t], need_weights=True) for t in range(9)]
    got = torch.stack([logits for logits, _ in steps], dim=1)  # (B, T, V)
    got_cross = torch.stack([cross for _, cross in steps], dim=3)  # (L, B, H, T, N)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_cross, want_cross, atol=1e-5, rtol=1e-5)
    assert stepper.state.position == 9
    with pytest.raises(AssertionError, match="one token id per row"), torch.no_grad():
        model.begin(memory).step(tokens[:, :1])  # (B, 1): a prefix, not a step's tokens
    with pytest.raises(AssertionError, match="torch.long"), torch.no_grad():
        model.begin(memory).step(tokens[:, 0].float())
    model.train()  # the step has no dropout: training goes through forward
    with pytest.raises(AssertionError, match="inference"), torch.no_grad():
        model.begin(memory).step(tokens[:, 0])


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_step_and_cached_forward_equal_the_whole_prefix_pass(encoder: str, norm_first: bool) -> None:
    """One decoder path: step, a cached forward over a chunk, and the uncached forward agree, pre- and post-LN."""
    model = _model(encoder, n_layers=2, norm_first=norm_first).eval()
    images, tokens = _images(3), _tokens(3, 8)
    with torch.no_grad():
        memory = model.encode(images).memory
        want, want_cross = model.decode(memory, tokens, need_weights=True)  # (B, T, V), (L, B, H, T, N)
    for kernels in (Kernels(), Kernels(attention="explicit")):
        model.use_kernels(kernels)
        with torch.inference_mode():  # as decoding runs it
            stepper = model.begin(memory)
            state = stepper.state
            head, head_cross = model.decoder(tokens[:, :5], None, state=state, need_weights=True)  # a 5-token chunk
            steps = [stepper.step(tokens[:, t], need_weights=True) for t in range(5, 8)]
        got = torch.cat([head, torch.stack([logits for logits, _ in steps], dim=1)], dim=1)
        got_cross = torch.cat([head_cross, torch.stack([cross for _, cross in steps], dim=3)], dim=3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_cross, want_cross, atol=1e-5, rtol=1e-5)
        assert state.position == 8 and state.self_caches[0].length == 8


@pytest.mark.parametrize("encoder", ENCODERS)
def test_decode_weights_sum_to_one_over_regions(encoder: str) -> None:
    model = _model(encoder, n_layers=2).eval()
    with torch.no_grad():
        encoded = model.encode(_images(2))
        logits, cross = model.decode(encoded.memory, _tokens(2, 6), need_weights=True)
        _, none = model.decode(encoded.memory, _tokens(2, 6))
    N = encoded.grid[0] * encoded.grid[1]
    assert none is None and cross.shape == (2, 2, 2, 6, N)  # (L, B, H, T, N)
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 2, 2, 6))


def test_state_reorder_expands_images_into_beams() -> None:
    model = _model("vit").eval()
    images, tokens = _images(2), _tokens(2, 4)
    index = torch.tensor([0, 0, 0, 1, 1, 1])  # 2 images x 3 beams
    with torch.no_grad():
        steps = model.begin(model.encode(images).memory)
        state = steps.state
        steps.reorder(index)  # before the first step, as beam search does
        a = [steps.step(tokens[index, t])[0] for t in range(2)]
        steps.reorder(torch.tensor([2, 1, 0, 5, 5, 3]))  # beams swap and repeat mid-way
        b = steps.step(tokens[index, 2])[0]
        ref = model(images, tokens[:, :3])
    torch.testing.assert_close(a[1], ref[index, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, ref[index[[2, 1, 0, 5, 5, 3]], 2], atol=1e-5, rtol=1e-5)
    # The 6 rows share their image's cross-attention K/V: still one row per image, never copied per beam.
    assert state.self_caches[0].k.shape[0] == 6 and state.cross_caches[0].k.shape[0] == 2
    with pytest.raises(AssertionError, match="reorder the state"):
        steps.step(tokens[:, 0])
    with pytest.raises(AssertionError, match="their own image"):
        state.reorder(torch.tensor([3, 1, 0, 5, 5, 3]))  # row 0 would continue a beam of the other image


def test_rows_sharing_an_images_keys_and_values_attend_like_copies() -> None:
    torch.manual_seed(0)
    for score in ("scaled_dot", "additive"):  # the fused and the explicit path
        mha = MultiHeadAttention(d_model=16, n_heads=4, score=score).eval()
        memory, query = torch.randn(2, 7, 16), torch.randn(6, 1, 16)  # 2 images x 3 rows each
        with torch.no_grad():
            shared, w_shared = mha(query, None, None, cache=mha.precompute(memory), need_weights=True)
            copies, w_copies = mha(query, memory.repeat_interleave(3, 0), memory.repeat_interleave(3, 0),
                                   need_weights=True)
        with torch.inference_mode():  # as a decoding step runs
            stepped, w_stepped = mha(query, None, None, cache=mha.precompute(memory), need_weights=True)
            stepped_fast, _ = mha(query, None, None, cache=mha.precompute(memory))
        torch.testing.assert_close(shared, copies)
        torch.testing.assert_close(stepped_fast, copies, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w_shared, w_copies)
        torch.testing.assert_close(stepped, copies)
        torch.testing.assert_close(w_stepped, w_copies)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_several_captions_per_image_train_like_copied_images(encoder: str) -> None:
    """K caption rows per image: the same logits and gradients as feeding each image K times."""
    model = _model(encoder, dropout=0.0).train()  # train mode (BatchNorm batch statistics), no random masks
    images, tokens = _images(2), _tokens(6, 5)  # 2 images x 3 captions, image-major
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[1, 3:] = pad[4, 2:] = True
    grads = []
    for imgs in (images, images.repeat_interleave(3, 0)):
        model.zero_grad()
        logits = model(imgs, tokens, pad_mask=pad)
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (shared, g_shared), (copies, g_copies) = grads
    torch.testing.assert_close(shared, copies, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_shared, g_copies, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    with pytest.raises(AssertionError, match="whole number"):
        model(images, tokens[:5])


# ------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize(("encoder", "extra"), [
    ("vit", dict(cls_token=True, vit_pos="learned", cross_score="additive", n_layers=2)),
    ("cnn", dict(cross_score="general", norm_first=False)),
    ("vit", dict(vit_stem="conv")),
    ("vit", dict(vit_stem="resnet", patch_size=16)),
    ("cnn", dict(cnn_arch="resnet_small")),
])
def test_every_parameter_receives_a_gradient(encoder: str, extra: dict) -> None:
    model = _model(encoder, **extra).train()
    tokens = _tokens(4, 6)
    logits = model(_images(4), tokens)
    F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


@pytest.mark.parametrize("encoder", ENCODERS)
def test_first_loss_is_a_uniform_guess(encoder: str) -> None:
    model = _model(encoder).train()
    tokens = _tokens(8, 6)
    targets = _tokens(8, 6, seed=3)
    loss = F.cross_entropy(model(_images(8), tokens).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(math.log(V), abs=0.1)  # small init: no confident wrong guesses


@pytest.mark.parametrize(("encoder", "size"), [("vit", 48), ("cnn", 32)])
def test_overfits_a_batch(encoder: str, size: int) -> None:
    model = _model(encoder, image_size=size).train()
    images, captions = _images(8, size), _tokens(8, 7)
    inputs = torch.cat([torch.full((8, 1), 1), captions[:, :-1]], dim=1)  # <bos>=1 + caption
    optimizer = torch.optim.AdamW(model.parameter_groups(0.0), lr=3e-3)
    for _ in range(250):
        loss = F.cross_entropy(model(images, inputs).flatten(0, 1), captions.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05


def test_parameter_groups_exempt_norms_biases_embeddings() -> None:
    model = _model("vit", vit_pos="learned", cls_token=True, vit_stem="linear")
    decay, no_decay = model.parameter_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(exempt) and decayed | exempt == set(names.values())
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert {"decoder.embed.weight", "encoder.pos_embedding", "encoder.cls_token", "encoder.norm.weight",
            "decoder.layers.0.self_attn.to_q.bias"} <= exempt
    assert {"decoder.layers.0.self_attn.to_q.weight", "encoder.to_patch_embedding.weight"} <= decayed
    assert model.decoder.head.weight is model.decoder.embed.weight  # tied, and listed once


# ------------------------------------------------------------------------------------------------
# Pretrained backbones, freezing, config round-trips


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """A resnet18 state dict saved like torchvision's weight files (random weights, seeded)."""
    torch.manual_seed(7)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return str(path), state


@pytest.mark.parametrize("stride", [16, 32])
def test_resnet_weights_load_from_a_file(resnet18_file: tuple[str, dict], stride: int) -> None:
    path, state = resnet18_file
    model = CaptionModel(tiny_model_config("cnn", backbone_weights=path, cnn_stride=stride))
    loaded = model.encoder.backbone.state_dict()
    assert loaded  # and every kept key equals the file's
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert any(k.startswith("layer4.") for k in loaded) == (stride == 32)


def test_pretrained_reads_torchvision_cache_before_fetching(resnet18_file: tuple[str, dict], tmp_path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path, state = resnet18_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(request: object, **kwargs: object) -> None:  # a test never touches the network (test_pretrained.py)
        raise URLError("offline")

    monkeypatch.setattr(encoders, "urlopen", offline)
    with pytest.raises(ConfigError, match=r"resnet18-f37072fd\.pth.*checkpoints.*--backbone-weights"):
        CaptionModel(tiny_model_config("cnn", pretrained=True))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(Path(path).read_bytes())
    model = CaptionModel(tiny_model_config("cnn", pretrained=True))
    assert torch.equal(model.encoder.backbone.conv1.weight, state["conv1.weight"])


def test_bad_weight_files_are_config_errors(resnet18_file: tuple[str, dict], tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        CaptionModel(tiny_model_config("cnn", backbone_weights=str(tmp_path / "missing.pth")))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        CaptionModel(tiny_model_config("cnn", backbone_weights=str(garbage)))
    path, _ = resnet18_file
    with pytest.raises(ConfigError, match="resnet34 weights"):  # resnet18 file for a resnet34
        CaptionModel(tiny_model_config("cnn", cnn_arch="resnet34", backbone_weights=path))
    with pytest.raises(ConfigError, match="torchvision backbone"):
        CaptionModel(tiny_model_config("vit", freeze_backbone=True))


def test_vit_b_16_weights_load_and_positions_resize(tmp_path) -> None:
    torch.manual_seed(7)
    source = torchvision.models.vit_b_16(weights=None, image_size=64)  # trained at 64 px: 4x4 grid
    path = tmp_path / "vit_b_16.pth"
    torch.save(source.state_dict(), path)
    config = tiny_model_config("vit", vit_backbone="vit_b_16", image_size=32, backbone_weights=str(path))
    model = CaptionModel(config).eval()
    assert isinstance(model.encoder, TorchvisionViTEncoder)
    ours, theirs = model.encoder.backbone.state_dict(), source.state_dict()
    for key, value in ours.items():
        if key != "encoder.pos_embedding":
            assert torch.equal(value, theirs[key]), key
    assert ours["encoder.pos_embedding"].shape == (1, 1 + 4, 768)  # resized to the 2x2 grid of 32 px
    torch.testing.assert_close(ours["encoder.pos_embedding"][:, 0], theirs["encoder.pos_embedding"][:, 0])
    with torch.no_grad():
        encoded = model.encode(torch.randn(1, 3, 48, 48))
    assert encoded.grid == (3, 3) and encoded.memory.shape == (1, 9, 32)


@pytest.mark.parametrize("encoder", ["cnn", "vit_b_16"])
def test_freeze_backbone_really_freezes(encoder: str) -> None:
    extra = dict(vit_backbone="vit_b_16", image_size=32) if encoder == "vit_b_16" else {}
    model = _model("vit" if encoder == "vit_b_16" else "cnn", freeze_backbone=True, **extra)
    size = model.config.image_size
    backbone = model.encoder.backbone
    assert all(not p.requires_grad for p in backbone.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}  # weights and BatchNorm statistics
    head_before = model.encoder.proj.weight.clone()
    optimizer = torch.optim.AdamW(model.parameter_groups(0.01), lr=1e-2)
    model.train()
    assert not backbone.training and model.encoder.proj.training
    tokens = _tokens(4, 5)
    F.cross_entropy(model(_images(4, size), tokens).flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    assert all(p.grad is None for p in backbone.parameters())
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.encoder.proj.weight, head_before)  # the rest still trains


@pytest.mark.parametrize("encoder", ENCODERS)
def test_config_round_trip_rebuilds_identical_model(encoder: str) -> None:
    model = _model(encoder, cross_score="additive", cls_token=True, vit_pos="learned").eval()
    rebuilt = CaptionModel(ModelConfig.from_dict(model.config.to_dict())).eval()
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    images, tokens = _images(2), _tokens(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images, tokens), model(images, tokens))


def test_build_encoder_picks_the_configured_class() -> None:
    assert isinstance(_model("vit").encoder, ViTEncoder)
    assert isinstance(_model("cnn").encoder, CNNEncoder)
