"""Wiring: config -> data -> model -> Accelerator -> engine. ``python -m medfm.pretrain.main --config FILE [k=v ...]``.

The run directory (``train.run_dir``) receives ``config.yaml`` (resolved, with derived values), checkpoints
(``last.pt``, ``step-XXXXXXX.pt``), ``metrics.jsonl``, the trackers' folders (``tensorboard/``; ``wandb/``, ``mlruns/``), ``figures/`` and, at the end, the release
folder ``release/`` (``medfm.pretrain.release``: what ``medfm export`` writes). Running the same command again resumes
from ``last.pt``. One run at a time per run directory: the main process holds ``RUN_DIR/.medfm.lock``
(``medfm.data_shards.outputs.lock_folder``: released by the kernel however the process ends) and a second
``medfm pretrain`` on the same directory is refused (exit 1, naming the holder's pid and host) before it writes
anything there.

Several processes: launch the same command with ``accelerate launch --multi_gpu --num_processes N
[--num_machines M --machine_rank R --main_process_ip HOST --main_process_port P]``, ``torchrun`` or one Slurm task
per process (``slurm/pretrain.sbatch``). ``dist.backend=deepspeed`` (``dist.zero_stage`` 1-3 or
``dist.deepspeed_config``) trains with DeepSpeed ZeRO; its checkpoints are directories (``step-XXXXXXX/``, ``last``
-> the newest), resumed on the same number of processes, consolidated by ``medfm.pretrain.backends.zero_checkpoint.consolidate_deepspeed``.
Exit codes: 0 done, 1 diverged, 2 bad config, 3 distributed failure (a peer died or hung, or the rendezvous did not
complete within ``dist.timeout_s``), 75 checkpointed on a stop signal (requeue).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import IterableDataset

from medfm.data_shards.errors import FolderInUse, MissingInputError
from medfm.data_shards.outputs import FolderLock, lock_folder
from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain import distributed as dist
from medfm.pretrain.backends import backend_for
from medfm.pretrain.backends.zero_checkpoint import find_deepspeed_resume
from medfm.pretrain.cli import configure
from medfm.pretrain.config import Backend, Precision, derive, load_config, precision_name, save_config, to_dict
from medfm.pretrain.data import EpochLoader, build_loader, dataset_size, open_source, sample_seed
from medfm.pretrain.engine import Schedules, build_optimizer, train
from medfm.pretrain.errors import ConfigError, DistributedFailure, Preempted, TrainingDiverged, run_command
from medfm.pretrain.knn import KNNMonitor
from medfm.pretrain.methods import METHODS, SSLMethod
from medfm.pretrain.methods.auto_settings import AUTO
from medfm.pretrain.monitor import Monitor, plot_training_curves
from medfm.pretrain.preemption import StopRequest
from medfm.pretrain.release import write_run_release
from medfm.pretrain.runs import RELEASE_DIR, RunBackbone
from medfm.pretrain.supervise import report_run_dir
from medfm.pretrain.weights import file_sha256, init_weights_path


def pretrain(config: str | Path | None, overrides: list[str]) -> int:
    """Run (or resume) one pretraining run; returns the process exit code (``medfm.pretrain.errors``)."""
    return run_command("pretrain", lambda: run_pretraining(load_config(config, overrides)))


# The JSON event a known failure leaves in metrics.jsonl.
_FAILURE_EVENTS = {TrainingDiverged: "diverged", Preempted: "preempted", DistributedFailure: "distributed_failure"}


def run_pretraining(cfg: DictConfig) -> int:
    """Build, resume, train, release; returns the final step. Failures raise (``medfm.pretrain.errors``)."""
    report_run_dir(cfg.train.run_dir)  # to the supervisor (medfm.pretrain.supervise), if one runs this process
    resumed = settle_from_run_dir(cfg)  # a resumed run keeps the backend, precision and normalisation it started with
    accelerator, setup = dist.make_accelerator(cfg)  # auto precision / backend resolved into cfg
    setup = [*resumed, *setup]
    monitor, failed, lock = None, False, None
    try:
        with dist.as_collective_failure(cfg):
            lock = lock_run_dir(accelerator, Path(cfg.train.run_dir))
        if lock is not None and lock.warning:
            setup.append(f"warning: {lock.warning}")
        backend = backend_for(accelerator, cfg)
        loader, model, evaluate = build(cfg, accelerator)
        run_dir = Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with dist.as_collective_failure(cfg):
            model, optimizer = backend.prepare(model, lambda method: build_optimizer(method, cfg))
            store = backend.store(run_dir, cfg.checkpoint.keep, model, optimizer)
            start_step, resumed_from, notes = resume(cfg, accelerator, store)
        if not backend.runs_models_on_one_process and (evaluate is not None or cfg.logging.figure_every_steps):
            # Figures and the kNN monitor run a model on the main process only; ZeRO-3 needs every rank for that.
            evaluate, cfg.logging.figure_every_steps = None, 0
            notes.append(
                f"{backend.name} ZeRO-3: method figures and the kNN monitor are off (they would run on one rank only)"
            )
        monitor = Monitor(
            run_dir,
            enabled=accelerator.is_main_process,
            total_steps=cfg.derived.total_steps,
            start_step=start_step,
            progress_bar=cfg.logging.progress_bar,
            accelerator=accelerator,
            config=to_dict(cfg),
        )
        if accelerator.is_main_process:
            save_config(cfg, run_dir / "config.yaml")
        derived = ", ".join(f"{k}={v}" for k, v in cfg.derived.items())
        start = {"event": "start", "step": start_step, "derived": to_dict(cfg)["derived"]}
        monitor.message(f"{cfg.method} on {cfg.model.backbone}: {derived}", **start)
        for line in setup:
            monitor.message(line, event="setup", message=line)
        if resumed_from is not None:
            monitor.message(f"resumed from {resumed_from} at step {start_step}", event="resume", step=start_step)
        for note in notes:
            monitor.message(f"warning: {note}", event="warning", message=note)
        with StopRequest() as stop, dist.as_collective_failure(cfg):
            step = train(cfg=cfg, accelerator=accelerator, backend=backend, model=model, optimizer=optimizer, loader=loader,
                         schedules=Schedules.from_config(cfg), monitor=monitor, save=saver(cfg, store),
                         start_step=start_step, evaluate=evaluate, stop=stop)  # fmt: skip
        if accelerator.is_main_process:
            export(backend.released_backbone(model, run_dir, step), run_dir)
            plot_training_curves(run_dir)
        release_dir = run_dir / RELEASE_DIR
        monitor.message(f"done at step {step}; release: {release_dir}", event="done", step=step)
        accelerator.end_training()
        return step
    except Exception as err:
        failed = isinstance(err, DistributedFailure)
        event = next((name for kind, name in _FAILURE_EVENTS.items() if isinstance(err, kind)), None)
        if monitor is not None and event is not None:
            fields = {"step": err.step, "signal": err.signal_name} if isinstance(err, Preempted) else {}
            monitor.event(event=event, message=str(err), **fields)
        raise
    finally:
        if monitor is not None:
            monitor.close()
        if lock is not None:
            lock.release()
        dist.shutdown(accelerator, failed=failed)


def lock_run_dir(accelerator: Accelerator, run_dir: Path) -> FolderLock | None:
    """The run directory's lock, taken by the main process (the only one that writes there; None elsewhere).
    A refusal reaches every process (one collective), so that a refused multi-process run stops on all of them
    instead of leaving the others waiting in the next collective."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = lock_folder(run_dir, "medfm pretrain")
        except FolderInUse as err:
            refused = err
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(refused is not None), device=accelerator.device)
        if float(accelerator.reduce(flag, "sum")) > 0 and refused is None:
            refused = FolderInUse(f"{run_dir} is being written by another medfm pretrain (the main process names it)")
    if refused is not None:
        raise refused
    return lock


def settle_from_run_dir(cfg: DictConfig) -> list[str]:
    """Resuming: ``auto`` settings take the values the run started with (its saved ``config.yaml``), whatever
    launched it this time (torchrun after ``accelerate launch``, a requeued Slurm job); an explicit backend that
    cannot read the run's checkpoints is an error naming ``dist.backend``. Returns a line for the log, if any."""
    run_dir = Path(cfg.train.run_dir)
    torch_checkpoint, deepspeed_checkpoint = ckpt.find_resume(run_dir), find_deepspeed_resume(run_dir)
    if torch_checkpoint is None and deepspeed_checkpoint is None:
        return []
    kind = Backend.deepspeed if deepspeed_checkpoint is not None and torch_checkpoint is None else Backend.ddp
    saved_path = run_dir / "config.yaml"
    saved = OmegaConf.load(saved_path) if saved_path.is_file() else None
    if saved is not None and OmegaConf.select(saved, "dist.backend") in (Backend.ddp.value, Backend.deepspeed.value):
        kind = Backend(saved.dist.backend)
    if cfg.dist.backend not in (Backend.auto, kind):
        found = "DeepSpeed checkpoint directories" if kind == Backend.deepspeed else "torch checkpoints (last.pt)"
        raise ConfigError(
            f"config key 'dist.backend': {cfg.dist.backend.value} cannot resume {run_dir}, which holds {found}: use {kind.value} or auto"
        )
    adopted = []
    if cfg.dist.backend == Backend.auto:
        cfg.dist.backend = kind
        if (
            kind == Backend.deepspeed
            and saved is not None
            and cfg.dist.zero_stage is None
            and cfg.dist.deepspeed_config is None
        ):
            cfg.dist.zero_stage, cfg.dist.deepspeed_config = saved.dist.zero_stage, saved.dist.deepspeed_config
        adopted.append(f"dist.backend={kind.value}")
    if saved is not None:  # a warm-started run is rebuilt as it was built (medfm.pretrain.methods.mae), source unread
        cfg.derived.init_sha256 = OmegaConf.select(saved, "derived.init_sha256")
    if saved is not None and OmegaConf.select(saved, "method") == cfg.method:
        # "auto" values as the run chose them: the image count may differ now (more shards), the model may not.
        section, saved_section = cfg[cfg.method], saved[cfg.method]
        chosen = {key: saved_section[key] for key in section if section[key] == AUTO and key in saved_section}
        for key, value in chosen.items():
            section[key] = value
        if chosen:
            cfg.derived.auto = OmegaConf.select(saved, "derived.auto")
            adopted.append(", ".join(f"{cfg.method}.{key}={value}" for key, value in chosen.items()))
    saved_mean = OmegaConf.select(saved, "augment.mean") if saved is not None else None
    if cfg.augment.mean is None and cfg.augment.std is None and saved_mean is not None:
        # The normalisation the weights were trained with, even if the warm-start source moved or changed since.
        cfg.augment.mean, cfg.augment.std = list(saved_mean), list(saved.augment.std)
        cfg.derived.normalization = OmegaConf.select(saved, "derived.normalization")
    saved_precision = OmegaConf.select(saved, "train.precision") if saved is not None else None
    if cfg.train.precision == Precision.auto and saved_precision not in (None, Precision.auto.value):
        cfg.train.precision = Precision(precision_name(saved_precision))  # a run saved by an earlier version: no
        adopted.append(f"train.precision={saved_precision}")
    return [f"resuming: {' and '.join(adopted)} as the run started"] if adopted else []


def build(cfg: DictConfig, accelerator: Accelerator) -> tuple[EpochLoader, SSLMethod, Callable | None]:
    """Derived values, data loader, model (same initial weights on every process), optional kNN monitor."""
    rank, world = accelerator.process_index, accelerator.num_processes
    try:
        size = dataset_size(cfg.data.spec, cfg.data.split, world)
    except (ConfigError, MissingInputError) as err:  # a spec naming nothing: data.spec is the key to change
        if isinstance(err, ConfigError) and "config key" in str(err):  # names its key already (data.split ...)
            raise
        raise ConfigError(f"config key 'data.spec': {err}") from None
    # An input that is there but cannot be used (an edited manifest, a csv row, an empty source) is an
    # InputError / ManifestError naming the file: exit 1, as in medfm eval and medfm shard.
    derive(cfg, world, size)
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
    run_dir = Path(cfg.train.run_dir)
    resuming = ckpt.find_resume(run_dir) is not None or find_deepspeed_resume(run_dir) is not None
    if cfg.model.init is not None and not resuming:
        cfg.derived.init_sha256 = file_sha256(init_weights_path(cfg.model.init))
    # A resumed run's weights come from its checkpoint: the warm-start source is not read again (nor needed).
    build_cfg = OmegaConf.merge(cfg, {"model": {"init": None}}) if resuming else cfg
    return loader, method_cls.from_config(build_cfg), evaluate


def resume(
    cfg: DictConfig, accelerator: Accelerator, store: ckpt.CheckpointStore
) -> tuple[int, Path | None, list[str]]:
    """Load the store's latest checkpoint if any and set the random streams.

    Returns (start step, checkpoint path or None, warnings about config changes)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    found = store.load_latest()  # the newest readable checkpoint; damaged newer files are named in the notes
    if found is None:
        seed_process(cfg.train.seed, rank, 0)
        return 0, None, []
    path, meta, notes = found
    cfg.derived.init_sha256 = meta["config"]["derived"].get("init_sha256")  # recorded when the run started
    notes = [*notes, *ckpt.config_changes(meta["config"], to_dict(cfg))]
    if len(meta["rng"]) == world:
        ckpt.restore_rng(meta["rng"][rank])
    else:
        notes.append(f"process count changed ({len(meta['rng'])} -> {world}): random streams reseeded")
        seed_process(cfg.train.seed, rank, meta["step"])
    return meta["step"], path, notes


def saver(cfg: DictConfig, store: ckpt.CheckpointStore) -> Callable[[int], None]:
    """``save(step)``: every process sends its RNG states (a collective), then the store writes (a collective)."""
    per_epoch = cfg.derived.steps_per_epoch

    def save(step: int) -> None:
        position = {"epoch": step // per_epoch, "batches_done": (step % per_epoch) * cfg.train.grad_accum}
        store.save(step, {"data": position, "rng": ckpt.gather_rng(), "config": to_dict(cfg)})

    return save


def knn_monitor(cfg: DictConfig, device: torch.device) -> KNNMonitor:
    k = cfg.knn
    bank, query = (
        open_source(k.spec, split, seed=0, samples_per_epoch=None, shuffle_buffer=1)
        for split in (k.bank_split, k.query_split)
    )
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
        num_workers=min(cfg.data.num_workers, 4),
    )


def seed_process(seed: int, rank: int, step: int) -> None:
    """Per-process random streams (masks, drop path) for a fresh start."""
    value = sample_seed(seed, "process", rank, step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def export(run: RunBackbone, run_dir: Path) -> Path:
    """``RUN_DIR/release/``: the release folder that ``medfm export RUN_DIR`` writes (``medfm.pretrain.release``)."""
    return write_run_release(run, run_dir / RELEASE_DIR, run_dir=run_dir, overwrite=True)


def run(args: argparse.Namespace) -> int:
    """The ``medfm pretrain`` handler (``medfm.pretrain.cli`` names it, the ``medfm`` command imports it when chosen)."""
    return pretrain(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="python -m medfm.pretrain.main", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
