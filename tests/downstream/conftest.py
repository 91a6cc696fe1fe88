"""Fixtures for the downstream tests: a tiny real pretraining run, its release, and real labeled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


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


def make_binary_npz(path: Path, n: int = 40, size: int = 28, seed: int = 0) -> Path:
    """A MedMNIST-style binary task: noise, plus a bright square for class 1 (train n, val and test n / 4)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n), ("val", n // 4), ("test", n // 4)):
        labels = np.arange(count) % 2
        images = rng.normal(70, 20, (count, size, size))
        images[labels == 1, 6:14, 6:14] = 220
        arrays[f"{split}_images"] = images.clip(0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def binary_npz():
    """``binary_npz(path, n=40, size=28, seed=0)``: see ``make_binary_npz``."""
    return make_binary_npz


@pytest.fixture(scope="session")
def shapes_csv():
    """``shapes_csv(root, n=120)``: see ``make_shapes_csv``."""
    return make_shapes_csv


@pytest.fixture(scope="session")
def brain_mri(shared_data: Path) -> Path:
    folder = shared_data / "imagefolder" / "brain_tumor_mri_4class"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


@pytest.fixture(scope="session")
def tiny_run(medmnist, pretrain_overrides, tmp_path_factory, reset_accelerate) -> Path:
    """A real 4-step DINO run on PneumoniaMNIST through pretrain's own entry point (~5 s)."""
    from medfm.pretrain.main import pretrain

    run_dir = tmp_path_factory.mktemp("runs") / "dino_tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread (session fixtures run before it)
    try:
        code = pretrain(None, pretrain_overrides("dino", f"medmnist:{medmnist('pneumoniamnist')}", run_dir))
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    assert code == 0
    return run_dir


@pytest.fixture(scope="session")
def tiny_release(tiny_run: Path, tmp_path_factory) -> Path:
    from medfm.pretrain.export import export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("releases") / "dino_tiny")


@pytest.fixture(scope="session")
def general_snapshot(tmp_path_factory) -> Path:
    """A general-purpose model as a timm hub snapshot folder: a seeded RGB ViT-Tiny (2 blocks) at 224 px, patch 16,
    with its ImageNet classifier (which a backbone comparison drops)."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(5)
    general = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, depth=2)
    snapshot = tmp_path_factory.mktemp("general") / "vit_tiny_general"
    snapshot.mkdir()
    save_file({k: v.contiguous() for k, v in general.state_dict().items()}, str(snapshot / "model.safetensors"))
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000, "model_args": {"depth": 2},
              "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "first_conv": "patch_embed.proj", "classifier": "head"}}  # fmt: skip
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot
