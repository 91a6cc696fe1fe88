"""What the fault tests share: a MedMNIST-style file of noise images, written where a test asks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


def write_noise_npz(path: Path, n: int = 32, size: int = 28) -> Path:
    """A MedMNIST-style file of noise images with binary labels (train n, val and test n / 4)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", n), ("val", n // 4), ("test", n // 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def noise_npz() -> Callable[..., Path]:
    """``noise_npz(path, n=32, size=28)`` writes the file and returns ``path``."""
    return write_noise_npz
