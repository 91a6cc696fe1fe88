"""DeepSpeed checkpoint directories: the DeepSpeed backend's half of the one checkpoint contract.

A checkpoint is a directory ``step-XXXXXXX/`` holding DeepSpeed's ZeRO partitions (``zero/``, written by every
rank) and our part ``medfm.pt`` (step, data position, RNG states, config as a plain dict, the EMA modules kept
outside the engine); ``last`` is a symlink to the newest. ``DeepSpeedStore`` answers the same calls as
``medfm.pretrain.checkpoint.TorchStore``. ``consolidate_deepspeed`` turns one into the ``last.pt`` format (fp32, full
weights) for release, reading DeepSpeed's files with ``weights_only=True`` only.

Nothing here imports ``deepspeed`` at module level: finding and naming checkpoint directories must stay cheap for
the commands that only look (``medfm export`` of a torch run, resume detection).
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm.pretrain.checkpoint import VERSION, atomic_save, first_nonfinite, nonfinite_message, unsafe_globals
from medfm.pretrain.errors import ConfigError, MissingInputError, ReleaseError, TrainingDiverged

DEEPSPEED_TAG = "zero"  # sub-folder of a checkpoint directory that DeepSpeed writes
META = "medfm.pt"  # our part of a DeepSpeed checkpoint: step, data position, RNG, config, EMA modules
LAST_DIR = "last"  # symlink to the newest DeepSpeed checkpoint directory
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load's documented override of its weights_only argument


def _rank0_then_all(accelerator: Any, fn: Callable[[], object]) -> None:
    if accelerator.is_main_process:
        fn()
    accelerator.wait_for_everyone()


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:07d}"


def save_deepspeed(
    accelerator: Any, engine: Any, run_dir: Path, meta: dict[str, Any] | None, step: int, keep: int
) -> Path:
    """Collective: every rank writes its ZeRO partitions into ``.step-XXXXXXX.tmp/``, rank 0 adds ``medfm.pt``
    (``meta``: step, data, rng, config, EMA modules), renames the folder to ``step-XXXXXXX`` and points the
    ``last`` symlink at it (both atomic), then deletes all but the ``keep`` newest. A crash at any point leaves
    the previous ``last`` intact. Assumes a run directory shared by all ranks (as on a cluster file system)."""
    run_dir = Path(run_dir)
    final, tmp = step_dir(run_dir, step), run_dir / f".step-{step:07d}.tmp"
    _rank0_then_all(accelerator, lambda: shutil.rmtree(tmp, ignore_errors=True))
    engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_save({**meta, "version": VERSION}, tmp / META)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        link = run_dir / f".{LAST_DIR}.tmp"
        link.unlink(missing_ok=True)
        os.symlink(final.name, link)
        os.replace(link, run_dir / LAST_DIR)
        prune_step_dirs(run_dir, keep, final)
    accelerator.wait_for_everyone()
    return final


def prune_step_dirs(run_dir: Path, keep: int, newest: Path) -> None:
    """Delete all but the ``keep`` newest ``step-*`` directories (at least ``newest``, which ``last`` points at)."""
    done = sorted(p for p in Path(run_dir).glob("step-*") if p.is_dir())
    for old in done[: -keep or None] if keep else done[:-1]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def find_deepspeed_resume(run_dir: str | Path) -> Path | None:
    """The checkpoint directory ``last`` points at, else the newest complete ``step-*`` directory, else None."""
    run_dir = Path(run_dir)
    last = run_dir / LAST_DIR
    if (last / META).is_file():
        return last.resolve()
    done = sorted(p for p in run_dir.glob("step-*") if (p / META).is_file())
    return done[-1] if done else None


def load_meta(path: Path) -> dict[str, Any]:
    meta = torch.load(Path(path) / META, map_location="cpu", weights_only=True)
    if meta.get("version") != VERSION:
        raise ReleaseError(f"{path}: checkpoint version {meta.get('version')} (this code reads {VERSION})")
    return meta


def load_deepspeed(engine: Any, method: nn.Module, path: Path, world_size: int) -> dict[str, Any]:
    """Collective: load the ZeRO partitions of ``path`` into the engine (same number of processes as when saved)
    and the EMA modules into ``method``; returns the checkpoint's ``medfm.pt`` (step, data, rng, config)."""
    meta = load_meta(path)
    saved = len(meta["rng"])
    if saved != world_size:
        raise ConfigError(
            f"{path}: a DeepSpeed checkpoint resumes on the number of processes that saved it ({saved}, now "
            f"{world_size}); consolidate it (medfm.pretrain.checkpoint.consolidate_deepspeed) to start a new run"
        )
    loaded, _ = engine.load_checkpoint(
        str(path),
        tag=DEEPSPEED_TAG,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if loaded is None:
        raise MissingInputError(f"{path}: DeepSpeed found no checkpoint under tag {DEEPSPEED_TAG!r}")
    for name, state in meta["momentum"].items():
        getattr(method, name).load_state_dict(state)
    return meta


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its checkpoint files (enums and plain records, no code)."""
    found: list[Any] = []
    for module, names in (
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            imported = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return found


@contextmanager
def weights_only_loads(where: Path) -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's zero_to_fp32 included, which asks for ``weights_only=False``) runs
    with ``weights_only=True``: tensors, plain values and DeepSpeed's own record types only. A file that needs
    anything else is refused with a ReleaseError naming it and what it needs, before any of its code could run.

    torch's documented switch ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (read on every ``torch.load``) overrides the
    ``weights_only=False`` that zero_to_fp32 passes; DeepSpeed has no argument for it.
    ``tests/downstream/test_export.py`` (a checkpoint whose unpickling would leave a marker file) catches a torch
    that stops reading the variable."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError:
        safe = {f"{g.__module__}.{g.__name__}" for g in _deepspeed_safe_globals()}
        needs = {file: [g for g in unsafe_globals(file) if g not in safe] for file in sorted(Path(where).rglob("*.pt"))}
        named = "; ".join(f"{file} needs {', '.join(found[:3])}" for file, found in needs.items() if found) or str(
            where
        )
        raise ReleaseError(
            f"refused to unpickle the checkpoint ({named}): medfm reads DeepSpeed checkpoints with weights_only=True "
            "only, so a checkpoint from elsewhere cannot run code on export"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def consolidate_deepspeed(path: str | Path) -> dict[str, Any]:
    """One DeepSpeed checkpoint as one checkpoint in the ``last.pt`` format, on the CPU, in fp32.

    ``path``: a run directory (its newest DeepSpeed checkpoint) or a ``step-XXXXXXX`` directory. ``model`` is
    the method's full state dict (the keys of a DDP run's ``last.pt``): the engine's parameters and buffers
    rebuilt from the ZeRO partitions by DeepSpeed's ``zero_to_fp32`` (stages 1-3), plus the EMA modules.
    ``step``, ``data``, ``config`` and ``rng`` as saved; no optimizer state (``optimizer`` is None).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    if not (path / META).is_file():
        found = find_deepspeed_resume(path)
        if found is None:
            raise MissingInputError(f"{path}: no DeepSpeed checkpoint ({LAST_DIR}/ or step-*/ with {META})")
        path = found
    with weights_only_loads(path):  # a downloaded "run" must not execute code when it is exported
        meta = load_meta(path)
        engine_state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
        # ZeRO-1 checkpoints do not list frozen parameters for zero_to_fp32 (stages 2-3 do); ZeRO-1 does not
        # partition parameters, so the module state saved beside the partitions holds them whole.
        states = sorted((path / DEEPSPEED_TAG).glob("*mp_rank_00_model_states.pt"))  # ZeRO-3: zero_pp_rank_0_...
        module = torch.load(states[0], map_location="cpu", weights_only=True)
    for key, value in module["module"].items():
        if key not in engine_state and value.numel() > 0:
            engine_state[key] = value
    model = {k: v.float() if v.is_floating_point() else v for k, v in engine_state.items()}
    for name, state in meta["momentum"].items():
        model.update({f"{name}.{key}": value for key, value in state.items()})
    return {
        "model": model,
        "optimizer": None,
        "step": meta["step"],
        "data": meta["data"],
        "rng": meta["rng"],
        "config": meta["config"],
        "version": VERSION,
    }


class DeepSpeedStore:
    """Checkpoints of a DeepSpeed run: one directory per checkpoint (``save_deepspeed``); the EMA modules, kept
    outside the engine, travel in our part. Resumes on the number of processes that saved it."""

    def __init__(self, accelerator: Any, run_dir: Path, keep: int, engine: Any, momentum: Callable[[], nn.Module]):
        self.accelerator, self.run_dir, self.keep, self.engine = accelerator, Path(run_dir), keep, engine
        self.method = momentum  # the unwrapped method, holding the EMA modules as plain attributes

    def latest(self) -> Path | None:
        return find_deepspeed_resume(self.run_dir)

    def load_latest(self) -> tuple[Path, dict[str, Any], list[str]] | None:
        path = self.latest()  # complete directories only: a crash mid-save leaves a .tmp folder, never a step-*
        return None if path is None else (path, self.load(path), [])

    def save(self, step: int, meta: dict[str, Any]) -> None:
        method = self.method()
        momentum = {name: getattr(method, name).state_dict() for name in method.momentum_modules}
        # Each rank checks what it holds (ZeRO-3: its partitions are outside the module, left unchecked) and all
        # agree, so that no rank enters the collective save alone.
        module = self.engine.module
        local = {"model": {**dict(module.named_parameters()), **dict(module.named_buffers())}, "momentum": momentum}
        bad = first_nonfinite(local)
        flag = torch.tensor(float(bad is not None), device=self.accelerator.device)
        if float(self.accelerator.reduce(flag, "sum")) > 0:
            intact = f"the checkpoint that {LAST_DIR} points at is intact"
            raise TrainingDiverged(nonfinite_message(step, bad, self.run_dir, intact))
        save_deepspeed(
            self.accelerator,
            self.engine,
            self.run_dir,
            {**meta, "step": step, "momentum": momentum},
            step,
            keep=self.keep,
        )

    def load(self, path: Path) -> dict[str, Any]:
        return load_deepspeed(self.engine, self.method(), path, self.accelerator.num_processes)

    def prune(self) -> None:
        newest = self.latest()
        if newest is not None:
            prune_step_dirs(self.run_dir, self.keep, newest)
