"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", 2020).

Two augmented views, lightly's ``SimCLRProjectionHead`` and ``NTXentLoss`` with negatives gathered from all
processes (``gather_distributed=True``: the effective batch of negatives is the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from omegaconf import DictConfig
from torch import Tensor, nn

from medfm.pretrain.backbones import pooled_features
from medfm.pretrain.methods.base import TINY_VIT, SSLMethod, augment_from_config, backbone_from_config
from medfm.pretrain.transforms import MultiView


@dataclass
class SimCLRConfig:
    """The ``simclr:`` config section."""

    hidden_dim: int = 2048
    output_dim: int = 128
    num_layers: int = 2
    temperature: float = 0.1


class SimCLR(SSLMethod):
    """Args: backbone (any timm model without classifier), projection head sizes, NT-Xent temperature."""

    Config = SimCLRConfig
    description = "SimCLR contrastive learning (Chen et al. 2020); released: the backbone (projection head dropped)"
    tiny_config: ClassVar[dict[str, Any]] = {**TINY_VIT, "simclr.hidden_dim": 64, "simclr.output_dim": 32}

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_layers: int = 2,
        temperature: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.num_features, hidden_dim, output_dim, num_layers)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        """views: two (B, C, H, W) -> NT-Xent loss; embeddings: backbone features of the first view (B, D)."""
        batch_size = views[0].shape[0]
        features = pooled_features(self.backbone, torch.cat(views[:2]))
        z0, z1 = self.projection_head(features).chunk(2)
        return {"loss": self.criterion(z0, z1), "embeddings": features[:batch_size].detach()}

    def export_backbone(self) -> nn.Module:
        return self.backbone

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SimCLR:
        s = cfg.simclr
        return cls(backbone_from_config(cfg), s.hidden_dim, s.output_dim, s.num_layers, s.temperature)

    @staticmethod
    def build_transform(cfg: DictConfig) -> MultiView:
        view = augment_from_config(cfg)
        return MultiView([view, view])
