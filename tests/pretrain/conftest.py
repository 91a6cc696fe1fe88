"""Fixtures for the pretraining tests: the real PneumoniaMNIST file and tiny-model overrides."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pneumonia(medmnist) -> Path:
    return medmnist("pneumoniamnist")


@pytest.fixture
def tiny(pneumonia: Path, pretrain_overrides):
    """``tiny(method, run_dir, **overrides)``: a complete config as overrides, ``method`` on PneumoniaMNIST with
    a tiny ViT, 8 steps per epoch."""

    def overrides(method: str, run_dir: Path, **extra: object) -> list[str]:
        spec = f"medmnist:{pneumonia}"
        return pretrain_overrides(
            method, spec, run_dir, **{"data.samples_per_epoch": 64, "checkpoint.every_steps": 4, **extra}
        )

    return overrides
