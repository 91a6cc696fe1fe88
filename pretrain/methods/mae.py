"""MAE: masked autoencoder on a timm ViT (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2022).

Encoder: lightly's ``MaskedVisionTransformerTIMM`` around the timm ViT (sees only the kept patches);
decoder: lightly's ``MaskedVisionTransformerDecoderTIMM`` (fixed sin-cos positions) between our own input
projection and pixel prediction head, following facebookresearch/mae ``models_mae.py``. The loss is the MSE on
masked patches only, optionally against per-patch normalised pixels (``norm_pix_loss``, the paper's default).
Medical recipe (Xiao et al. 2023, chest X-ray): mask ratio 0.90, random-resized-crop scale 0.5-1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.utils import make_grid

from medfm.pretrain.backbones import is_vit
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.methods.base import TINY_VIT, SSLMethod, augment_from_config, backbone_from_config
from medfm.pretrain.transforms import MultiView


@dataclass
class MAEConfig:
    """The ``mae:`` config section."""

    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16


class MAE(SSLMethod):
    """Masked autoencoder.

    Args:
        backbone: a timm ``VisionTransformer`` (built with ``num_classes=0``); anything else raises ValueError.
        mask_ratio: fraction of patches hidden from the encoder.
        norm_pix_loss: regress per-patch normalised pixels (mean 0, var 1 per patch).
        decoder_dim, decoder_depth, decoder_heads: the light decoder's width, blocks and heads.
    """

    Config = MAEConfig
    description = "masked autoencoding (He et al. 2022); released: the ViT encoder (decoder dropped)"
    tiny_config: ClassVar[dict[str, Any]] = {
        **TINY_VIT,
        "mae.decoder_dim": 32,
        "mae.decoder_depth": 1,
        "mae.decoder_heads": 2,
    }

    @staticmethod
    def check_config(section, need) -> None:
        need(0.0 <= section.mask_ratio < 1.0, "mask_ratio", "must be in [0, 1)")

    def __init__(
        self,
        backbone: nn.Module,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        initialize_encoder: bool = True,
    ):
        super().__init__()
        if not is_vit(backbone):
            raise ConfigError(
                f"MAE needs a timm VisionTransformer backbone (e.g. vit_small_patch16_224), got "
                f"{type(backbone).__name__}: masking drops patch tokens, which a CNN does not have. "
                "Use dino, simclr or moco for CNN backbones."
            )
        patch = backbone.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ConfigError(f"MAE needs square patches, got {patch}")
        self.patch_size = patch[0]
        self.in_chans = backbone.patch_embed.proj.in_channels
        self.num_patches = backbone.patch_embed.num_patches
        self.num_prefix = backbone.num_prefix_tokens
        self.num_keep = int(self.num_patches * (1 - mask_ratio))
        if self.num_keep < 1:
            raise ConfigError(f"mask_ratio {mask_ratio} keeps no patch of {self.num_patches}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        # MaskedVisionTransformerTIMM re-initialises the ViT as in MAE (xavier, fixed sin-cos positions), unless the
        # encoder was warm-started (model.init): then its weights are kept and only the decoder is new.
        keep = "skip" if not initialize_encoder else None
        self.encoder = MaskedVisionTransformerTIMM(
            vit=backbone, weight_initialization=keep or "", pos_embed_initialization=keep or "sincos"
        )
        # The encoder drops masked tokens rather than replacing them: its mask token is unused, and an unused
        # trainable parameter would break DDP's gradient reduction.
        self.encoder.mask_token.requires_grad_(False)
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches,
            embed_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            num_prefix_tokens=self.num_prefix,
        )
        self.prediction_head = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)

    def random_mask(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Token indices (prefix tokens included, always kept): keep (B, P + K), mask (B, N - K)."""
        keep, mask = utils.random_token_mask(
            (batch_size, self.num_patches), mask_ratio=self.mask_ratio, mask_class_token=True, device=device
        )
        prefix = torch.arange(self.num_prefix, device=device).expand(batch_size, -1)
        return torch.cat([prefix, keep + self.num_prefix], dim=1), mask + self.num_prefix

    def reconstruct(self, images: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W) -> (predicted masked patches (B, M, p*p*C), encoder output (B, P + K, D))."""
        encoded = self.encoder.encode(images, idx_keep=idx_keep)
        tokens = self.decoder_embed(encoded)
        batch_size, sequence = images.shape[0], self.num_prefix + self.num_patches
        full = utils.repeat_token(self.decoder.mask_token, (batch_size, sequence)).to(tokens.dtype)
        full = utils.set_at_index(full, idx_keep, tokens)
        decoded = self.decoder.decode(self.decoder.add_pos_embed(full))
        return self.prediction_head(utils.get_at_index(decoded, idx_mask)), encoded

    def targets(self, images: Tensor, idx_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Masked patches (B, M, p*p*C) as regressed, with their per-patch mean and std (B, M, 1)."""
        patches = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - self.num_prefix)
        if not self.norm_pix_loss:
            return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (patches - mean) / std, mean, std

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        """views: [(B, C, H, W)] -> loss: mean squared error over the masked patches."""
        images = views[0]
        idx_keep, idx_mask = self.random_mask(images.shape[0], images.device)
        prediction, encoded = self.reconstruct(images, idx_keep, idx_mask)
        target, _, _ = self.targets(images, idx_mask)
        loss = F.mse_loss(prediction.float(), target.float())
        pooled = encoded[:, 0] if self.num_prefix else encoded.mean(dim=1)
        return {"loss": loss, "embeddings": pooled.detach()}

    def export_backbone(self) -> nn.Module:
        return self.encoder.vit

    @torch.no_grad()
    def figures(self, views: list[Tensor]) -> dict[str, Tensor]:
        """Rows: masked input, reconstruction (visible patches + predictions), original; up to 8 images."""
        images = views[0][:8].float()
        idx_keep, idx_mask = self.random_mask(images.shape[0], images.device)
        prediction, _ = self.reconstruct(images, idx_keep, idx_mask)
        prediction = prediction.float()  # bf16 under the backend's inference autocast; the pictures are fp32
        _, mean, std = self.targets(images, idx_mask)
        patches = utils.patchify(images, self.patch_size)
        index = idx_mask - self.num_prefix
        masked = utils.set_at_index(patches, index, torch.zeros_like(prediction) + images.min())
        recon = utils.set_at_index(patches, index, prediction * std + mean)
        rows = [utils.unpatchify(p, self.patch_size, self.in_chans) for p in (masked, recon, patches)]
        grid = torch.cat(rows).clamp(images.min(), images.max())
        grid = make_grid(grid, nrow=images.shape[0], normalize=True, value_range=(images.min(), images.max()))
        return {"mae_reconstruction": grid.cpu()}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> MAE:
        backbone = backbone_from_config(cfg)
        if not is_vit(backbone):
            raise ConfigError(
                f"config key 'model.backbone': MAE needs a timm VisionTransformer, {cfg.model.backbone!r} is a "
                f"{type(backbone).__name__}; use method=dino, simclr or moco for CNN backbones"
            )
        return cls(
            backbone,
            mask_ratio=cfg.mae.mask_ratio,
            norm_pix_loss=cfg.mae.norm_pix_loss,
            decoder_dim=cfg.mae.decoder_dim,
            decoder_depth=cfg.mae.decoder_depth,
            decoder_heads=cfg.mae.decoder_heads,
            # A resumed warm-started run is rebuilt without reading model.init (its weights are in the checkpoint):
            # derived.init_sha256 says it was warm-started, so the encoder is built alike (learned positions).
            initialize_encoder=cfg.model.init is None and cfg.derived.init_sha256 is None,
        )

    @staticmethod
    def build_transform(cfg: DictConfig) -> MultiView:
        return MultiView([augment_from_config(cfg)])
