"""Fixtures for the Python API tests: the real PneumoniaMNIST file (skips when the shared data is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pneumonia(medmnist) -> Path:
    return medmnist("pneumoniamnist")
