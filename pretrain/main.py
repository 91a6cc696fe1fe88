"""Wiring: config -> data -> model -> Accelerator -> engine. ``python -m pretrain.main --config FILE [k=v ...]``.

The run directory (``train.run_dir``) receives ``config.yaml`` (resolved, with derived values), checkpoints
(``last.pt``, ``step-XXXXXXX.pt``), ``metrics.jsonl``, ``tensorboard/``, ``figures/`` and, at the end,
``backbone.safetensors``. Running the same command again resumes from ``last.pt``.

Several processes: launch the same command with ``accelerate launch --multi_gpu --num_processes N
[--num_machines M --machine_rank R --main_process_ip HOST --main_process_port P]``, ``torchrun`` or one Slurm task
per process (``slurm/pretrain.sbatch``). ``dist.backend=deepspeed`` (``dist.zero_stage`` 1-3 or
``dist.deepspeed_config``) trains with DeepSpeed ZeRO; its checkpoints are directories (``step-XXXXXXX/``, ``last``
-> the newest), resumed on the same number of processes, consolidated by ``pretrain.distributed.consolidate_deepspeed``.
Exit codes: 0 done, 1 diverged, 2 bad config, 3 distributed failure (a peer died or hung, or the rendezvous did not
complete within ``dist.timeout_s``), 75 checkpointed on a stop signal (requeue).
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
from pretrain import distributed as dist
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
        accelerator = dist.make_accelerator(cfg)
        loader, model, evaluate = build(cfg, accelerator)
    except ConfigError as err:
        print(f"medfm pretrain: {err}", file=sys.stderr)
        return 2
    except dist.DistributedFailure as err:
        print(f"medfm pretrain: {err}", file=sys.stderr)
        return dist.EXIT_DISTRIBUTED
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = build_optimizer(model, cfg)
    try:
        with dist.as_collective_failure(cfg):
            model, optimizer, start_step, resumed_from, notes = resume(cfg, accelerator, model, optimizer, run_dir)
    except ConfigError as err:
        print(f"medfm pretrain: {err}", file=sys.stderr)
        dist.shutdown(accelerator)
        return 2
    except dist.DistributedFailure as err:
        print(f"medfm pretrain: {err}", file=sys.stderr)
        dist.shutdown(accelerator, failed=True)
        return dist.EXIT_DISTRIBUTED
    if dist.zero_stage(accelerator) == 3 and (evaluate is not None or cfg.logging.figure_every_steps):
        # Figures and the kNN monitor run a model on the main process only; ZeRO-3 needs every rank for that.
        evaluate, cfg.logging.figure_every_steps = None, 0
        notes.append("ZeRO-3: method figures and the kNN monitor are off (they would run on one rank only)")

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
        with StopRequest() as stop, dist.as_collective_failure(cfg):
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
        dist.shutdown(accelerator)
        return 1
    except Preempted as err:
        monitor.message(f"medfm pretrain: {err}", event="preempted", step=err.step, signal=err.signal_name)
        monitor.close()
        accelerator.end_training()
        dist.shutdown(accelerator)
        return EXIT_REQUEUE
    except dist.DistributedFailure as err:
        print(f"medfm pretrain: {err}", file=sys.stderr)
        monitor.message(f"medfm pretrain: {err}", event="distributed_failure", message=str(err))
        monitor.close()
        dist.shutdown(accelerator, failed=True)
        return dist.EXIT_DISTRIBUTED
    if accelerator.is_main_process:
        if dist.uses_deepspeed(accelerator):
            # The engine's parameters may be sharded (ZeRO-3) and in bf16: release from the consolidated fp32 state.
            method = METHODS[cfg.method].from_config(cfg)
            method.load_state_dict(dist.consolidate_deepspeed(run_dir)["model"])
        else:
            method = accelerator.unwrap_model(model)
        export(cfg, method, run_dir, step)
    weights = run_dir / "backbone.safetensors"
    monitor.message(f"done at step {step}; backbone weights: {weights}", event="done", step=step)
    monitor.close()
    accelerator.end_training()
    dist.shutdown(accelerator)
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
    if dist.uses_deepspeed(accelerator):
        return resume_deepspeed(cfg, accelerator, model, optimizer, run_dir)
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


def resume_deepspeed(
    cfg: DictConfig, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path
) -> tuple[nn.Module, torch.optim.Optimizer, int, Path | None, list[str]]:
    """``resume`` for DeepSpeed: the EMA modules stay outside the engine; the engine loads its own partitions."""
    rank, world = accelerator.process_index, accelerator.num_processes
    engine, optimizer = dist.prepare_deepspeed(accelerator, cfg, model, optimizer)
    path = dist.find_deepspeed_resume(run_dir)
    if path is None:
        seed_process(cfg.train.seed, rank, 0)
        return engine, optimizer, 0, None, []
    meta = dist.load_deepspeed(engine, accelerator.unwrap_model(engine), path, world)
    ckpt.restore_rng(meta["rng"][rank])
    return engine, optimizer, meta["step"], path, config_changes(meta["config"], to_dict(cfg))


def gather_rng() -> list[dict[str, Any]]:
    """Every process's RNG states, on every process (a collective)."""
    # As bytes: all_gather_object cannot carry tensor storages on this torch.
    buffer = io.BytesIO()
    torch.save(ckpt.capture_rng(), buffer)
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in gather_object([buffer.getvalue()])]


def saver(
    cfg: DictConfig, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path
) -> Callable[[int], None]:
    """``save(step)``: every process sends its RNG states (a collective), the main process writes.

    DeepSpeed: every process writes its partitions into one directory per checkpoint (``step-XXXXXXX/``, the
    ``last`` symlink), see ``pretrain.distributed.save_deepspeed``."""
    per_epoch = cfg.derived.steps_per_epoch

    def position(step: int) -> dict[str, int]:
        return {"epoch": step // per_epoch, "batches_done": (step % per_epoch) * cfg.train.grad_accum}

    def save_deepspeed(step: int) -> None:
        method = accelerator.unwrap_model(model)
        meta = {"step": step, "data": position(step), "rng": gather_rng(), "config": to_dict(cfg),
                "momentum": dist.momentum_state(method)}  # fmt: skip
        dist.save_deepspeed(accelerator, model, run_dir, meta, step, keep=cfg.checkpoint.keep)

    def save(step: int) -> None:
        rng = gather_rng()
        if accelerator.is_main_process:
            state = {
                "model": accelerator.unwrap_model(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "data": position(step),
                "rng": rng,
                "config": to_dict(cfg),
            }
            ckpt.save_checkpoint(run_dir, state, keep=cfg.checkpoint.keep)
        accelerator.wait_for_everyone()

    return save_deepspeed if dist.uses_deepspeed(accelerator) else save


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
