"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", 2021).

Query encoder = backbone + projection MLP + prediction MLP; key encoder = EMA of backbone + projection (cosine
momentum schedule to 1.0, no drop path); symmetric InfoNCE with keys gathered from all processes, scaled by 2 tau
as in the reference code. The heads follow the reference ``moco/builder.py`` ``_build_mlp`` with lightly's
``ProjectionHead``: bias-free linear layers, BN + ReLU between them, a final ``BatchNorm1d(affine=False)``;
projector 3 layers (ViT) / 2 (CNN), predictor 2 layers with the final BN for ViTs only (``last_bn=False`` for
ResNets). Deviation from the paper: the ViT patch projection is not frozen (the paper's stability trick).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils import dist
from omegaconf import DictConfig
from torch import Tensor, nn

from medfm.pretrain.backbones import is_vit, pooled_features
from medfm.pretrain.methods.base import (
    TINY_VIT,
    SSLMethod,
    at_step,
    backbone_from_config,
    deterministic_copy,
    global_views_from_config,
)
from medfm.pretrain.schedules import cosine_schedule
from medfm.pretrain.transforms import MultiView


def mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool) -> ProjectionHead:
    """MoCo v3's ``_build_mlp``: (Linear without bias, BN, ReLU) x (num_layers - 1), Linear without bias, and a
    final ``BatchNorm1d(affine=False)`` when ``last_bn`` (SimCLR's design, gamma removed)."""
    blocks = [
        (input_dim if layer == 0 else hidden_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(), False)
        for layer in range(num_layers - 1)
    ]
    last_norm = nn.BatchNorm1d(output_dim, affine=False) if last_bn else None
    return ProjectionHead([*blocks, (hidden_dim if num_layers > 1 else input_dim, output_dim, last_norm, None, False)])


class MoCoV3Loss(nn.Module):
    """InfoNCE of queries against all keys of the global batch: ``2 tau * CE(q k_all^T / tau, own index)``.

    Keys carry no gradient, so gathering them with lightly's autograd-aware ``dist.gather`` is exact.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        """query (B, D), key (B, D) -> scalar loss."""
        query = F.normalize(query, dim=1)
        key = F.normalize(key, dim=1)
        keys = torch.cat(dist.gather(key)) if dist.world_size() > 1 else key
        logits = query @ keys.T / self.temperature
        labels = torch.arange(query.shape[0], device=query.device) + dist.rank() * query.shape[0]
        return F.cross_entropy(logits, labels) * 2 * self.temperature


@dataclass
class MoCoConfig:
    """The ``moco:`` config section."""

    hidden_dim: int = 4096
    output_dim: int = 256
    temperature: float = 0.2
    momentum: float = 0.99  # cosine schedule from this to 1.0 over training


class MoCo(SSLMethod):
    """MoCo v3. Args: backbone (any timm model), momentum per optimizer step, MLP sizes, temperature."""

    Config = MoCoConfig
    description = "MoCo v3 contrastive learning (Chen et al. 2021); released: the momentum encoder"
    tiny_config: ClassVar[dict[str, Any]] = {**TINY_VIT, "moco.hidden_dim": 64, "moco.output_dim": 32}

    momentum_modules = ("backbone_momentum", "projection_head_momentum")

    def __init__(
        self,
        backbone: nn.Module,
        momentum_schedule: Sequence[float] | np.ndarray,
        hidden_dim: int = 4096,
        output_dim: int = 256,
        temperature: float = 0.2,
    ):
        super().__init__()
        self.backbone = backbone
        vit = is_vit(backbone)
        self.projection_head = mlp(3 if vit else 2, backbone.num_features, hidden_dim, output_dim, last_bn=True)
        self.prediction_head = mlp(2, output_dim, hidden_dim, output_dim, last_bn=vit)
        self.backbone_momentum = deterministic_copy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)  # no dropout in the heads
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = MoCoV3Loss(temperature)
        self.momentum_schedule = np.asarray(momentum_schedule, dtype=np.float64)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        """views: two (B, C, H, W) -> symmetric loss ctr(q1, k2) + ctr(q2, k1); embeddings: (B, D) of view 1."""
        batch_size = views[0].shape[0]
        images = torch.cat(views[:2])
        features = pooled_features(self.backbone, images)
        q1, q2 = self.prediction_head(self.projection_head(features)).chunk(2)
        with torch.no_grad():
            k1, k2 = self.projection_head_momentum(pooled_features(self.backbone_momentum, images)).chunk(2)
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        return {"loss": loss, "embeddings": features[:batch_size].detach()}

    @torch.no_grad()
    def update_momentum(self, step: int) -> None:
        momentum = at_step(self.momentum_schedule, step)
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)

    def export_backbone(self) -> nn.Module:
        return self.backbone_momentum

    @classmethod
    def from_config(cls, cfg: DictConfig) -> MoCo:
        m = cfg.moco
        return cls(
            backbone_from_config(cfg),
            momentum_schedule=cosine_schedule(m.momentum, 1.0, cfg.derived.total_steps),
            hidden_dim=m.hidden_dim,
            output_dim=m.output_dim,
            temperature=m.temperature,
        )

    @staticmethod
    def build_transform(cfg: DictConfig) -> MultiView:
        # MoCo v3's reference (main_moco.py): blur on the first view always, on the second with probability 0.1
        # (augment.asymmetric_blur, as DINO's global crops; without its solarization)
        return MultiView(global_views_from_config(cfg, 2))
