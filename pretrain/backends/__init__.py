"""Training backends: the one interface behind which plain / DDP and DeepSpeed runs differ (``base`` documents it).

``backend_for(accelerator, cfg)`` picks the run's backend from its Accelerator.
"""

from __future__ import annotations

from accelerate import Accelerator
from omegaconf import DictConfig

from medfm.pretrain.backends.base import TrainingBackend
from medfm.pretrain.backends.deepspeed import DeepSpeedBackend, uses_deepspeed

__all__ = ["DeepSpeedBackend", "TrainingBackend", "backend_for"]


def backend_for(accelerator: Accelerator, cfg: DictConfig | None = None) -> TrainingBackend:
    """The backend of a run: DeepSpeed when the Accelerator was built with its plugin, else plain / DDP."""
    return (DeepSpeedBackend if uses_deepspeed(accelerator) else TrainingBackend)(accelerator, cfg)
