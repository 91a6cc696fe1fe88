"""A pretraining run directory rebuilt: the method from its newest checkpoint (or one named), and the backbone it
releases. Beside the checkpoint store it reads (``checkpoint``, ``backends.zero_checkpoint``); the release format
(``medfm.pretrain.release``) and the backends build on it.

A run directory holds ``config.yaml`` (:data:`RUN_CONFIG`), its checkpoints (``last.pt``, ``step-XXXXXXX.pt``, or
DeepSpeed ``step-XXXXXXX/`` folders) and, once finished, ``release/`` (:data:`RELEASE_DIR`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.backends import zero_checkpoint
from medfm.pretrain.config import PretrainConfig, migrate_legacy_keys
from medfm.pretrain.errors import ConfigError, ExportError
from medfm.pretrain.methods import METHODS
from medfm.pretrain.weights import check_keys

RELEASE_DIR = "release"  # what a finished pretraining run writes in its run directory

RUN_CONFIG = "config.yaml"  # what marks a pretraining run directory
STEP_NAME = re.compile(r"step-(\d+)(\.pt)?")  # step-XXXXXXX.pt files, DeepSpeed step-XXXXXXX/ folders


@dataclass(frozen=True)
class RunBackbone:
    """The backbone to release from a run, with what describes it."""

    backbone: nn.Module  # in eval mode (on the CPU when read from a checkpoint)
    module_name: str  # attribute path inside the method, e.g. "teacher_backbone" or "encoder.vit"
    config: DictConfig  # the run's resolved config (derived values included)
    step: int
    checkpoint: Path | None  # the checkpoint it was read from (at the end of a run: the newest one)


def run_backbone(method: nn.Module, cfg: DictConfig, step: int, checkpoint: Path | None) -> RunBackbone:
    """The release backbone of a method (``SSLMethod.export_backbone()``), in eval mode."""
    backbone = method.export_backbone().eval()
    name = next(n for n, m in method.named_modules() if m is backbone)
    return RunBackbone(backbone=backbone, module_name=name, config=cfg, step=step, checkpoint=checkpoint)


def run_config(saved: dict[str, Any], source: str | Path) -> DictConfig:
    """A checkpoint's plain-dict config merged onto the schema: an unknown or mistyped key is an error."""
    try:
        return OmegaConf.merge(OmegaConf.structured(PretrainConfig), migrate_legacy_keys(copy.deepcopy(saved)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"{source}: saved config key {key!r} does not fit this code's schema ({str(err).splitlines()[0]}); "
            "export with the medfm version that trained the run"
        ) from err


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, *, deepspeed: bool = True) -> RunBackbone:
    """Rebuild the method of a run from its newest checkpoint (or ``checkpoint``) and take its release backbone.

    The checkpoint is read with ``weights_only=True`` (no pickled code runs) and loaded strictly: a key that the
    rebuilt method does not have, or lacks, is an error naming it. DeepSpeed ZeRO runs save checkpoint
    directories; with ``deepspeed=True`` they are consolidated (``medfm.pretrain.backends.zero_checkpoint.consolidate_deepspeed``,
    fp32 full weights) to the same contract, reading DeepSpeed's own files with ``weights_only=True`` too (a file
    that needs pickled code is refused, naming it); downstream loading passes ``deepspeed=False`` and asks for an
    export.
    """
    state, path = _checkpoint_state(Path(run_dir), checkpoint, deepspeed)
    cfg = run_config(state["config"], path)
    if cfg.method not in METHODS:
        raise ExportError(f"{path}: method {cfg.method!r} is not one of {sorted(METHODS)}")
    # The checkpoint holds every weight: the warm-start source (model.init) is neither read again nor needed.
    method = METHODS[cfg.method].from_config(OmegaConf.merge(cfg, {"model": {"init": None}}))
    _load_method_state(method, state["model"], path)
    return run_backbone(method, cfg, int(state["step"]), path)


def _checkpoint_state(run_dir: Path, checkpoint: str | Path | None, deepspeed: bool) -> tuple[dict[str, Any], Path]:
    path = Path(checkpoint) if checkpoint is not None else ckpt.find_resume(run_dir)
    if path is not None and path.is_file():
        return ckpt.load_checkpoint(path), path

    found = path if path is not None and path.is_dir() else zero_checkpoint.find_deepspeed_resume(run_dir)
    if found is None:
        raise ExportError(
            f"{run_dir}: no checkpoint to export (expected {ckpt.LAST}, step-*.pt or a DeepSpeed step-*/)"
        )
    if not deepspeed:
        raise ExportError(
            f"{found}: a DeepSpeed ZeRO checkpoint (its shard files are full pickles) and no {RELEASE_DIR}/ "
            f"of that step: release it first with `medfm export {run_dir} --out RELEASE_DIR`, then load the release"
        )
    return zero_checkpoint.consolidate_deepspeed(found), found


def _load_method_state(method: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    what = f"the {type(method).__name__} rebuilt from the checkpoint's config"
    check_keys(method.state_dict(), state, path, model=what, error=ExportError)
    method.load_state_dict(state)
