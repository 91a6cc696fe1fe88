"""The lowest timm and lightly that pyproject.toml declares really work: the parts of the suite that touch their
APIs (every SSL method's heads and losses, ViT building on the meta device, local-dir: loading, export, warm
starts, shard readers) run in a subprocess with those two versions first on the path.

Slow: it installs the two wheels (``pip install --no-deps --target``) from the package index and skips, saying
so, when the index cannot be reached."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SLICE = [
    "tests/pretrain/test_methods.py",
    "tests/pretrain/test_dinov2.py",
    "tests/pretrain/test_distill.py",
    "tests/pretrain/test_transforms.py",
    "tests/pretrain/test_warm_start.py",
    "tests/downstream/test_export.py",
    "tests/downstream/test_load.py",
    "tests/data_shards/test_stream.py",
]


def declared_floors() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    floors = dict(re.findall(r'"(timm|lightly)>=([0-9.]+)', text))
    assert set(floors) == {"timm", "lightly"}, floors
    return floors


def test_the_lowest_declared_timm_and_lightly_pass_their_slice_of_the_suite(tmp_path: Path) -> None:
    floors = declared_floors()
    target = tmp_path / "lowest"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         *(f"{name}=={version}" for name, version in floors.items())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if install.returncode != 0:
        pytest.skip(f"cannot install {floors} from the package index: {install.stderr.strip()[-300:]}")
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    probe = "import timm, lightly; print(timm.__version__, lightly.__version__)"
    versions = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert [Version(v) for v in versions.stdout.split()] == [Version(floors["timm"]), Version(floors["lightly"])]
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *SLICE],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-2000:]
