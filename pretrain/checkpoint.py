"""One checkpoint contract, written atomically, resumed automatically; released weights as safetensors.

A checkpoint is a dict of tensors and plain Python values (loadable with ``weights_only=True``):
``{"model", "optimizer", "step", "data": {"epoch", "batches_done"}, "rng": [per-rank states],
"config": plain dict, "version"}``. The teacher / momentum encoder and the DINO center live inside
``model`` (they are submodules of the method). Files in the run directory: ``step-XXXXXXX.pt`` (the
``keep`` newest) and ``last.pt`` (a hard link to the newest, or a copy where links are unsupported).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

VERSION = 1
LAST = "last.pt"


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


def _atomic_link(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # filesystems without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``step-XXXXXXX.pt`` and point ``last.pt`` at it; then delete all but the ``keep`` newest."""
    run_dir = Path(run_dir)
    path = step_path(run_dir, state["step"])
    atomic_save({**state, "version": VERSION}, path)
    _atomic_link(path, run_dir / LAST)
    for old in sorted(run_dir.glob("step-*.pt"))[: -keep or None]:
        old.unlink(missing_ok=True)
    return path


def find_resume(run_dir: str | Path) -> Path | None:
    """``last.pt`` if present, else the newest ``step-*.pt``, else None."""
    run_dir = Path(run_dir)
    if (run_dir / LAST).is_file():
        return run_dir / LAST
    steps = sorted(run_dir.glob("step-*.pt"))
    return steps[-1] if steps else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Safe load (``weights_only=True``) onto the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} (this code reads {VERSION})")
    return state


def export_backbone(backbone: nn.Module, path: str | Path, metadata: dict[str, str]) -> None:
    """Release weights: the backbone's state dict as safetensors (atomically), with string metadata."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
