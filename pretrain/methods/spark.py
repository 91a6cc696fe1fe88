"""SparK: masked image modeling for CNNs (Tian et al., "Designing BERT for Convolutional Networks: Sparse and
Hierarchical Masked Modeling", ICLR 2023; reference code keyu-tian/SparK ``pretrain/{encoder,spark,decoder}.py``).

Patches of the input are masked (a grid of ``downsample``-px cells, the CNN's total stride) and the CNN sees only
the visible ones, as a sparse convolution would: every Conv2d, pooling, norm and channels-last Linear output is
zeroed at masked positions, and BatchNorm takes its statistics from visible positions only. The encoder stays the
timm model it is (forward hooks and a BatchNorm2d subclass swapped in, state-dict keys unchanged), so the release is
a plain timm CNN; with no mask set (evaluation, the kNN monitor) it computes exactly as before. Its hierarchical
feature maps (timm's ``forward_intermediates``) are densified, smallest first (a norm, mask tokens at the masked
positions, a 1x1 then 3x3 projection), and a light UNet decoder reconstructs per-patch-normalised pixels; the loss
is their mean squared error on the masked patches only.

Small medical images: a ResNet with medfm's small-image stem (``model.backbone_kwargs.small_image_stem``) has a total
stride of 8, so a 32-px input gives a 4 x 4 grid of 8-px cells (the CPU recipe: PneumoniaMNIST upsampled to 32 px).
Parameters the sparse forward never reaches (ConvNeXt's head norm) are frozen: nothing trains them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from timm.layers import LayerNorm2d, trunc_normal_
from torch import Tensor, nn
from torchvision.utils import make_grid

from medfm.pretrain.backbones import is_vit
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.methods.base import SSLMethod, augment_from_config, backbone_from_config
from medfm.pretrain.transforms import MultiView

DENSIFY_NORMS = ("auto", "bn", "ln", "none")


@dataclass
class SparKConfig:
    """The ``spark:`` config section."""

    mask_ratio: float = 0.6  # SparK: 60 % of the cells
    decoder_width: int = 512  # the first decoder block's channels, halved at each 2x upsampling (SparK: 768)
    # the norm before the mask tokens: bn (sparse BatchNorm, CNNs with BatchNorm), ln (LayerNorm, ConvNeXt),
    # none; auto: ln when the encoder has LayerNorms, else bn
    densify_norm: str = "auto"
    levels: int = 4  # feature-map scales the decoder receives (SparK: 4)


class MaskState:
    """The current mask, (B, 1, f, f) bool (True: visible), shared by the hooks of one encoder; None: dense."""

    def __init__(self) -> None:
        self.active: Tensor | None = None

    def at(self, height: int) -> Tensor:
        """The mask at a feature map of ``height`` rows: (B, 1, height, height) bool, each cell repeated."""
        cells = self.active.shape[-1]
        if height % cells:
            raise ConfigError(f"SparK: a feature map of {height} rows does not tile the {cells} x {cells} mask grid")
        factor = height // cells
        return self.active.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


class SparseBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose statistics (and running statistics) come from the visible positions only when a mask is
    set (SparK's ``SparseBatchNorm2d``); masked positions stay zero. Swapped in as the class of an encoder's
    BatchNorm2d modules: same parameters and buffers, same keys. ``mask_state`` is set by :func:`sparsify`."""

    mask_state: MaskState

    def forward(self, x: Tensor) -> Tensor:
        state = getattr(self, "mask_state", None)
        if state is None or state.active is None:
            return super().forward(x)
        # Masked sums rather than x[visible]: selecting the visible positions has a data-dependent shape, which
        # makes the host wait for the device at every layer (SparK's reference selects them); the same numbers.
        visible = state.at(x.shape[2]).to(x.dtype)  # (B, 1, H, W)
        count = visible.sum()
        if self.training or not self.track_running_stats:
            mean = (x * visible).sum(dim=(0, 2, 3)) / count
            var = (((x - mean[:, None, None]) ** 2) * visible).sum(dim=(0, 2, 3)) / count
            if self.training and self.track_running_stats:
                self._update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
        else:
            mean, var = self.running_mean, self.running_var
        normed = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + self.eps)
        if self.affine:
            normed = normed * self.weight[:, None, None] + self.bias[:, None, None]
        return normed * visible

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """As ``nn.BatchNorm2d`` in training: momentum, or a cumulative average when momentum is None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def _channels_first_hook(state: MaskState):
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if state.active is None or output.ndim != 4:
            return None
        return output * state.at(output.shape[2]).to(output.dtype)

    return hook


def _channels_last_hook(state: MaskState):
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if state.active is None or output.ndim != 4:  # a Linear / LayerNorm on (B, H, W, C) (ConvNeXt's MLP)
            return None
        return output * state.at(output.shape[1]).permute(0, 2, 3, 1).to(output.dtype)

    return hook


def sparsify(encoder: nn.Module, state: MaskState) -> nn.Module:
    """Make ``encoder`` (a timm CNN) compute as a sparse CNN whenever ``state.active`` is set (module docstring).

    BatchNorm2d modules become :class:`SparseBatchNorm2d` (class swap, same tensors); Conv2d, pooling and
    LayerNorm2d outputs, and 4D outputs of Linear / LayerNorm (channels last), are masked by forward hooks.
    Raises ConfigError for a norm layer it cannot make sparse (e.g. timm's BatchNormAct2d, GroupNorm)."""
    for name, module in encoder.named_modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = SparseBatchNorm2d
            module.mask_state = state
        elif isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, LayerNorm2d)):
            module.register_forward_hook(_channels_first_hook(state))
        elif isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.register_forward_hook(_channels_last_hook(state))
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.InstanceNorm2d)):
            raise ConfigError(
                f"SparK: {name} is a {type(module).__name__}, whose statistics cannot be limited to visible "
                "positions here; use a CNN with BatchNorm2d (ResNet) or LayerNorm (ConvNeXt)"
            )
    return encoder


class UNetBlock(nn.Module):
    """2x upsampling (4x4 transposed conv) then two 3x3 conv + BatchNorm (SparK's decoder block)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(channels_in, channels_in, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            nn.Conv2d(channels_in, channels_in, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_in),
            nn.ReLU6(inplace=True),
            nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, h, w) -> (B, C_out, 2h, 2w)."""
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """log2(downsample) UNet blocks from ``width`` channels, halving, then a 1x1 conv to ``out_chans``; block i
    adds the i-th densified map (smallest first) to its input."""

    def __init__(self, downsample: int, width: int, out_chans: int):
        super().__init__()
        widths = [width // 2**i for i in range(round(math.log2(downsample)) + 1)]
        self.blocks = nn.ModuleList(UNetBlock(a, b) for a, b in itertools.pairwise(widths))
        self.proj = nn.Conv2d(widths[-1], out_chans, kernel_size=1)
        for module in self.modules():  # as SparK's LightDecoder.initialize
            if isinstance(module, nn.Conv2d):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, maps: list[Tensor]) -> Tensor:
        """maps: densified (B, width / 2^i, f 2^i, f 2^i), smallest first -> (B, out_chans, H, W)."""
        x: Tensor | int = 0
        for i, block in enumerate(self.blocks):
            x = block(x + maps[i] if i < len(maps) else x)
        return self.proj(x)


class SparK(SSLMethod):
    """Sparse masked modeling of a CNN.

    Args:
        backbone: a timm CNN with ``forward_intermediates`` (ResNet, ConvNeXt, ...), ``num_classes=0``.
        img_size: the square input side; a multiple of the CNN's total stride.
        mask_ratio: fraction of the grid cells hidden.
        decoder_width, densify_norm, levels: see :class:`SparKConfig`.
    """

    Config = SparKConfig
    description = (
        "sparse masked image modeling for CNNs (SparK, Tian et al. 2023); released: the CNN encoder (densify layers "
        "and decoder dropped)"
    )
    # SparK needs a CNN: a ResNet-18 with the small-image stem at 32 px (a 4 x 4 grid of 8-px cells)
    tiny_config: ClassVar[dict[str, Any]] = {
        "data.img_size": 32,
        "model.backbone": "resnet18",
        "model.backbone_kwargs.small_image_stem": True,
        "spark.decoder_width": 32,
    }

    @staticmethod
    def check_config(section, need) -> None:
        need(0.0 < section.mask_ratio < 1.0, "mask_ratio", "must be in (0, 1)")
        need(section.densify_norm in DENSIFY_NORMS, "densify_norm", f"must be one of {DENSIFY_NORMS}")
        need(section.decoder_width >= 8, "decoder_width", "must be at least 8")
        need(section.levels >= 1, "levels", "must be at least 1")

    def __init__(
        self,
        backbone: nn.Module,
        img_size: int,
        mask_ratio: float = 0.6,
        decoder_width: int = 512,
        densify_norm: str = "auto",
        levels: int = 4,
    ):
        super().__init__()
        if is_vit(backbone) or not hasattr(backbone, "forward_intermediates"):
            raise ConfigError(
                f"SparK needs a timm CNN with forward_intermediates (ResNet, ConvNeXt), got {type(backbone).__name__}; "
                "use method=mae for a VisionTransformer"
            )
        self.in_chans = _first_conv_channels(backbone)
        with torch.no_grad():
            was_training = backbone.training
            maps = backbone.eval().forward_intermediates(
                torch.zeros(1, self.in_chans, img_size, img_size), intermediates_only=True
            )
            backbone.train(was_training)
        self.downsample = img_size // maps[-1].shape[-1]
        if img_size % maps[-1].shape[-1] or self.downsample & (self.downsample - 1):
            raise ConfigError(
                f"config key 'data.img_size': SparK needs an input side that the CNN's total stride divides into a "
                f"power-of-2 grid; {img_size} px gives a {maps[-1].shape[-1]}-cell map (e.g. use 32 with a "
                "small-image stem, 224 without)"
            )
        blocks = round(math.log2(self.downsample))
        self.levels = min(levels, blocks, len(maps))
        used = maps[-self.levels :][::-1]  # smallest first
        for i, feature_map in enumerate(used):
            if feature_map.shape[-1] != maps[-1].shape[-1] * 2**i:
                raise ConfigError(
                    f"SparK: the encoder's feature maps {[m.shape[-1] for m in maps]} do not double at each scale"
                )
        self.grid = img_size // self.downsample
        self.num_keep = round(self.grid**2 * (1 - mask_ratio))
        if self.num_keep < 1:
            raise ConfigError(f"spark.mask_ratio {mask_ratio} keeps no cell of the {self.grid} x {self.grid} grid")
        self.mask_ratio = mask_ratio
        has_layer_norm = any(isinstance(m, nn.LayerNorm) for m in backbone.modules())
        self.densify_norm = ("ln" if has_layer_norm else "bn") if densify_norm == "auto" else densify_norm
        self.mask_state = MaskState()
        self.encoder = sparsify(backbone, self.mask_state)
        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        width = decoder_width
        for i, feature_map in enumerate(used):
            channels = feature_map.shape[1]
            token = nn.Parameter(torch.zeros(1, channels, 1, 1))
            trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(self._densify_norm(channels))
            kernel = 1 if i == 0 else 3
            self.densify_projs.append(
                nn.Identity()
                if i == 0 and channels == width
                else nn.Conv2d(channels, width, kernel, padding=kernel // 2)
            )
            width //= 2
        self.decoder = LightDecoder(self.downsample, decoder_width, self.in_chans)
        self._freeze_unreached(img_size)

    def _densify_norm(self, channels: int) -> nn.Module:
        if self.densify_norm == "bn":
            norm = SparseBatchNorm2d(channels)
            norm.mask_state = self.mask_state
            return norm
        if self.densify_norm == "ln":
            return LayerNorm2d(channels)  # per position: the mask tokens then replace the masked ones
        return nn.Identity()

    def _freeze_unreached(self, img_size: int) -> None:
        """Freeze encoder parameters the loss never reaches (a head norm after the last feature map): they would
        have no gradient, which DDP refuses. Found by one backward on noise; the BatchNorm running statistics it
        moved (a warm start's included) are put back."""
        buffers = {name: buffer.clone() for name, buffer in self.named_buffers()}
        self.zero_grad(set_to_none=True)
        self([torch.randn(2, self.in_chans, img_size, img_size)], step=0)["loss"].backward()
        for param in self.encoder.parameters():
            if param.requires_grad and param.grad is None:
                param.requires_grad_(False)
        self.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buffer in self.named_buffers():
                buffer.copy_(buffers[name])

    def random_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """(B, 1, f, f) bool, ``num_keep`` visible cells per image, uniformly at random (SparK's ``mask``)."""
        order = torch.rand(batch_size, self.grid**2, device=device).argsort(dim=1)
        active = torch.zeros(batch_size, self.grid**2, dtype=torch.bool, device=device)
        active.scatter_(1, order[:, : self.num_keep], True)
        return active.view(batch_size, 1, self.grid, self.grid)

    def reconstruct(self, images: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W), active (B, 1, f, f) -> (reconstruction (B, C, H, W), deepest encoder map)."""
        self.mask_state.active = active
        try:
            masked = images * self.mask_state.at(images.shape[-1]).to(images.dtype)
            maps = self.encoder.forward_intermediates(masked, intermediates_only=True)[-self.levels :][::-1]
            dense, visible = [], active
            for i, feature_map in enumerate(maps):
                normed = self.densify_norms[i](feature_map)
                tokens = self.mask_tokens[i].to(normed.dtype).expand_as(normed)
                dense.append(self.densify_projs[i](torch.where(visible.expand_as(normed), normed, tokens)))
                visible = visible.repeat_interleave(2, 2).repeat_interleave(2, 3)
        finally:
            self.mask_state.active = None  # the decoder and any later forward are dense
        return self.decoder(dense), maps[0]

    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, f*f, p*p*C), p = the downsample ratio (SparK's ``patchify``)."""
        p, f = self.downsample, self.grid
        batch, channels = images.shape[:2]
        patches = images.reshape(batch, channels, f, p, f, p)
        return torch.einsum("bchpwq->bhwpqc", patches).reshape(batch, f * f, p * p * channels)

    def unpatchify(self, patches: Tensor) -> Tensor:
        p, f = self.downsample, self.grid
        batch, channels = patches.shape[0], patches.shape[-1] // p**2
        images = torch.einsum("bhwpqc->bchpwq", patches.reshape(batch, f, f, p, p, channels))
        return images.reshape(batch, channels, f * p, f * p)

    def loss(self, images: Tensor, reconstruction: Tensor, active: Tensor) -> Tensor:
        """Mean over masked patches of the per-patch MSE against per-patch-normalised pixels (SparK's loss)."""
        target = self.patchify(images.float())
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((self.patchify(reconstruction.float()) - (target - mean) / std) ** 2).mean(dim=-1)  # (B, L)
        masked = (~active).flatten(1).float()
        return (per_patch * masked).sum() / (masked.sum() + 1e-8)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        """views: [(B, C, H, W)] -> loss on the masked patches."""
        images = views[0]
        active = self.random_mask(images.shape[0], images.device)
        reconstruction, deepest = self.reconstruct(images, active)
        visible = active.float().repeat_interleave(deepest.shape[-1] // self.grid, 2)
        visible = visible.repeat_interleave(deepest.shape[-1] // self.grid, 3)
        pooled = (deepest * visible).sum(dim=(2, 3)) / visible.sum(dim=(2, 3)).clamp(min=1)
        return {"loss": self.loss(images, reconstruction, active), "embeddings": pooled.detach()}

    def export_backbone(self) -> nn.Module:
        return self.encoder

    @torch.no_grad()
    def figures(self, views: list[Tensor]) -> dict[str, Tensor]:
        """Rows: masked input, reconstruction (visible pixels + predictions), original; up to 8 images."""
        images = views[0][:8].float()
        active = self.random_mask(images.shape[0], images.device)
        reconstruction, _ = self.reconstruct(images, active)
        patches = self.patchify(images)
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        predicted = self.unpatchify(self.patchify(reconstruction.float()) * std + mean)
        factor = images.shape[-1] // self.grid
        visible = active.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
        masked = torch.where(visible, images, torch.full_like(images, float(images.min())))
        grid = torch.cat([masked, torch.where(visible, images, predicted), images])
        grid = grid.clamp(images.min(), images.max())
        grid = make_grid(
            grid, nrow=images.shape[0], normalize=True, value_range=(float(images.min()), float(images.max()))
        )
        return {"spark_reconstruction": grid.cpu()}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SparK:
        backbone = backbone_from_config(cfg)
        section = cfg.spark
        return cls(
            backbone, cfg.data.img_size, section.mask_ratio, section.decoder_width, section.densify_norm, section.levels
        )

    @staticmethod
    def build_transform(cfg: DictConfig) -> MultiView:
        return MultiView([augment_from_config(cfg)])


def _first_conv_channels(backbone: nn.Module) -> int:
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError(f"SparK: {type(backbone).__name__} has no Conv2d")
    return first.in_channels
