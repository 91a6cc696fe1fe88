"""Shared fixtures: the real medical images in ../shared/data (tests skip with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MEDFM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real-data folder (see its SOURCES.md); skips the test when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data folder {SHARED_DATA} not found (set MEDFM_SHARED_DATA to point at it)")
    return SHARED_DATA
