"""Fixtures for the pretraining tests: the real PneumoniaMNIST file and tiny-model overrides."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # lightly's DINOProjectionHead uses torch's deprecated weight_norm: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:.*weight_norm.*:FutureWarning")


@pytest.fixture(scope="session")
def pneumonia(shared_data: Path) -> Path:
    path = shared_data / "medmnist" / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


# Tiny heads and a 2-block ViT-Tiny with 7-px patches (16 tokens at 28 px): a step takes tens of milliseconds.
TINY = {
    "mae": ["mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"],
    "dino": [
        "dino.head_hidden_dim=64",
        "dino.head_bottleneck_dim=32",
        "dino.head_output_dim=128",
        "dino.num_local_crops=2",
        "dino.local_crop_size=14",
        "dino.freeze_last_layer_epochs=0",
    ],
    "simclr": ["simclr.hidden_dim=64", "simclr.output_dim=32"],
    "moco": ["moco.hidden_dim=64", "moco.output_dim=32"],
}


@pytest.fixture
def tiny(pneumonia: Path):
    """``tiny(method, run_dir, **overrides)``: a complete config as overrides, ``method`` on PneumoniaMNIST with
    a tiny ViT, 8 steps per epoch."""

    def overrides(method: str, run_dir: Path, **extra: object) -> list[str]:
        return _tiny_overrides(method, pneumonia, run_dir, **extra)

    return overrides


def _tiny_overrides(method: str, pneumonia: Path, run_dir: Path, **extra: object) -> list[str]:
    values = {
        "method": method,
        "data.spec": f"medmnist:{pneumonia}",
        "data.img_size": 28,
        "data.samples_per_epoch": 64,
        "data.num_workers": 0,
        "model.backbone": "vit_tiny_patch16_224",
        "model.backbone_kwargs.patch_size": 7,
        "model.backbone_kwargs.depth": 2,
        "train.run_dir": str(run_dir),
        "train.batch_size": 8,
        "schedule.epochs": 1,
        "schedule.warmup_epochs": 0,
        "optim.base_lr": 1e-3,
        "checkpoint.every_steps": 4,
        "logging.every_steps": 2,
        "logging.figure_every_steps": 0,
        "logging.tensorboard": False,
        "logging.progress_bar": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()] + TINY[method]


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machines share 2 cores between workers: a second intra-op thread makes small ops much slower
    when the other core is busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """``pretrain()`` builds an Accelerator; accelerate keeps process-wide state that must not leak."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
