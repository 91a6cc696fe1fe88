"""One checkpoint contract, written atomically, resumed automatically, behind one store with two backends.

``checkpoint_store(accelerator, run_dir, keep)`` gives a :class:`TorchStore` (one ``.pt`` file per checkpoint) or,
under DeepSpeed, a :class:`DeepSpeedStore` (one directory per checkpoint: the engine's ZeRO partitions plus our
part); both answer ``latest()``, ``save(step, meta)``, ``load(path) -> meta`` and ``prune()``. ``meta`` is what
the loop adds to the weights (step, data position, RNG states, config, anything else plain).

A checkpoint is a dict of tensors and plain Python values (loadable with ``weights_only=True``):
``{"model", "optimizer", "step", "data": {"epoch", "batches_done"}, "rng": [per-rank states],
"config": plain dict, "version"}``. The teacher / momentum encoder and the DINO center live inside
``model`` (they are submodules of the method). Files in the run directory: ``step-XXXXXXX.pt`` (the
``keep`` newest) and ``last.pt`` (a hard link to the newest, or a copy where links are unsupported).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn

from pretrain.errors import ConfigError, ReleaseError

VERSION = 1
LAST = "last.pt"
DEEPSPEED_TAG = "zero"  # sub-folder of a checkpoint directory that DeepSpeed writes
META = "medfm.pt"  # our part of a DeepSpeed checkpoint: step, data position, RNG, config, EMA modules
LAST_DIR = "last"  # symlink to the newest DeepSpeed checkpoint directory


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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {k: v.numpy() if torch.is_tensor(v) else v for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    newest ``last.pt``); then delete all but the ``keep`` newest step files."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = step_path(run_dir, state["step"])
    atomic_save({**state, "version": VERSION}, run_dir / LAST)
    _atomic_copy(run_dir / LAST, path)
    prune_steps(run_dir, keep)
    return path


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
        except pickle.UnpicklingError as err:
            if "Unsupported global" not in str(err):  # garbage bytes read as a legacy pickle: damage, not code
                notes.append(f"{path} is unreadable (not a checkpoint); trying an older checkpoint")
                continue
            reason = (str(err).split("WeightsUnpickler error:")[-1].strip().splitlines() or ["?"])[0]
            raise ConfigError(
                f"config key 'train.run_dir': {path} holds pickled objects other than tensors and plain values "
                f"({reason}); medfm resumes with weights_only=True only. Move the file away or use another run_dir"
            ) from None
        except _UNREADABLE as err:
            first_line = (str(err).splitlines() or ["empty or truncated"])[0][:120]
            notes.append(f"{path} is unreadable ({type(err).__name__}: {first_line}); trying an older checkpoint")
    if notes:
        raise ValueError(f"{run_dir}: no readable checkpoint: " + "; ".join(notes))
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Safe load (``weights_only=True``) onto the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} (this code reads {VERSION})")
    return state


# --- DeepSpeed checkpoint directories ------------------------------------------------------------------------


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
        raise ValueError(f"{path}: checkpoint version {meta.get('version')} (this code reads {VERSION})")
    return meta


def load_deepspeed(engine: Any, method: nn.Module, path: Path, world_size: int) -> dict[str, Any]:
    """Collective: load the ZeRO partitions of ``path`` into the engine (same number of processes as when saved)
    and the EMA modules into ``method``; returns the checkpoint's ``medfm.pt`` (step, data, rng, config)."""
    meta = load_meta(path)
    saved = len(meta["rng"])
    if saved != world_size:
        raise ConfigError(
            f"{path}: a DeepSpeed checkpoint resumes on the number of processes that saved it ({saved}, now "
            f"{world_size}); consolidate it (pretrain.checkpoint.consolidate_deepspeed) to start a new run"
        )
    loaded, _ = engine.load_checkpoint(
        str(path), tag=DEEPSPEED_TAG, load_module_strict=True, load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )  # fmt: skip
    if loaded is None:
        raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint under tag {DEEPSPEED_TAG!r}")
    for name, state in meta["momentum"].items():
        getattr(method, name).load_state_dict(state)
    return meta


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its checkpoint files (enums and plain records, no code)."""
    found: list[Any] = []
    for module, names in (("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):  # fmt: skip
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
    anything else is refused with a ReleaseError naming it, before any of its code could run."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as err:
            reason = (str(err).split("WeightsUnpickler error:")[-1].strip().splitlines() or ["?"])[0]
            file = args[0] if args else kwargs.get("f", where)
            raise ReleaseError(
                f"{file}: refused to unpickle it ({reason}); medfm reads DeepSpeed checkpoints with "
                "weights_only=True only, so a checkpoint from elsewhere cannot run code on export"
            ) from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


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
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint ({LAST_DIR}/ or step-*/ with {META})")
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


# --- the store ---------------------------------------------------------------------------------------------------


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
        if self.accelerator.is_main_process:
            state = {"model": self.accelerator.unwrap_model(self.model).state_dict(),
                     "optimizer": self.optimizer.state_dict(), **_scaler_state(self.accelerator), **meta}  # fmt: skip
            save_checkpoint(self.run_dir, {**state, "step": step}, keep=self.keep)
        self.accelerator.wait_for_everyone()

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
        save_deepspeed(self.accelerator, self.engine, self.run_dir, {**meta, "step": step, "momentum": momentum},
                       step, keep=self.keep)  # fmt: skip

    def load(self, path: Path) -> dict[str, Any]:
        return load_deepspeed(self.engine, self.method(), path, self.accelerator.num_processes)

    def prune(self) -> None:
        newest = self.latest()
        if newest is not None:
            prune_step_dirs(self.run_dir, self.keep, newest)


def checkpoint_store(accelerator: Any, run_dir: Path, keep: int, model: Any, optimizer: Any,
                     deepspeed: bool) -> TorchStore | DeepSpeedStore:  # fmt: skip
    """The store of a run (``model`` / ``optimizer`` as returned by ``accelerator.prepare``)."""
    if deepspeed:
        return DeepSpeedStore(accelerator, run_dir, keep, model, lambda: accelerator.unwrap_model(model))
    return TorchStore(accelerator, run_dir, keep, model, optimizer)


def _scaler_state(accelerator: Any) -> dict[str, Any]:
    """fp16's GradScaler (loss scale, growth tracker): without it a resumed run restarts the loss scale."""
    scaler = getattr(accelerator, "scaler", None)
    return {"scaler": scaler.state_dict()} if scaler is not None else {}


def _load_scaler(accelerator: Any, state: dict[str, Any] | None) -> None:
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state:
        scaler.load_state_dict(state)
