"""The interface every SSL method implements, and the two config adapters the methods share.

The engine only calls what ``SSLMethod`` declares, so a new method is one file + one line in ``METHODS``:

- ``forward(views, step) -> {"loss": scalar, "embeddings": (B, D) detached, other 0-dim tensors to log}``
- ``param_groups()``: the optimizer's groups (default: decay / no decay; DINOv2: layer-wise lr decay).
- ``before_optimizer_step(step)``: edit gradients after clipping (DINO freezes its last layer).
- ``update_momentum(step)``: EMA teacher / momentum encoder update after the optimizer step.
- ``momentum_modules``: attribute names of the EMA submodules (not trained by the optimizer); DeepSpeed runs keep
  them outside the engine (``medfm.pretrain.backends.deepspeed.keep_momentum_outside_engine``).
- ``export_backbone()``: the module to release (teacher, momentum encoder or encoder).
- ``figures(views)``: pictures to log, ``{name: (3, H, W) in [0, 1]}``.
- ``Config``: the dataclass of its config section, declared beside the method (``medfm.pretrain.config`` adds it to the
  schema under the method's ``METHODS`` key); ``check_config`` validates it.
- ``from_config(cfg)`` / ``build_transform(cfg)``: the only places a method reads the config.
- ``tiny_config``: config overrides that shrink the method to a CPU test's size (a tiny backbone and heads); the tests
  build every method from it, so they need no per-method branches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from medfm.pretrain.backbones import build_backbone, is_vit, use_uniform_drop_path
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.schedules import LINEAR_256, LrScaling, cosine_schedule, epochs_to_steps, linear_warmup_schedule
from medfm.pretrain.transforms import (
    ASYMMETRIC_GLOBAL_BLUR_PROBS,
    MedicalAugment,
    MultiView,
    augment_from_section,
    multi_crop,
    scale_blur_sigma,
)
from medfm.pretrain.weights import load_init, source_normalization

# The smallest ViT that exercises a method: ViT-Tiny's 2 first blocks with 7-px patches at 28 px (16 tokens); a
# forward pass over 100 images takes ~0.1 s on one core.
TINY_VIT: dict[str, Any] = {
    "data.img_size": 28,
    "model.backbone": "vit_tiny_patch16_224",
    "model.backbone_kwargs.patch_size": 7,
    "model.backbone_kwargs.depth": 2,
}


class SSLMethod(nn.Module):
    """Base class of the pretraining objectives (see the module docstring for the contract)."""

    Config: ClassVar[type]  # the dataclass of the method's config section (cfg.<METHODS key>)
    description: ClassVar[str]  # what the model card says: objective, paper, which module is released
    momentum_modules: tuple[str, ...] = ()
    # How optim.base_lr follows the global batch (derived.lr), as the objective's reference code scales it.
    lr_scaling: ClassVar[LrScaling] = LINEAR_256
    # ``key: value`` overrides giving the method a CPU test's size (see the module docstring); extend TINY_VIT.
    tiny_config: ClassVar[dict[str, Any]] = TINY_VIT

    @staticmethod
    def check_config(section: DictConfig, need: Callable[[bool, str, str], None]) -> None:
        """Checks of the method's section that its types cannot express: ``need(ok, key, what)``."""

    @staticmethod
    def resolve_auto(cfg: DictConfig, dataset_size: int) -> list[str]:
        """Replace the section's ``auto`` values by numbers derived from the data (``medfm.pretrain.config.derive``, after
        the step counts); returns ``key=value`` for each value chosen."""
        return []

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        """views: list of (B, C, H, W) batches (one per augmented view); step: optimizer step (for schedules)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The optimizer's groups over trainable parameters: no weight decay on biases and norm weights (ndim <= 1),
        as MAE / DINO. ``lr_scale`` / ``wd_scale`` multiply the step's lr and weight decay (layer-wise decay)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim > 1], "lr_scale": 1.0, "wd_scale": 1.0},
            {"params": [p for p in params if p.ndim <= 1], "lr_scale": 1.0, "wd_scale": 0.0},
        ]

    def before_optimizer_step(self, step: int) -> None:
        """Called after gradient clipping, before ``optimizer.step()``."""

    @torch.no_grad()
    def update_momentum(self, step: int) -> None:
        """Called after each successful optimizer step."""

    def export_backbone(self) -> nn.Module:
        """The timm backbone to release after pretraining."""
        raise NotImplementedError

    @torch.no_grad()
    def figures(self, views: list[Tensor]) -> dict[str, Tensor]:
        """Pictures for the run directory: ``{name: (3, H, W) float in [0, 1]}``; none by default."""
        return {}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SSLMethod:
        """Build from a config on which ``medfm.pretrain.config.derive`` has run (schedules need total steps)."""
        raise NotImplementedError

    @staticmethod
    def build_transform(cfg: DictConfig) -> Callable[[Tensor], list[Tensor]]:
        """image (C, H, W) in [0, 1] -> list of views, the input of ``forward``."""
        raise NotImplementedError


def at_step(schedule: Sequence[float] | np.ndarray, step: int) -> float:
    """``schedule[step]``, holding the last value past the end (a run extended by a few steps)."""
    return float(schedule[min(step, len(schedule) - 1)])


def deterministic_copy(module: nn.Module) -> nn.Module:
    """A deep copy with stochastic depth and dropout off, for an EMA teacher / momentum encoder: its targets must
    not be random (DINO's ``main_dino.py`` builds the teacher without drop path). Same parameters and keys."""
    copied = copy.deepcopy(module)
    for layer in copied.modules():
        if hasattr(layer, "drop_prob"):  # timm's DropPath
            layer.drop_prob = 0.0
        if isinstance(layer, nn.modules.dropout._DropoutNd):
            layer.p = 0.0
    return copied


def backbone_from_config(cfg: DictConfig, dynamic_img_size: bool = False) -> nn.Module:
    """The run's timm backbone, warm-started from ``model.init`` when set (every key loaded, or a LoadError);
    teachers and momentum encoders copied from it start from the same weights."""
    try:
        backbone = build_backbone(
            cfg.model.backbone,
            cfg.data.img_size,
            cfg.data.in_chans,
            dynamic_img_size=dynamic_img_size,
            drop_path_rate=cfg.model.drop_path_rate,
            **cfg.model.backbone_kwargs,
        )
    except TypeError as err:  # timm passes unknown kwargs to the model's constructor
        raise ConfigError(
            f"config key 'model.backbone_kwargs': {cfg.model.backbone} does not take them ({err})"
        ) from None
    except ValueError as err:
        raise ConfigError(f"config key 'model.backbone': {err}") from None
    if is_vit(backbone):
        patch = backbone.patch_embed.patch_size
        if cfg.data.img_size % patch[0] or cfg.data.img_size % patch[1]:
            raise ConfigError(
                f"config key 'data.img_size': {cfg.data.img_size} is not a multiple of the patch size {patch[0]} "
                f"of {cfg.model.backbone}"
            )
    if cfg.model.drop_path_uniform:
        use_uniform_drop_path(backbone, cfg.model.drop_path_rate)
    if cfg.model.init is not None:
        load_init(backbone, cfg.model.init, cfg.model.backbone)
    return backbone


def augment_from_config(
    cfg: DictConfig, size: int | None = None, scale: Sequence[float] | None = None, blur_prob: float | None = None
) -> MedicalAugment:
    """One view's augmentation from ``cfg.augment``; ``size`` / ``scale`` / ``blur_prob`` default to the global
    crop's. ``augment.blur_sigma`` is given at 224 px and scaled by ``data.img_size / 224`` for every view, local
    crops included: they resample the image at about its own pixel scale (DINO: 0.05-0.4 of a 224-px image's area
    resized to 96 px), so DINO / DINOv2 give them the global crops' sigma in pixels too."""
    aug = cfg.augment
    sigma = scale_blur_sigma(aug.blur_sigma, cfg.data.img_size)
    mean, std = aug.mean, aug.std
    if mean is None:  # a config not derived (medfm.pretrain.config.resolve_normalization): the same rule, not stored
        found = source_normalization(cfg.model.init, cfg.model.backbone).for_channels(cfg.data.in_chans)
        mean, std = found.mean, found.std
    return augment_from_section(aug, size or cfg.data.img_size, mean, std, scale, blur_prob=blur_prob, blur_sigma=sigma)


class LastLayerFreeze:
    """DINO's ``cancel_gradients_last_layer`` for the heads' last layers during the first ``steps`` steps.

    ``set_step(step)`` before the forward; ``before_optimizer_step(step)`` drops the gradients (AdamW then leaves
    the layers untouched, no decay either). DeepSpeed steps inside backward, before that call could drop them: a
    gradient hook zeroes them instead while frozen (AdamW then moves nothing but weight decay, which a
    weight-normalised last layer is invariant to; DDP still drops them, exactly as DINO)."""

    def __init__(self, params: Sequence[nn.Parameter], steps: int):
        self.params, self.steps, self.frozen = [p for p in params if p.requires_grad], steps, False
        for param in self.params:
            param.register_hook(lambda grad: torch.zeros_like(grad) if self.frozen else grad)

    def set_step(self, step: int) -> None:
        self.frozen = step < self.steps

    def before_optimizer_step(self, step: int) -> None:
        if step < self.steps:
            for param in self.params:
                param.grad = None


def global_views_from_config(cfg: DictConfig, num_global: int) -> list[MedicalAugment]:
    """The global crops' augmentations: with ``augment.asymmetric_blur`` and two global crops, DINO's asymmetric
    pair (blur probability 1.0 on the first, 0.1 on the second); otherwise ``num_global`` alike, at
    ``augment.blur_prob``."""
    if cfg.augment.asymmetric_blur and num_global == len(ASYMMETRIC_GLOBAL_BLUR_PROBS):
        return [augment_from_config(cfg, blur_prob=p) for p in ASYMMETRIC_GLOBAL_BLUR_PROBS]
    return [augment_from_config(cfg)] * num_global


def multi_crop_from_config(cfg: DictConfig, section: str, num_global: int = 2) -> MultiView:
    """DINO-style multi-crop from ``cfg.augment`` (global crops, ``global_views_from_config``) and ``cfg.<section>``
    (``local_crop_size``, ``local_crop_scale``, ``num_local_crops``; blurred at ``augment.blur_prob``): the global
    views first, then the local ones."""
    local = cfg[section]
    local_view = augment_from_config(cfg, size=local.local_crop_size, scale=local.local_crop_scale)
    return multi_crop(global_views_from_config(cfg, num_global), local_view, local.num_local_crops)


def check_local_crops(backbone: nn.Module, cfg: DictConfig, section: str) -> None:
    """A ViT's local crops must be a whole number of patches (``cfg.<section>.local_crop_size``)."""
    local = cfg[section]
    if is_vit(backbone) and local.num_local_crops > 0:
        patch = backbone.patch_embed.patch_size[0]
        if local.local_crop_size % patch:
            raise ConfigError(
                f"config key '{section}.local_crop_size': {local.local_crop_size} is not a multiple of the patch size {patch}"
            )


def teacher_schedules(cfg: DictConfig, section: str) -> dict[str, Any]:
    """DINO-family schedules from ``cfg.<section>``, per optimizer step: the EMA momentum (cosine from
    ``momentum_teacher`` to 1), the teacher temperature (linear warm-up from ``warmup_teacher_temp`` over
    ``warmup_teacher_temp_epochs``) and the number of steps the heads' last layers stay frozen."""
    d, total = cfg[section], cfg.derived.total_steps
    return {
        "momentum_schedule": cosine_schedule(d.momentum_teacher, 1.0, total),
        "teacher_temp_schedule": linear_warmup_schedule(
            d.warmup_teacher_temp, d.teacher_temp, total, epochs_to_steps(cfg, d.warmup_teacher_temp_epochs)
        ),
        "freeze_last_layer_steps": epochs_to_steps(cfg, d.freeze_last_layer_epochs),
    }


def outside_autocast(device: torch.device) -> torch.autocast:
    """A region that runs in the inputs' precision whatever the step's autocast: SSL losses whose centring and
    nearest-neighbour search must see fp32 (the references turn autocast off there; under bf16 KoLeo picked the
    true nearest neighbour 8 % of the time on clustered embeddings, and DINO's centre was averaged in bf16)."""
    return torch.autocast(device.type, enabled=False)
