"""Image encoders: a ResNet feature map or ViT patches, both returned as a row-major sequence of regions.

Every encoder maps images (B, 3, H, W) to `Encoded(memory (B, N, D), grid (h, w))` with N = h*w and
region index = row*w + col, so cross-attention weights over N fold back into an h x w map. The grid
follows the input: images of another size than the training size give another grid.

Pretrained backbones come from `config.backbone_weights` (a local file), else, when `config.pretrained`
is set, from torchvision's own cache (`torch.hub.get_dir()/checkpoints`), fetched into it the way
torchvision fetches them when it lacks the file. Offline, that is one error naming the URL and the folder.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import VIT_STEM_STRIDES, ModelConfig
from captioner.errors import ConfigError
from captioner.models.attention import FeedForward, MultiHeadAttention
from captioner.models.positional import sinusoidal_2d


@dataclass
class Encoded:
    """An encoder's output: memory over an h x w grid (row-major), plus ViT self-attention when asked."""

    memory: torch.Tensor  # (B, N, D), N = h*w, index = row*w + col
    grid: tuple[int, int]  # (h, w)
    attn: list[torch.Tensor] | None = None  # per encoder layer (B, H, N', N'); N' counts the CLS slot if any


def _checked_features(features: torch.Tensor, channels: int) -> None:
    assert features.dim() == 4 and features.shape[1] == channels, \
        f"expected backbone features (B, {channels}, h, w), got {tuple(features.shape)}"


def _checked(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W), checked, in the channels-last layout the encoders' convolutions run fastest in."""
    assert images.dim() == 4 and images.shape[1] == 3, f"expected images (B, 3, H, W), got {tuple(images.shape)}"
    assert images.is_floating_point(), f"expected float images (normalised), got {images.dtype}"
    return images.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------
# Pretrained backbones: where the weights come from, how they are checked, how freezing works


def _file_name(url: str) -> str:
    return Path(urlparse(url).path).name  # torchvision's cache keeps the URL's file name


def _weights_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"  # follows TORCH_HOME, as torchvision's does


def cached_weights_file(arch: str) -> Path | None:
    """Torchvision's cached ImageNet weights file for `arch`, or None when its cache holds none."""
    import torchvision  # lazy: a slow import (benchmarks/NOTES.md), and our ViT does not need it

    weights = torchvision.models.get_model_weights(arch)
    # The default weights first, then any other release of the same architecture the user may have.
    for choice in [weights.DEFAULT, *(w for w in weights if w is not weights.DEFAULT)]:
        path = _weights_cache() / _file_name(choice.url)
        if path.is_file():
            return path
    return None


FETCH_TIMEOUT_S = 15.0  # seconds a silent connection may stall before the fetch counts as offline


def _download(url: str, path: Path) -> None:
    """Fetch `url` into `path` as torch.hub does (a temporary name, renamed once complete; the SHA-256 digits in
    the name checked), but with a timeout on each request: torch.hub's fetch has none, so offline it could hang."""
    digits = torch.hub.HASH_REGEX.search(path.name)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    sha256 = hashlib.sha256()
    try:
        with urlopen(Request(url, headers={"User-Agent": "torch.hub"}), timeout=FETCH_TIMEOUT_S) as response:
            path.parent.mkdir(parents=True, exist_ok=True)  # once the server answers: no empty folder offline
            with open(partial, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    sha256.update(chunk)
        if digits is not None and not sha256.hexdigest().startswith(digits.group(1)):
            raise ValueError(f"its SHA-256 {sha256.hexdigest()[:16]}... does not start with {digits.group(1)}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def fetch_weights(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """Download `arch`'s default ImageNet weights into torchvision's cache, as torchvision does; the state and file.

    Offline (or the server unreachable) this is one ConfigError naming the URL and the folder to put the
    file in by hand, never a traceback.
    """
    import torchvision  # lazy: see cached_weights_file

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    folder, name = _weights_cache(), _file_name(url)
    try:
        _download(url, folder / name)
        state = torch.load(folder / name, map_location="cpu", weights_only=True)  # never runs code from the file
    except OSError as e:  # URLError, a timeout, a refused connection: no usable network
        reason = " ".join(str(getattr(e, "reason", None) or e).split())
        raise ConfigError(f"pretrained {arch} weights are not in torchvision's cache and could not be downloaded "
                          f"({reason}): put {name} (from {url}) in {folder}/, or pass --backbone-weights FILE") from e
    except Exception as e:  # noqa: BLE001 - a corrupt download (hash mismatch, unreadable) is one user error
        raise ConfigError(f"the {arch} weights downloaded from {url} are unusable ({type(e).__name__}: {e}): retry, "
                          f"or put {name} in {folder}/ by hand".splitlines()[0]) from e
    return _checked_state(state, folder / name, arch), str(folder / name)


def _checked_state(state: object, source: Path, arch: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{source} is not a state dict (a mapping of names to tensors) of {arch} weights")
    return dict(state)


def read_backbone_weights(config: ModelConfig, arch: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """The state dict to start the backbone from and where it came from, or None for random weights.

    In order: `backbone_weights`, torchvision's cache, a download into that cache (`fetch_weights`).
    """
    if config.backbone_weights:
        path = Path(config.backbone_weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"backbone weights file not found: {path}")
    elif config.pretrained:
        path = cached_weights_file(arch)
        if path is None:
            return fetch_weights(arch)
    else:
        return None
    try:
        # weights_only: a state dict is plain tensors, and loading must never run code from the file.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"cannot read backbone weights {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    return _checked_state(state, path, arch), str(path)


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], *, source: str, arch: str) -> None:
    """Load `state` into `module` requiring the same keys and shapes; ConfigError saying what differs."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{source} does not hold {arch} weights: {len(missing)} missing keys {missing[:3]}, "
                          f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"{source} does not hold {arch} weights: {k} has shape {tuple(state[k].shape)}, "
                          f"expected {tuple(own[k].shape)}")
    module.load_state_dict(state)


class Encoder(nn.Module):
    """Base of the encoders: the one place that decides pretrained loading and freezing of `backbone`."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone: nn.Module | None = None  # the pretrainable part (torchvision body); None for our ViT
        self.frozen = False

    def setup_backbone(self, config: ModelConfig, arch: str | None) -> None:
        """Load local pretrained weights into `backbone` and freeze it, as the config asks."""
        if self.backbone is None:
            if config.pretrained or config.backbone_weights or config.freeze_backbone:
                raise ConfigError("pretrained, backbone_weights and freeze_backbone need a torchvision backbone: "
                                  "use the cnn encoder or vit_backbone=vit_b_16")
            return
        found = read_backbone_weights(config, arch)
        if found is not None:
            state, source = found
            self.load_backbone(state, source=source)
        if config.freeze_backbone:
            self.set_frozen(True)

    def set_frozen(self, frozen: bool) -> None:
        """Fix the backbone's weights and BatchNorm statistics (or free them again for fine-tuning)."""
        self.backbone.requires_grad_(not frozen)
        self.frozen = frozen
        self.backbone.train(self.training and not frozen)

    def load_backbone(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        """Load a torchvision state dict into `backbone` (subclasses drop the keys of parts they do not keep)."""
        raise NotImplementedError

    # An encoder with a backbone splits forward in two, so a frozen backbone's output can be computed once
    # and cached (captioner/feature_cache.py): forward(images) == from_backbone(backbone_features(images)).

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the backbone's feature map (B, C, h, w): everything freezing fixes."""
        raise NotImplementedError(f"{type(self).__name__} has no torchvision backbone")

    def from_backbone(self, features: torch.Tensor, *, need_weights: bool = False) -> Encoded:
        """The backbone's feature map (B, C, h, w) -> Encoded: everything after the backbone (trainable)."""
        raise NotImplementedError(f"{type(self).__name__} has no torchvision backbone")

    def train(self, mode: bool = True) -> Encoder:
        """Switch train/eval mode; a frozen backbone stays in eval so its BatchNorm statistics never move."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self


# ----------------------------------------------------------------------------------------------------------
# CNN encoder


def _out_channels(stage: nn.Module) -> int:
    # A ResNet stage ends with the last block's last BatchNorm (bn2 of a BasicBlock, bn3 of a Bottleneck).
    return [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al.): two 3x3 conv-BN layers plus a shortcut, ReLU after the sum.

    Its attribute names are torchvision's, so its state-dict keys are too; written here so the compact
    ResNet needs no torchvision import, a large share of `captioner caption`'s start-up.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:  # the shortcut must match the new shape: a strided 1x1 projection
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H/stride, W/stride)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


def small_resnet(stride: int) -> OrderedDict[str, nn.Module]:
    """A compact ResNet for small images: a 3x3 stride-2 stem, then one BasicBlock per stride-2 stage.

    Widths 32 -> 64 -> 128 -> 128 (-> 256 for stride 32): about 0.15 GFLOP at 96 px against ResNet-18's 0.55,
    which is what lets the CNN encoder train to a useful model in minutes on a CPU. Its stages keep
    torchvision's names (conv1, bn1, relu, layer1..4), so the rest of the encoder treats it like any ResNet.
    At stride 16 it is also the hybrid ViT's stem.
    """
    assert stride in (8, 16, 32), f"small_resnet stride must be 8, 16 or 32, got {stride}"
    widths = [32, 64, 128, 128, 256][: stride.bit_length() - 1]  # stem + one stage per further halving
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False), bn1=nn.BatchNorm2d(widths[0]),
        relu=nn.ReLU(inplace=True))
    for i, (c_in, c_out) in enumerate(zip(widths, widths[1:], strict=False), start=1):
        stages[f"layer{i}"] = nn.Sequential(BasicBlock(c_in, c_out, stride=2))
    return stages


class CNNEncoder(Encoder):
    """ResNet feature map (B, C, h, w) flattened row-major to N = h*w regions, projected to D, plus 2-D positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.arch = config.cnn_arch
        if config.cnn_arch == "resnet_small":
            if config.pretrained:
                raise ConfigError("resnet_small has no ImageNet weights: pass --backbone-weights FILE "
                                  "(a resnet_small state dict), or use resnet18/34/50")
            stages = small_resnet(config.cnn_stride)
        else:
            import torchvision  # lazy: see cached_weights_file

            resnet = torchvision.models.get_model(config.cnn_arch, weights=None)
            # Named stages, not children()[:-2]: the kept layers are explicit and their state-dict keys stay
            # torchvision's, so torchvision weight files load as they are. Stride 16 stops after layer3.
            names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
            if config.cnn_stride == 32:
                names.append("layer4")
            stages = OrderedDict((name, getattr(resnet, name)) for name in names)
        self.stages = list(stages)
        self.backbone = nn.Sequential(stages)
        self.proj = nn.Linear(_out_channels(self.backbone[-1]), config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.setup_backbone(config, config.cnn_arch)

    def load_backbone(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        """Load a torchvision ResNet state dict: strict for the kept stages; fc and a dropped layer4 ignored."""
        ignorable = {"fc"} | ({"layer4"} if "layer4" not in self.stages else set())
        kept = {k: v for k, v in state.items() if k.split(".", 1)[0] not in ignorable}
        load_exactly(self.backbone, kept, source=source, arch=self.arch)

    def forward(self, images: torch.Tensor, *, need_weights: bool = False) -> Encoded:
        """Images (B, 3, H, W) -> memory (B, h*w, D) with h, w = H/stride, W/stride; no attention weights."""
        return self.from_backbone(self.backbone_features(images))

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the ResNet's feature map (B, C, H/stride, W/stride)."""
        return self.backbone(_checked(images))

    def from_backbone(self, features: torch.Tensor, *, need_weights: bool = False) -> Encoded:
        """Feature map (B, C, h, w) -> memory (B, h*w, D): projection, norm, 2-D positions, dropout."""
        _checked_features(features, self.proj.in_features)
        B, C, h, w = features.shape
        regions = features.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major: index = row*w + col
        memory = self.norm(self.proj(regions))  # (B, N, D)
        memory = memory + sinusoidal_2d(h, w, memory.shape[-1], device=memory.device, dtype=memory.dtype)
        return Encoded(self.dropout(memory), (h, w), None)


# ----------------------------------------------------------------------------------------------------------
# ViT encoders


def resize_positions(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Learned grid positions (1, h0*w0, D) resized bicubically to another grid (1, h*w, D), row-major."""
    if old == new:
        return pos
    (h0, w0), (h, w), D = old, new, pos.shape[-1]
    assert pos.shape[1] == h0 * w0, f"expected {h0 * w0} positions for a {h0}x{w0} grid, got {pos.shape[1]}"
    grid = pos.reshape(1, h0, w0, D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, h*w, D)


class EncoderLayer(nn.Module):
    """Pre-LN Transformer encoder layer: x + self-attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, *, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model=d_model, n_heads=n_heads, dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model=d_model, d_ff=d_ff, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N', D) -> (x (B, N', D), self-attention weights (B, H, N', N') | None)."""
        h = self.norm1(x)
        out, weights = self.attn(h, h, h, need_weights=need_weights)
        x = x + self.dropout(out)
        x = x + self.dropout(self.ff(self.norm2(x)))
        return x, weights


def patch_embedding(config: ModelConfig) -> nn.Module:
    """Images (B, 3, H, W) -> patch embeddings (B, D, H/p, W/p), one vector per p x p patch.

    linear: a conv with kernel = stride = p is the per-patch linear map of the flattened p x p x 3 pixels
    (Dosovitskiy et al.). conv: two 3x3 stride-2 convolutions (BatchNorm, ReLU) see edges and corners
    first, then a kernel = stride = p/4 conv cuts the same p x p patches (Xiao et al. 2021, "Early
    convolutions help transformers see better"); same grid, same tokens, a far easier optimisation.
    resnet: the hybrid, below.
    """
    D = config.d_model
    cell = config.patch_size // VIT_STEM_STRIDES[config.vit_stem]  # patch side on the stem's output grid
    if config.vit_stem == "linear":
        return nn.Conv2d(3, D, kernel_size=cell, stride=cell)
    if config.vit_stem == "resnet":
        # The hybrid of Dosovitskiy et al. (section 3.1): patches are cut from a CNN feature map (the compact
        # ResNet's stride-16 stages, 128 channels) instead of from raw pixels. At patch_size 16 a patch is one
        # cell of that map, the paper's "patches of spatial size 1x1": the Transformer layers then relate
        # regions that the convolutions have already described.
        return nn.Sequential(nn.Sequential(small_resnet(16)), nn.Conv2d(128, D, kernel_size=cell, stride=cell))
    widths = (D // 4, D // 2)
    return nn.Sequential(
        nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(widths[1], D, kernel_size=cell, stride=cell),
    )


class ViTEncoder(Encoder):
    """Vision Transformer (Dosovitskiy et al.): patches -> linear embedding + 2-D positions -> pre-LN layers."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, p = config.d_model, config.patch_size
        self.patch_size = p
        self.train_grid = (config.image_size // p, config.image_size // p)
        self.to_patch_embedding = patch_embedding(config)
        # Learned positions exist for the training grid only and are resized for other grids;
        # sinusoidal ones are computed for whatever grid arrives.
        self.pos_embedding = None
        if config.vit_pos == "learned":
            self.pos_embedding = nn.Parameter(torch.zeros(1, self.train_grid[0] * self.train_grid[1], D))
            nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        # The CLS slot gives the layers a global summary token; the decoder only sees the regions.
        self.cls_token = None
        if config.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model=D, n_heads=config.n_heads, d_ff=config.d_ff, dropout=config.dropout,
                         attn_dropout=config.attn_dropout)
            for _ in range(config.enc_layers)
        )
        self.norm = nn.LayerNorm(D)
        self.setup_backbone(config, None)

    def positions(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """Positions (1, h*w, D) of an h x w patch grid."""
        if self.pos_embedding is None:
            return sinusoidal_2d(h, w, like.shape[-1], device=like.device, dtype=like.dtype)[None]
        return resize_positions(self.pos_embedding, self.train_grid, (h, w))

    def forward(self, images: torch.Tensor, *, need_weights: bool = False) -> Encoded:
        """Images (B, 3, H, W), H and W multiples of the patch size -> memory (B, N, D), grid (H/p, W/p)."""
        images = _checked(images)
        B, _, H, W = images.shape
        p = self.patch_size
        assert H % p == 0 and W % p == 0, f"image size {H}x{W} must be a multiple of the patch size {p}"
        x = self.to_patch_embedding(images)  # (B, D, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major: index = row*w + col
        x = x + self.positions(h, w, x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, D)
        x = self.dropout(x)
        attn = []
        for layer in self.layers:
            x, weights = layer(x, need_weights=need_weights)  # weights (B, H, N', N') | None
            attn.append(weights)
        x = self.norm(x)
        memory = x[:, 1:] if self.cls_token is not None else x  # (B, N, D): the CLS slot is not a region
        return Encoded(memory, (h, w), attn if need_weights else None)


class TorchvisionViTEncoder(Encoder):
    """Torchvision's ViT-B/16 body (local ImageNet weights only): its 768-d patch tokens projected to D.

    Its own attention weights are not exposed, so `need_weights` gives `attn=None` (no rollout).
    """

    patch_size = 16

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.image_size % self.patch_size:
            raise ConfigError(f"vit_b_16 needs image_size divisible by 16, got {config.image_size}")
        self.train_grid = (config.image_size // 16, config.image_size // 16)
        import torchvision  # lazy: see cached_weights_file

        self.backbone = torchvision.models.get_model("vit_b_16", weights=None, image_size=config.image_size)
        # The ImageNet classifier is not used; replacing it keeps every remaining parameter trained.
        self.backbone.heads = nn.Identity()
        width = self.backbone.hidden_dim
        self.proj = nn.Linear(width, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.setup_backbone(config, "vit_b_16")

    def load_backbone(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        """Load a torchvision vit_b_16 state dict; positions are resized when trained at another image size."""
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
        pos = state.get("encoder.pos_embedding")
        own = self.backbone.encoder.pos_embedding
        if pos is not None and pos.shape != own.shape and pos.shape[-1] == own.shape[-1]:
            side = round((pos.shape[1] - 1) ** 0.5)  # square training grid, after the class token
            patches = resize_positions(pos[:, 1:], (side, side), self.train_grid)
            state["encoder.pos_embedding"] = torch.cat([pos[:, :1], patches], dim=1)
        load_exactly(self.backbone, state, source=source, arch="vit_b_16")

    def forward(self, images: torch.Tensor, *, need_weights: bool = False) -> Encoded:
        """Images (B, 3, H, W), H and W multiples of 16 -> memory (B, N, D), grid (H/16, W/16)."""
        return self.from_backbone(self.backbone_features(images))

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), H and W multiples of 16 -> the body's patch tokens as a map (B, 768, H/16, W/16)."""
        images = _checked(images)
        B, _, H, W = images.shape
        assert H % 16 == 0 and W % 16 == 0, f"image size {H}x{W} must be a multiple of 16 for vit_b_16"
        vit = self.backbone
        # The body's parts are called one by one (not vit.forward) so any grid works: positions are
        # resized to the grid, and the class token is dropped instead of classified.
        x = vit.conv_proj(images)  # (B, 768, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, 768), row-major
        x = torch.cat([vit.class_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, 768)
        pos = vit.encoder.pos_embedding  # (1, 1 + training N, 768)
        x = x + torch.cat([pos[:, :1], resize_positions(pos[:, 1:], self.train_grid, (h, w))], dim=1)
        x = vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(x)))  # (B, 1+N, 768)
        # The class token is dropped here, not classified; a map keeps the grid for from_backbone.
        return x[:, 1:].transpose(1, 2).reshape(B, -1, h, w)  # (B, 768, h, w)

    def from_backbone(self, features: torch.Tensor, *, need_weights: bool = False) -> Encoded:
        """Patch-token map (B, 768, h, w) -> memory (B, h*w, D): projection and norm."""
        _checked_features(features, self.proj.in_features)
        B, C, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, 768), row-major
        memory = self.norm(self.proj(tokens))  # (B, N, D)
        return Encoded(memory, (h, w), None)


def build_encoder(config: ModelConfig) -> Encoder:
    """The encoder the config names: CNNEncoder, ViTEncoder, or TorchvisionViTEncoder (vit_backbone=vit_b_16)."""
    if config.encoder == "cnn":
        return CNNEncoder(config)
    if config.vit_backbone == "vit_b_16":
        return TorchvisionViTEncoder(config)
    return ViTEncoder(config)
