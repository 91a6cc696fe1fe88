"""One checkpoint contract, written atomically, resumed automatically, behind one store interface.

A run's backend (``medfm.pretrain.backends``) gives its store: a :class:`TorchStore` here (one ``.pt`` file per
checkpoint) or, under DeepSpeed, ``medfm.pretrain.backends.zero_checkpoint.DeepSpeedStore`` (one directory per
checkpoint: the engine's ZeRO partitions plus our part); both answer ``latest()``, ``load_latest()``,
``save(step, meta)``, ``load(path) -> meta`` and ``prune()``. ``meta`` is what the loop adds to the weights
(step, data position, RNG states, config, anything else plain).

A checkpoint is a dict of tensors and plain Python values (loadable with ``weights_only=True``):
``{"model", "optimizer", "step", "data": {"epoch", "batches_done"}, "rng": [per-rank states],
"config": plain dict, "version"}``. The teacher / momentum encoder and the DINO center live inside
``model`` (they are submodules of the method). Files in the run directory: ``step-XXXXXXX.pt`` (the
``keep`` newest) and ``last.pt`` (an independent copy of the newest).

What is never written: a checkpoint holding a NaN or an infinity in a parameter, a buffer or an optimizer state
(:func:`first_nonfinite`, one fused check per checkpoint: :class:`TrainingDiverged` names the tensor and the last
good checkpoint stays the newest), and a partial file: a full disk removes the temp file and raises
``DiskFull`` saying which checkpoint is intact.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn

from medfm.data_shards.outputs import disk_full, is_disk_full
from medfm.pretrain.errors import ConfigError, MedfmError, TrainingDiverged

VERSION = 1
LAST = "last.pt"


class CheckpointError(MedfmError, ValueError):
    """A run directory whose checkpoints cannot be read back (all damaged, or of another format version)."""


def step_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:07d}.pt"


def capture_rng() -> dict[str, Any]:
    """This process's python / numpy / torch (and CUDA) generator states, as weights_only-loadable values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            **np_state,
            "state": {
                k: torch.from_numpy(np.asarray(v).copy()) if isinstance(v, np.ndarray) else v
                for k, v in np_state["state"].items()
            },
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: a job may resume with another number of visible GPUs per process
        # (``set_rng_state_all`` of every visible GPU's state then raises).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {k: v.numpy() if torch.is_tensor(v) else v for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    # Earlier checkpoints hold a list (every visible GPU's state): not restored, the GPU count may differ.
    if torch.is_tensor(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def gather_rng() -> list[dict[str, Any]]:
    """Every process's RNG states, on every process (a collective)."""
    # As bytes: all_gather_object cannot carry tensor storages on this torch.
    buffer = io.BytesIO()
    torch.save(capture_rng(), buffer)
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in gather_object([buffer.getvalue()])]


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


def _as_tuple(value: Any) -> Any:
    """random.setstate wants nested tuples; a round trip through a container may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: never a torn file. A failed
    write raises the ``OSError`` itself (ENOSPC on a full disk), not torch's errno-less RuntimeError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            writer = _WriteErrors(handle)
            try:
                torch.save(obj, writer)
            except RuntimeError as err:
                if writer.error is not None:
                    raise writer.error from err
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _WriteErrors:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch's zip writer turns it into a
    RuntimeError ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, handle: Any):
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def _atomic_copy(source: Path, target: Path) -> None:
    """A second, independent copy (not a hard link): one damaged file never takes the only copy of a step."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``last.pt``, then an independent copy as ``step-XXXXXXX.pt`` (once a step file exists, so does the
    newest ``last.pt``); then delete all but the ``keep`` newest step files.

    A full disk raises ``DiskFull`` naming the file and the checkpoint that is intact (no temp file is left)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = step_path(run_dir, state["step"])
    intact = _newest_checkpoint(run_dir)
    target = run_dir / LAST
    try:
        atomic_save({**state, "version": VERSION}, target)
        intact, target = f"{LAST} (step {state['step']}) is intact, the step file is not written", path
        _atomic_copy(run_dir / LAST, path)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(
                f"{target.name} (step {state['step']}) in {run_dir}", intact, "rerun the same command to resume"
            ) from err
        raise
    prune_steps(run_dir, keep)
    return path


def _newest_checkpoint(run_dir: Path) -> str:
    """What the run directory holds before a save, in words (for a message)."""
    steps = sorted(run_dir.glob("step-*.pt"))
    if steps:  # the step files are copies of what last.pt held when they were written
        return f"{LAST} and {steps[-1].name} are intact (the newest checkpoint)"
    if (run_dir / LAST).is_file():
        return f"{LAST} is intact (the newest checkpoint)"
    return "no checkpoint of this run was written yet"


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating tensor in ``tensors`` (nested dicts and lists, names joined by dots) that
    holds a NaN or an infinity; None when all are finite.

    One fused max-|x| per device (``torch._foreach_norm(ord=inf)``, the kernel of ``clip_grad_norm_``; a max never
    overflows as a sum of squares would) and one host sync per device: cheap enough for every checkpoint."""
    named = [(k, t) for k, t in _flat_tensors(tensors) if t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append(index)
    bad = []
    for indices in by_device.values():
        norms = torch._foreach_norm([named[i][1].detach() for i in indices], ord=math.inf)
        flags = ~torch.isfinite(torch.stack([n.float() for n in norms]))
        if bool(flags.any()):
            bad.append(indices[int(flags.nonzero()[0])])
    return named[min(bad)][0] if bad else None


def _flat_tensors(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if torch.is_tensor(value):
        return [(prefix.rstrip("."), value)]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return [pair for key, item in items for pair in _flat_tensors(item, f"{prefix}{key}.")]


def nonfinite_message(step: int, tensor: str | None, run_dir: Path, intact: str | None = None) -> str:
    """Why the checkpoint of ``step`` was not written (``tensor``: the first non-finite one, None: on another
    process) and what is intact (default: the torch checkpoints of ``run_dir``)."""
    what = (
        f"{tensor} holds NaN or infinite values"
        if tensor
        else "a tensor on another process holds NaN or infinite values"
    )
    intact = intact or _newest_checkpoint(Path(run_dir))
    return (
        f"step {step}: {what}, so its checkpoint was not written; in {run_dir}, {intact}. "
        "Lower the learning rate or set clip_grad (under fp16: use bf16), then rerun to resume from it"
    )


def prune_steps(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``step-*.pt`` files (``last.pt`` stays)."""
    for old in sorted(Path(run_dir).glob("step-*.pt"))[: -keep or None]:
        old.unlink(missing_ok=True)


def find_resume(run_dir: str | Path) -> Path | None:
    """``last.pt`` if present, else the newest ``step-*.pt``, else None."""
    candidates = resume_candidates(run_dir)
    return candidates[0] if candidates else None


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints a run could resume from, best first: ``last.pt``, then the step files, newest first."""
    run_dir = Path(run_dir)
    last = [run_dir / LAST] if (run_dir / LAST).is_file() else []
    return last + sorted(run_dir.glob("step-*.pt"), reverse=True)


# What a torn, truncated or emptied file raises from torch.load (a refused pickle is not one of them).
_UNREADABLE = (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError)


def load_newest_readable(run_dir: str | Path) -> tuple[Path, dict[str, Any], list[str]] | None:
    """The newest checkpoint that reads back whole: ``(path, state, warnings)``, each unreadable newer file named
    in a warning; None when there is no checkpoint. A file that needs pickle is refused (``ConfigError``), not
    skipped: it is not damage, and an older file would silently take its place."""
    notes = []
    for path in resume_candidates(run_dir):
        try:
            return path, load_checkpoint(path), notes
        except pickle.UnpicklingError:
            unsafe = unsafe_globals(path)
            if not unsafe:  # garbage bytes read as a legacy pickle: damage, not code
                notes.append(f"{path} is unreadable (not a checkpoint); trying an older checkpoint")
                continue
            raise ConfigError(
                f"config key 'train.run_dir': {path} holds pickled objects other than tensors and plain values "
                f"({', '.join(unsafe[:3])}); medfm resumes with weights_only=True only. Move the file away or use "
                "another run_dir"
            ) from None
        except _UNREADABLE as err:
            first_line = (str(err).splitlines() or ["empty or truncated"])[0][:120]
            notes.append(f"{path} is unreadable ({type(err).__name__}: {first_line}); trying an older checkpoint")
    if notes:
        raise CheckpointError(f"{run_dir}: no readable checkpoint: " + "; ".join(notes))
    return None


def unsafe_globals(path: str | Path) -> list[str]:
    """The classes / functions a torch file would need pickle for (``weights_only=True`` refuses them), read
    without running the file; [] for a file that is not a torch zip file at all (damage)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip / not a pickle: whatever it raises, the file is damaged, not code
        return []


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Safe load (``weights_only=True``) onto the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} (this code reads {VERSION})")
    return state


# --- the store ---------------------------------------------------------------------------------------------------


class CheckpointStore(Protocol):
    """What a backend's store answers (``TorchStore``; ``medfm.pretrain.backends.zero_checkpoint.DeepSpeedStore``).
    ``save`` and the loads are collectives: every process calls them."""

    def latest(self) -> Path | None: ...

    def load_latest(self) -> tuple[Path, dict[str, Any], list[str]] | None: ...

    def save(self, step: int, meta: dict[str, Any]) -> None: ...

    def load(self, path: Path) -> dict[str, Any]: ...

    def prune(self) -> None: ...


class TorchStore:
    """Checkpoints of a DDP / single-process run: ``step-XXXXXXX.pt`` files and ``last.pt`` (see the module doc).

    ``save`` and ``load`` are collectives: every process calls them; the main process writes."""

    def __init__(self, accelerator: Any, run_dir: Path, keep: int, model: nn.Module, optimizer: Any):
        self.accelerator, self.run_dir, self.keep = accelerator, Path(run_dir), keep
        self.model, self.optimizer = model, optimizer

    def latest(self) -> Path | None:
        return find_resume(self.run_dir)

    def load_latest(self) -> tuple[Path, dict[str, Any], list[str]] | None:
        """Load the newest readable checkpoint (older ones when newer files are damaged, with warnings): ``(path,
        meta, warnings)``, or None when there is none. Every process reads the same files."""
        found = load_newest_readable(self.run_dir)
        if found is None:
            return None
        path, state, notes = found
        return path, self._restore(state), notes

    def save(self, step: int, meta: dict[str, Any]) -> None:
        """Every process checks its replica for non-finite values (DDP replicas are equal: every process decides
        alike), the main process writes, and one collective tells every process whether the write failed (a full
        disk), so that all of them stop together instead of waiting for the main one."""
        state = {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **_scaler_state(self.accelerator),
            **meta,
        }
        bad = first_nonfinite({"model": state["model"], "optimizer": {"state": state["optimizer"]["state"]}})
        failure: MedfmError | None = None
        if bad is not None:
            failure = TrainingDiverged(nonfinite_message(step, bad, self.run_dir))
        elif self.accelerator.is_main_process:
            try:
                save_checkpoint(self.run_dir, {**state, "step": step}, keep=self.keep)
            except MedfmError as err:
                failure = err
        if self.accelerator.num_processes > 1:  # in place of a barrier: also says whether any process failed
            flag = torch.tensor(float(failure is not None), device=self.accelerator.device)
            if float(self.accelerator.reduce(flag, "sum")) > 0 and failure is None:
                failure = CheckpointError(
                    f"step {step}: the checkpoint was not written (another process failed: its message says why); "
                    f"in {self.run_dir}, {_newest_checkpoint(self.run_dir)}"
                )
        if failure is not None:
            raise failure

    def load(self, path: Path) -> dict[str, Any]:
        return self._restore(load_checkpoint(path))

    def _restore(self, state: dict[str, Any]) -> dict[str, Any]:
        # strict: a different architecture fails here, by key; every process loads the same weights
        self.accelerator.unwrap_model(self.model).load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))  # after prepare: moments on the parameters' device
        _load_scaler(self.accelerator, state.pop("scaler", None))
        return state

    def prune(self) -> None:
        prune_steps(self.run_dir, self.keep)


def _scaler_state(accelerator: Any) -> dict[str, Any]:
    """fp16's GradScaler (loss scale, growth tracker): without it a resumed run restarts the loss scale."""
    scaler = getattr(accelerator, "scaler", None)
    return {"scaler": scaler.state_dict()} if scaler is not None else {}


def _load_scaler(accelerator: Any, state: dict[str, Any] | None) -> None:
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state:
        scaler.load_state_dict(state)
