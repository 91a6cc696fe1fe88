"""Step-indexed schedules, precomputed once (as in DINO's ``cosine_scheduler``): ``values[step]``."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine decay to ``final``.

    Returns float64 (total_steps,); the last step takes exactly ``final`` (when there are decay steps).
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps {warmup_steps} not in [0, total_steps={total_steps}]")
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
    """A duration given in (fractional) epochs, as optimizer steps; needs ``pretrain.config.derive`` first."""
    return round(epochs * cfg.derived.steps_per_epoch)
