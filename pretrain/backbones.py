"""Backbones by timm name, used only through timm's public interface.

``num_features``, ``forward_features`` and ``forward_head(pre_logits=True)``: nothing else of a backbone is
touched here, so any timm classifier (ViT, ResNet, ConvNeXt...) works with the contrastive and DINO objectives.
Input channels are native (``in_chans=1`` builds a 1-channel stem; gray is never copied to 3 channels).
Downstream code rebuilds backbones through ``build_backbone`` to load released weights.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import VisionTransformer
from torch import Tensor, nn

# timm kwargs only models with a fixed token grid take; size-agnostic models (CNNs) reject them.
_SIZE_KWARGS = ("img_size", "dynamic_img_size")


def build_backbone(
    name: str, img_size: int, in_chans: int = 1, *, dynamic_img_size: bool = False, **kwargs: Any
) -> nn.Module:
    """A randomly initialised timm model without classifier (``num_classes=0``); never downloads weights.

    Args:
        name: timm model name, e.g. ``vit_small_patch16_224`` or ``resnet50``.
        img_size: training image side; sets the position-embedding grid of ViTs, ignored by CNNs.
        in_chans: input channels (1 for gray: a native 1-channel stem).
        dynamic_img_size: ViTs accept other sizes than ``img_size`` (DINO local crops); ignored by CNNs.
        kwargs: passed to ``timm.create_model`` (e.g. ``patch_size=8``, ``depth=2``, ``drop_path_rate``).

    Returns:
        a module with ``num_features``; ``pooled_features(model, x)`` maps (B, in_chans, H, W) -> (B, num_features).
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    common = {"pretrained": False, "num_classes": 0, "in_chans": in_chans, **kwargs}
    size = {"img_size": img_size, "dynamic_img_size": dynamic_img_size}
    try:
        return timm.create_model(name, **common, **size)
    except TypeError as err:
        if not any(key in str(err) for key in _SIZE_KWARGS):
            raise
    return timm.create_model(name, **common)


def pooled_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, num_features): timm's pooled pre-logits features."""
    return backbone.forward_head(backbone.forward_features(images), pre_logits=True)


def is_vit(backbone: nn.Module) -> bool:
    """True for timm ``VisionTransformer`` models (what the token-masking objectives need)."""
    return isinstance(backbone, VisionTransformer)
