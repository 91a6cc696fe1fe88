"""Backbones by timm name, used only through timm's public interface.

``num_features``, ``forward_features`` and ``forward_head(pre_logits=True)``: nothing else of a backbone is
touched here, so any timm classifier (ViT, ResNet, ConvNeXt...) works with the contrastive and DINO objectives.
Input channels are native (``in_chans=1`` builds a 1-channel stem; gray is never copied to 3 channels).
Downstream code rebuilds backbones through ``build_backbone`` to load released weights.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import timm
import torch
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


POOLINGS = ("head", "layers")


def layer_features(backbone: nn.Module, images: Tensor, layers: int = 4) -> Tensor:
    """(B, C, H, W) -> (B, D): features of the last ``layers`` blocks / stages, concatenated.

    ViTs: the (normed) class token of each of the last ``layers`` blocks and the mean patch token of the last one,
    as DINO's linear evaluation of ViT-S (``n_last_blocks=4``, ``avgpool_patchtokens``); without a class token,
    each block's mean patch token. Other models (ResNet, ConvNeXt, ...): the global-average-pooled feature map of
    each of the last ``layers`` stages (timm's ``forward_intermediates``). Earlier layers keep the less invariant
    texture and intensity cues that small medical images are classified by.
    """
    if not hasattr(backbone, "forward_intermediates"):
        raise ValueError(f"{type(backbone).__name__} has no forward_intermediates: use pooling 'head'")
    # a model with fewer blocks / stages than asked gives all it has
    available = len(backbone.blocks) if is_vit(backbone) else len(getattr(backbone, "feature_info", ())) or layers
    layers = min(layers, available)
    if is_vit(backbone):
        maps = backbone.forward_intermediates(
            images, indices=layers, return_prefix_tokens=True, norm=True, intermediates_only=True
        )
        # (patch map, prefix tokens) per block; timm gives the bare map when the model has no prefix tokens
        pairs = [item if isinstance(item, tuple) else (item, None) for item in maps]
        if getattr(backbone, "cls_token", None) is not None:
            pooled = [prefix[:, 0] for _, prefix in pairs] + [pairs[-1][0].mean(dim=(2, 3))]
        else:
            pooled = [spatial.mean(dim=(2, 3)) for spatial, _ in pairs]
        return torch.cat(pooled, dim=1)
    maps = backbone.forward_intermediates(images, indices=layers, intermediates_only=True)
    return torch.cat([m.mean(dim=(2, 3)) if m.ndim == 4 else m.flatten(1) for m in maps], dim=1)


def feature_function(pooling: str, layers: int = 4) -> Callable[[nn.Module, Tensor], Tensor]:
    """``pooled_features`` ("head") or ``layer_features`` ("layers") as ``f(backbone, images)``."""
    if pooling == "head":
        return pooled_features
    if pooling == "layers":
        return partial(layer_features, layers=layers)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def is_vit(backbone: nn.Module) -> bool:
    """True for timm ``VisionTransformer`` models (what the token-masking objectives need)."""
    return isinstance(backbone, VisionTransformer)
