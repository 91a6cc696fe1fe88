"""Backbones by timm name, used only through timm's public interface.

``num_features``, ``forward_features`` and ``forward_head(pre_logits=True)``: nothing else of a backbone is
touched here, so any timm classifier (ViT, ResNet, ConvNeXt...) works with the contrastive and DINO objectives.
Input channels are native (``in_chans=1`` builds a 1-channel stem; gray is never copied to 3 channels).
``small_image_stem=True`` gives a timm ResNet SimCLR's CIFAR stem for inputs of <= ~32 px (ViTs ignore it;
:func:`use_small_image_stem`); it is medfm's own model argument, not timm's.
Downstream code rebuilds backbones through ``build_backbone`` to load released weights.

A user's own ``nn.Module`` (``medfm.pretrain(model=module)``) is registered under an architecture name
``module:NAME`` (``register_module``) and built from then on, in this process, as a copy of the module as it was
given; a module without timm's interface is wrapped in ``ModuleBackbone``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import timm
import torch
from timm.layers import DropPath
from timm.models import ResNet, VisionTransformer
from torch import Tensor, nn

from medfm.pretrain.errors import ConfigError, InputError

# timm kwargs only models with a fixed token grid take; size-agnostic models (CNNs) reject them.
_SIZE_KWARGS = ("img_size", "dynamic_img_size")
MODULE_PREFIX = "module:"
# medfm's model argument (in model.backbone_kwargs and a release's model_args) for SimCLR's small-image stem.
SMALL_IMAGE_STEM = "small_image_stem"
_registered: dict[str, nn.Module] = {}  # NAME of "module:NAME" -> the module as the user gave it (a copy)


class ModuleBackbone(nn.Module):
    """timm's backbone interface around any module mapping (B, C, H, W) images to (B, D) features or to a
    (B, D, h, w) feature map (average-pooled): ``num_features``, ``forward_features``, ``forward_head`` and a
    classifier that ``reset_classifier`` adds for fine-tuning. The user's module is ``self.model``."""

    def __init__(self, model: nn.Module, num_features: int):
        super().__init__()
        self.model = model
        self.num_features = num_features
        self.num_classes = 0
        self.head: nn.Module = nn.Identity()
        self.pretrained_cfg = {"classifier": "head"}

    def forward_features(self, images: Tensor) -> Tensor:
        features = self.model(images)
        return features.mean(dim=(2, 3)) if features.ndim == 4 else features.flatten(1)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def register_module(module: nn.Module, name: str | None = None) -> str:
    """Register a user's backbone; returns its architecture name ``module:NAME`` (default NAME: the class name).

    Every ``build_backbone("module:NAME", ...)`` in this process returns a fresh copy of the module as it is now
    (its weights are the "random init" of that architecture). Registering another module under a taken name
    replaces it."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"a backbone must be a torch.nn.Module, got {type(module).__name__}")
    name = name or type(module).__name__
    _registered[name] = copy.deepcopy(module).cpu()
    return MODULE_PREFIX + name


def _build_registered(name: str, img_size: int, in_chans: int) -> nn.Module:
    """A copy of a registered module, given timm's interface and checked on one (2, in_chans, img_size²) batch."""
    key = name.removeprefix(MODULE_PREFIX)
    if key not in _registered:
        raise ConfigError(
            f"{name!r} is a user module that is not registered in this process: pass it again "
            f"(medfm.pretrain(model=...), medfm.register_module(module, {key!r}))"
        )
    model = copy.deepcopy(_registered[key])
    timm_like = all(hasattr(model, a) for a in ("num_features", "forward_features", "forward_head"))
    if timm_like and getattr(model, "num_classes", 0):
        model.reset_classifier(0)  # medfm trains and releases backbones without classifier
    probe = model if timm_like else ModuleBackbone(model, num_features=0)
    was_training = probe.training
    try:
        with torch.no_grad():
            features = pooled_features(probe.eval(), torch.zeros(2, in_chans, img_size, img_size))
    except Exception as err:
        raise InputError(f"{name}: the module fails on a (2, {in_chans}, {img_size}, {img_size}) batch: {err}") from err
    finally:
        probe.train(was_training)
    if features.ndim != 2 or features.shape[0] != 2:
        raise InputError(
            f"{name}: the module must give (B, D) features or a (B, D, h, w) map, got {tuple(features.shape)}"
        )
    if timm_like:
        return model
    return ModuleBackbone(model, num_features=int(features.shape[1]))


def build_backbone(
    name: str, img_size: int, in_chans: int = 1, *, dynamic_img_size: bool = False, **kwargs: Any
) -> nn.Module:
    """A randomly initialised timm model without classifier (``num_classes=0``); never downloads weights.

    Args:
        name: timm model name, e.g. ``vit_small_patch16_224`` or ``resnet50``.
        img_size: training image side; sets the position-embedding grid of ViTs, ignored by CNNs.
        in_chans: input channels (1 for gray: a native 1-channel stem).
        dynamic_img_size: ViTs accept other sizes than ``img_size`` (DINO local crops); ignored by CNNs.
        kwargs: passed to ``timm.create_model`` (e.g. ``patch_size=8``, ``depth=2``, ``drop_path_rate``), except
            ``small_image_stem`` (medfm's: :func:`use_small_image_stem` after timm builds the model); a
            registered ``module:NAME`` takes none (its own constructor set them).

    Returns:
        a module with ``num_features``; ``pooled_features(model, x)`` maps (B, in_chans, H, W) -> (B, num_features).
    """
    small_image_stem = kwargs.pop(SMALL_IMAGE_STEM, False)
    if not isinstance(small_image_stem, bool):
        raise ConfigError(f"{SMALL_IMAGE_STEM} must be true or false, got {small_image_stem!r}")
    if name.startswith(MODULE_PREFIX):
        if small_image_stem:
            raise ConfigError(f"{name}: {SMALL_IMAGE_STEM} applies to timm ResNets, not to a user module")
        unused = {k: v for k, v in kwargs.items() if k != "drop_path_rate"}
        if unused:  # timm's own message for a kwarg a model does not take
            raise TypeError(f"{name}.__init__() got unexpected keyword arguments {sorted(unused)}")
        return _build_registered(name, img_size, in_chans)
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r} (see timm.list_models())")
    common = {"pretrained": False, "num_classes": 0, "in_chans": in_chans, **kwargs}
    size = {"img_size": img_size, "dynamic_img_size": dynamic_img_size}
    try:
        model = timm.create_model(name, **common, **size)
    except TypeError as err:
        if not any(key in str(err) for key in _SIZE_KWARGS):
            raise
        model = timm.create_model(name, **common)
    return use_small_image_stem(model) if small_image_stem else model


def use_uniform_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """DINOv2's ``drop_path_uniform``: every ViT block drops its residual branches with probability ``rate``
    (timm ramps it linearly from 0 at the first block to ``rate`` at the last), in place; returns ``model``.
    ``DropPath`` holds no weights: the state dict and a release are unchanged."""
    if not is_vit(model):
        raise ConfigError(
            f"config key 'model.drop_path_uniform': applies to ViTs (timm VisionTransformer), not {type(model).__name__}"
        )
    if rate > 0:
        for block in model.blocks:
            block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)
    return model


def use_small_image_stem(model: nn.Module) -> nn.Module:
    """SimCLR's stem for CIFAR-size inputs (Chen et al. 2020, appendix B.9): ``conv1`` becomes a 3x3 stride-1
    convolution and the stem's max-pool is removed, in place; returns ``model``.

    timm's ImageNet stem (7x7 stride-2 conv + stride-2 max-pool) divides the side by 32 overall, leaving a 1x1
    final feature map at 28 px; with this stem the division is 8 (28 px -> 4x4). No ``timm.create_model``
    argument builds it (``stem_type="deep"`` and ``replace_stem_pool`` still stride by 4), so it is applied after
    timm builds the model. The state-dict keys stay those of timm's model; only ``conv1.weight`` changes shape
    (kxk -> 3x3). Plain timm reproduces it with the same two lines::

        model.conv1 = torch.nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()

    A ViT is returned unchanged, as ``img_size`` is ignored by CNNs: its small-image setting is the patch size,
    and a ResNet recipe run with a ViT (``model.backbone=vit_...``) keeps working. Any other model is refused.
    """
    if is_vit(model):
        return model
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not (isinstance(model, ResNet) and isinstance(conv, nn.Conv2d) and isinstance(pool, nn.MaxPool2d)):
        raise ConfigError(
            f"{SMALL_IMAGE_STEM} applies to timm ResNets with a one-convolution stem and a max-pool (resnet18, "
            f"resnet50, seresnet, resnext...), not to this {type(model).__name__}"
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet init
    model.maxpool = nn.Identity()
    # feature_info's reductions describe the new strides (the stem's stride 2 x 2 is gone)
    for info in model.feature_info:
        info["reduction"] = max(1, info["reduction"] // (2 if info["module"] == "act1" else 4))
    return model


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
        raise ConfigError(f"{type(backbone).__name__} has no forward_intermediates: use pooling 'head'")
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
    raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def is_vit(backbone: nn.Module) -> bool:
    """True for timm ``VisionTransformer`` models (what the token-masking objectives need)."""
    return isinstance(backbone, VisionTransformer)
