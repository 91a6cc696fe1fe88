"""Shared fixtures: the real medical images in ../shared/data (tests skip with a reason when absent), tiny-model
pretraining overrides, one torch thread per test, and accelerate's process-wide state reset after each test."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MEDFM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real-data folder (see its SOURCES.md); skips the test when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data folder {SHARED_DATA} not found (set MEDFM_SHARED_DATA to point at it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def medmnist(shared_data: Path):
    """``medmnist(name)`` -> path of a MedMNIST file of the shared data (skips when absent)."""

    def path(name: str) -> Path:
        file = shared_data / "medmnist" / f"{name}.npz"
        if not file.is_file():
            pytest.skip(f"{file} not found")
        return file

    return path


@functools.cache
def tiny_teacher() -> Path:
    """A general-purpose model to distil, as a timm hub snapshot folder (written once per test session): a seeded
    RGB ViT-Tiny with one block at 224 px, patch 16, ImageNet normalisation."""
    import json
    import tempfile

    import timm
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):  # the caller's random state is the same whether this ran before or not
        torch.manual_seed(11)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    folder = Path(tempfile.mkdtemp(prefix="medfm-teacher-"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 0,
        "model_args": {"depth": 1},
        "pretrained_cfg": {
            "input_size": [3, 224, 224],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "first_conv": "patch_embed.proj",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tiny_overrides(
    method: str, spec: str, run_dir: Path, backbone: dict[str, object] | None = None, **extra: object
) -> list[str]:
    """A complete pretraining config as ``key=value`` overrides: ``method`` at its ``tiny_config`` size (or with
    ``backbone``), 4 steps of 8 images."""
    from medfm.pretrain.methods import METHODS

    values = {
        "method": method,
        "data.spec": spec,
        "data.samples_per_epoch": 32,
        "data.num_workers": 0,
        **{k: v for k, v in METHODS[method].tiny_config.items() if backbone is None or not k.startswith("model.")},
        **(backbone or {}),
        "train.run_dir": str(run_dir),
        "train.batch_size": 8,
        "schedule.epochs": 1,
        "schedule.warmup_epochs": 0,
        "optim.base_lr": 1e-3,
        "checkpoint.every_steps": 2,
        "logging.every_steps": 2,
        "logging.figure_every_steps": 0,
        "logging.trackers": "[]",
        "logging.progress_bar": False,
        # the general-purpose model that distillation needs and only a test can supply; other methods ignore it
        "distill.teacher": str(tiny_teacher()),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def pretrain_overrides():
    """``pretrain_overrides(method, spec, run_dir, backbone=None, **extra)``: see ``tiny_overrides``."""
    return tiny_overrides


# `medfm` in a child process that sends itself a signal right after the Nth call of a method: a test that kills or
# preempts a run at a known point, where waiting for a file to appear raced the run's end on a fast machine.
_SIGNAL_AFTER = """
import importlib, os, sys
owner = getattr(importlib.import_module({module!r}), {owner!r})
original = getattr(owner, {method!r})
calls = []

def then_signal(*args, **kwargs):
    result = original(*args, **kwargs)
    calls.append(args)
    if len(calls) == {nth}:
        os.kill(os.getpid(), {signum})
    return result

setattr(owner, {method!r}, then_signal)
from medfm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def medfm_signalled_after(target: str, nth: int, signum: int) -> list[str]:
    """``[python, -c, CODE]``, to be followed by ``medfm`` arguments: the command runs and, right after the
    ``nth`` call of ``target`` (``module:Class.method``) returns, sends itself ``signum``."""
    module, _, qualified = target.partition(":")
    owner, _, method = qualified.rpartition(".")
    code = _SIGNAL_AFTER.format(module=module, owner=owner, method=method, nth=nth, signum=int(signum))
    return [sys.executable, "-c", code]


@pytest.fixture(scope="session")
def signalled_after():
    """``signalled_after("medfm.pretrain.checkpoint:TorchStore.save", 1, signal.SIGKILL) + [medfm args]``."""
    return medfm_signalled_after


def pytest_configure(config: pytest.Config) -> None:
    # lightly's DINOProjectionHead uses torch's deprecated weight_norm: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:.*weight_norm.*:FutureWarning")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The test machines share 2 cores between workers: a second intra-op thread makes small ops ~100x slower
    when the other core is busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reset_accelerate_state() -> None:
    """Training builds Accelerators; accelerate keeps process-wide state that must not leak between tests."""
    if "accelerate.state" not in sys.modules:
        return  # never imported: no state to reset
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    yield
    _reset_accelerate_state()


@pytest.fixture(scope="session")
def reset_accelerate() -> Callable[[], None]:
    """The reset ``_fresh_accelerate_state`` runs after each test, for session fixtures that train."""
    return _reset_accelerate_state
