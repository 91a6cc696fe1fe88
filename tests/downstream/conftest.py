"""Fixtures for the downstream tests: a tiny real pretraining run, its release, and real labeled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# 2-block ViT-Tiny with 7-px patches at 28 px (16 tokens): a forward pass over 100 images takes ~0.1 s.
TINY_VIT = {
    "model.backbone": "vit_tiny_patch16_224",
    "model.backbone_kwargs.patch_size": 7,
    "model.backbone_kwargs.depth": 2,
}
TINY_HEADS = {
    "dino": {"dino.head_hidden_dim": 64, "dino.head_bottleneck_dim": 32, "dino.head_output_dim": 128,
             "dino.num_local_crops": 2, "dino.local_crop_size": 14, "dino.freeze_last_layer_epochs": 0},
    "mae": {"mae.decoder_dim": 32, "mae.decoder_depth": 1, "mae.decoder_heads": 2},
    "moco": {"moco.hidden_dim": 64, "moco.output_dim": 32},
    "simclr": {"simclr.hidden_dim": 64, "simclr.output_dim": 32},
}  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    # lightly's DINOProjectionHead uses torch's deprecated weight_norm: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:.*weight_norm.*:FutureWarning")


def tiny_overrides(
    method: str, spec: str, run_dir: Path, backbone: dict[str, object] | None = None, **extra: object
) -> list[str]:
    """A complete pretraining config as ``key=value`` overrides: ``method`` with a tiny ViT (or ``backbone``),
    4 steps of 8 images."""
    values = {
        "method": method,
        "data.spec": spec,
        "data.img_size": 28,
        "data.samples_per_epoch": 32,
        "data.num_workers": 0,
        **(TINY_VIT if backbone is None else backbone),
        "train.run_dir": str(run_dir),
        "train.batch_size": 8,
        "schedule.epochs": 1,
        "schedule.warmup_epochs": 0,
        "optim.base_lr": 1e-3,
        "checkpoint.every_steps": 2,
        "logging.every_steps": 2,
        "logging.figure_every_steps": 0,
        "logging.tensorboard": False,
        "logging.progress_bar": False,
        **TINY_HEADS[method],
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def make_shapes_csv(root: Path, n: int = 120) -> Path:
    """Synthetic multi-label task: 28-px gray images with a bright square (top left), bar (bottom), dot (centre)."""
    rng = np.random.default_rng(0)
    rows = ["path,square,bar,dot,split"]
    (root / "images").mkdir(parents=True)
    for i in range(n):
        labels = rng.integers(0, 2, 3)
        image = rng.normal(60, 15, (28, 28))
        if labels[0]:
            image[2:10, 2:10] = 230
        if labels[1]:
            image[22:26, 4:24] = 230
        if labels[2]:
            image[12:16, 12:16] = 230
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        split = "train" if i < 80 else "val" if i < 95 else "test"
        rows.append(f"images/{i:03d}.png,{labels[0]},{labels[1]},{labels[2]},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def reset_accelerate() -> None:
    """``pretrain()`` builds an Accelerator; accelerate keeps process-wide state that must not leak."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Fine-tuning builds Accelerators; accelerate keeps process-wide state that must not leak between tests."""
    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machines share 2 cores between workers: a second intra-op thread makes small ops ~100x slower
    when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrain_overrides():
    """``pretrain_overrides(method, spec, run_dir, backbone=None, **extra)``: see ``tiny_overrides``."""
    return tiny_overrides


@pytest.fixture(scope="session")
def shapes_csv():
    """``shapes_csv(root, n=120)``: see ``make_shapes_csv``."""
    return make_shapes_csv


@pytest.fixture(scope="session")
def medmnist(shared_data: Path):
    """``medmnist(name)`` -> path of a MedMNIST file of the shared data (skips when absent)."""

    def path(name: str) -> Path:
        file = shared_data / "medmnist" / f"{name}.npz"
        if not file.is_file():
            pytest.skip(f"{file} not found")
        return file

    return path


@pytest.fixture(scope="session")
def brain_mri(shared_data: Path) -> Path:
    folder = shared_data / "imagefolder" / "brain_tumor_mri_4class"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


@pytest.fixture(scope="session")
def tiny_run(medmnist, tmp_path_factory) -> Path:
    """A real 4-step DINO run on PneumoniaMNIST through pretrain's own entry point (~5 s)."""
    from pretrain.main import pretrain

    run_dir = tmp_path_factory.mktemp("runs") / "dino_tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread (session fixtures run before it)
    try:
        code = pretrain(None, tiny_overrides("dino", f"medmnist:{medmnist('pneumoniamnist')}", run_dir))
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    assert code == 0
    return run_dir


@pytest.fixture(scope="session")
def tiny_release(tiny_run: Path, tmp_path_factory) -> Path:
    from pretrain.export import export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("releases") / "dino_tiny")
