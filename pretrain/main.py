"""Wiring: config -> data -> model -> Accelerator -> engine. ``python -m pretrain.main --config FILE [k=v ...]``.

The run directory (``train.run_dir``) receives ``config.yaml`` (resolved, with derived values), checkpoints
(``last.pt``, ``step-XXXXXXX.pt``), ``metrics.jsonl``, ``tensorboard/``, ``figures/`` and, at the end,
``backbone.safetensors``. Running the same command again resumes from ``last.pt``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import IterableDataset

from pretrain import checkpoint as ckpt
from pretrain.cli import configure
from pretrain.config import ConfigError, derive, load_config, save_config, to_dict
from pretrain.data import EpochLoader, build_loader, dataset_size, open_source, sample_seed
from pretrain.engine import Schedules, TrainingDiverged, build_optimizer, train
from pretrain.knn import KNNMonitor
from pretrain.methods import METHODS, SSLMethod
from pretrain.monitor import Monitor
from pretrain.preemption import EXIT_REQUEUE, Preempted, StopRequest


def pretrain(config: str | Path | None, overrides: list[str]) -> int:
    """Run (or resume) one pretraining run; returns the process exit code (2: bad config, 1: diverged)."""
    try:
        cfg = load_config(config, overrides)
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.train.precision.value,
            gradient_accumulation_steps=cfg.train.grad_accum,
        )
        loader, model, evaluate = build(cfg, accelerator)
    except ConfigError as err:
        print(f"medfm pretrain: {err}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = build_optimizer(model, cfg)
    model, optimizer, start_step, resumed_from, notes = resume(cfg, accelerator, model, optimizer, run_dir)

    monitor = Monitor(
        run_dir,
        enabled=accelerator.is_main_process,
        total_steps=cfg.derived.total_steps,
        start_step=start_step,
        tensorboard=cfg.logging.tensorboard,
        progress_bar=cfg.logging.progress_bar,
    )
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    derived = ", ".join(f"{k}={v}" for k, v in cfg.derived.items())
    start = {"event": "start", "step": start_step, "derived": to_dict(cfg)["derived"]}
    monitor.message(f"{cfg.method} on {cfg.model.backbone}: {derived}", **start)
    if resumed_from is not None:
        monitor.message(f"resumed from {resumed_from} at step {start_step}", event="resume", step=start_step)
    for note in notes:
        monitor.message(f"warning: {note}")

    try:
        with StopRequest() as stop:
            step = train(
                cfg=cfg,
                accelerator=accelerator,
                model=model,
                optimizer=optimizer,
                loader=loader,
                schedules=Schedules.from_config(cfg),
                monitor=monitor,
                save=saver(cfg, accelerator, model, optimizer, run_dir),
                start_step=start_step,
                evaluate=evaluate,
                stop=stop,
            )
    except TrainingDiverged as err:
        monitor.message(f"medfm pretrain: {err}", event="diverged", message=str(err))
        monitor.close()
        return 1
    except Preempted as err:
        monitor.message(f"medfm pretrain: {err}", event="preempted", step=err.step, signal=err.signal_name)
        monitor.close()
        accelerator.end_training()
        return EXIT_REQUEUE
    if accelerator.is_main_process:
        export(cfg, accelerator.unwrap_model(model), run_dir, step)
    weights = run_dir / "backbone.safetensors"
    monitor.message(f"done at step {step}; backbone weights: {weights}", event="done", step=step)
    monitor.close()
    accelerator.end_training()
    return 0


def build(cfg: DictConfig, accelerator: Accelerator) -> tuple[EpochLoader, SSLMethod, Callable | None]:
    """Derived values, data loader, model (same initial weights on every process), optional kNN monitor."""
    rank, world = accelerator.process_index, accelerator.num_processes
    derive(cfg, world, dataset_size(cfg.data.spec, cfg.data.split, world))
    method_cls = METHODS[cfg.method]
    loader = build_loader(
        cfg.data.spec,
        cfg.data.split,
        method_cls.build_transform(cfg),
        batch_size=cfg.train.batch_size,
        batches_per_epoch=cfg.derived.steps_per_epoch * cfg.train.grad_accum,
        in_chans=cfg.data.in_chans,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        rank=rank,
        world_size=world,
        pin_memory=accelerator.device.type == "cuda",
    )
    evaluate = None
    if cfg.knn.spec is not None and cfg.knn.every_steps > 0 and accelerator.is_main_process:
        knn = knn_monitor(cfg, accelerator.device)
        evaluate = lambda backbone: {"knn_acc": knn(backbone)}  # noqa: E731
    torch.manual_seed(cfg.train.seed)
    return loader, method_cls.from_config(cfg), evaluate


def resume(
    cfg: DictConfig, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path
) -> tuple[nn.Module, torch.optim.Optimizer, int, Path | None, list[str]]:
    """Load the run directory's last checkpoint if any, prepare model and optimizer, set the random streams.

    Returns (model, optimizer, start step, checkpoint path or None, warnings about config changes)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    path = ckpt.find_resume(run_dir)
    state = ckpt.load_checkpoint(path) if path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])  # strict: a different architecture fails here, by key
    model, optimizer = accelerator.prepare(model, optimizer)
    if state is None:
        seed_process(cfg.train.seed, rank, 0)
        return model, optimizer, 0, None, []
    optimizer.load_state_dict(state["optimizer"])  # after prepare: moments land on the parameters' device
    notes = config_changes(state["config"], to_dict(cfg))
    if len(state["rng"]) == world:
        ckpt.restore_rng(state["rng"][rank])
    else:
        notes.append(f"process count changed ({len(state['rng'])} -> {world}): random streams reseeded")
        seed_process(cfg.train.seed, rank, state["step"])
    return model, optimizer, state["step"], path, notes


def saver(
    cfg: DictConfig, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path
) -> Callable[[int], None]:
    """``save(step)``: every process sends its RNG states (a collective), the main process writes."""

    def save(step: int) -> None:
        # As bytes: all_gather_object cannot carry tensor storages on this torch.
        buffer = io.BytesIO()
        torch.save(ckpt.capture_rng(), buffer)
        rng = [torch.load(io.BytesIO(blob), weights_only=True) for blob in gather_object([buffer.getvalue()])]
        if accelerator.is_main_process:
            per_epoch = cfg.derived.steps_per_epoch
            state = {
                "model": accelerator.unwrap_model(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "data": {"epoch": step // per_epoch, "batches_done": (step % per_epoch) * cfg.train.grad_accum},
                "rng": rng,
                "config": to_dict(cfg),
            }
            ckpt.save_checkpoint(run_dir, state, keep=cfg.checkpoint.keep)
        accelerator.wait_for_everyone()

    return save


def knn_monitor(cfg: DictConfig, device: torch.device) -> KNNMonitor:
    k = cfg.knn
    bank, query = (open_source(k.spec, split, seed=0, samples_per_epoch=None, shuffle_buffer=1)
                   for split in (k.bank_split, k.query_split))  # fmt: skip
    if isinstance(bank, IterableDataset):
        raise ConfigError(f"config key 'knn.spec': {k.spec!r} is a stream; the kNN monitor needs an indexable dataset")
    return KNNMonitor(
        bank,
        query,
        mean=tuple(cfg.augment.mean),
        std=tuple(cfg.augment.std),
        in_chans=cfg.data.in_chans,
        img_size=cfg.data.img_size,
        k=k.k,
        temperature=k.temperature,
        max_samples=k.max_samples,
        device=device,
    )


def seed_process(seed: int, rank: int, step: int) -> None:
    """Per-process random streams (masks, drop path) for a fresh start."""
    value = sample_seed(seed, "process", rank, step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def export(cfg: DictConfig, method: SSLMethod, run_dir: Path, step: int) -> None:
    """``backbone.safetensors``: the method's released backbone, with what is needed to rebuild it."""
    metadata = {
        "method": cfg.method,
        "backbone": cfg.model.backbone,
        "backbone_kwargs": json.dumps(to_dict(cfg)["model"]["backbone_kwargs"]),
        "img_size": str(cfg.data.img_size),
        "in_chans": str(cfg.data.in_chans),
        "step": str(step),
    }
    ckpt.export_backbone(method.export_backbone(), run_dir / "backbone.safetensors", metadata)


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Config values that differ between a checkpoint and this run (flattened keys)."""
    notes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            notes.extend(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            notes.append(f"config {prefix}{key} changed since the checkpoint: {a!r} -> {b!r}")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="python -m pretrain.main", description=__doc__))
    args = parser.parse_args(argv)
    return pretrain(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
