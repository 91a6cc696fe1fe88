"""What ``pip install medfm`` puts into site-packages: the package ``medfm`` only (its folders data_shards/,
pretrain/ and downstream/ become medfm.data_shards, medfm.pretrain and medfm.downstream), so no other installed
package or user module named ``pretrain`` or ``data_shards`` clashes with it. Builds the wheel from a copy of the
sources with the venv's setuptools (no index needed) and installs it into a folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "medfm", "data_shards", "pretrain", "downstream")


def test_the_wheel_installs_the_medfm_namespace_only(tmp_path):
    tree = tmp_path / "src"
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy(source, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(tree)]
    subprocess.run(build, check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("medfm-*.whl")
    target = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert installed == ["medfm"], installed
    packages = {p.parent.relative_to(target).as_posix() for p in target.rglob("__init__.py")}
    assert {"medfm/data_shards", "medfm/pretrain", "medfm/pretrain/methods", "medfm/downstream"} <= packages
    assert (target / "medfm" / "pretrain" / "methods" / "spark.py").is_file()
    assert (target / "medfm" / "pretrain" / "release" / "card.md").is_file()  # package data: the card template
    scripts = (next(target.glob("medfm-*.dist-info")) / "entry_points.txt").read_text()
    assert "medfm = medfm.cli:main" in scripts
    # every package folder of the repository is in the wheel (a new subpackage must be listed in pyproject.toml)
    for folder in ("data_shards", "pretrain", "downstream"):
        for init in (REPO / folder).rglob("__init__.py"):
            assert (target / "medfm" / init.relative_to(REPO)).is_file(), f"{init.parent} is not in the wheel"
    # the installed copy imports from anywhere, without the repository on the path
    probe = "import medfm, medfm.pretrain.methods as m; print(m.__file__, sorted(m.METHODS), callable(medfm.pretrain))"
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(target / "medfm" / "pretrain" / "methods"))
    assert "spark" in out.stdout and out.stdout.strip().endswith("True")
