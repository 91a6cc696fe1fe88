"""Step-indexed schedules, precomputed once (as in DINO's ``cosine_scheduler``): ``values[step]``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig

from medfm.pretrain.errors import ConfigError


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine decay to ``final``.

    Returns float64 (total_steps,); the last step takes exactly ``final`` (when there are decay steps).
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"warmup_steps {warmup_steps} not in [0, total_steps={total_steps}]")
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    decay_steps = total_steps - warmup_steps
    progress = np.arange(decay_steps) / max(1, decay_steps - 1)
    decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay])


def linear_warmup_schedule(start: float, end: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then constant ``end`` (DINO teacher temperature)."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(start, end, warmup_steps, endpoint=False)
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, end)])


def epochs_to_steps(cfg: DictConfig, epochs: float) -> int:
    """A duration given in (fractional) epochs, as optimizer steps; needs ``medfm.pretrain.config.derive`` first."""
    return round(epochs * cfg.derived.steps_per_epoch)


@dataclass(frozen=True)
class LrScaling:
    """How the peak learning rate follows the global batch: ``base_lr x (global_batch / reference_batch) ** power``.

    ``base_lr`` is then the learning rate at ``reference_batch``, as each objective's reference code states it."""

    rule: str  # what the saved config and the run log call it
    reference_batch: int
    power: float

    def lr(self, base_lr: float, global_batch: int) -> float:
        return base_lr * (global_batch / self.reference_batch) ** self.power


# Linear (Goyal et al. 2017): MAE, DINO, MoCo v3, SimCLR and MAE's fine-tuning (``blr x eff_batch / 256``).
LINEAR_256 = LrScaling("linear x batch / 256", 256, 1.0)
# Square root wrt 1024: DINOv2 (``ssl_default_config.yaml`` ``scaling_rule: sqrt_wrt_1024``, base_lr 0.004), as
# LightlyTrain's DINOv2. Linear scaling from 256 gives ViT-S at batch 64 1.25e-4 where DINOv2 gives 1e-3.
SQRT_1024 = LrScaling("sqrt x (batch / 1024)", 1024, 0.5)


def derive_steps(
    *,
    batch_size: int,
    world_size: int,
    grad_accum: int,
    samples: int,
    base_lr: float,
    epochs: float,
    warmup_epochs: float,
    max_steps: int | None = None,
    lr_scaling: LrScaling = LINEAR_256,
) -> dict[str, Any]:
    """Every number of a run computed from other numbers, for pretraining and fine-tuning alike.

    global_batch = batch_size x world_size x grad_accum; lr = ``lr_scaling.lr(base_lr, global_batch)`` (the
    objective's rule: linear from 256 for most, square root from 1024 for DINOv2); an epoch is ``samples`` rounded
    down to whole optimizer steps; ``max_steps`` caps the total; every schedule is indexed by the optimizer step.
    """
    global_batch = batch_size * world_size * grad_accum
    steps_per_epoch = samples // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config key 'train.batch_size': global batch {global_batch} (batch_size {batch_size} x "
            f"{world_size} processes x grad_accum {grad_accum}) exceeds the {samples} samples per epoch"
        )
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    return {
        "world_size": world_size,
        "global_batch": global_batch,
        "lr": lr_scaling.lr(base_lr, global_batch),
        "lr_scaling": lr_scaling.rule,
        "samples_per_epoch": samples,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": min(total_steps, round(warmup_epochs * steps_per_epoch)),
    }
