"""Slurm preemption without a cluster: SIGUSR1 to a running `medfm pretrain` -> checkpoint, exit 75, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.preemption import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[2]


def command(overrides: list[str]) -> list[str]:
    config = str(REPO / "configs/pretrain/mae_vit_tiny_pneumonia28.yaml")
    return [sys.executable, "-m", "medfm.cli", "pretrain", "--config", config, *overrides]


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_exits_75_and_the_next_launch_resumes(tiny, tmp_path: Path, signum: int, signalled_after):
    extra = {"schedule.epochs": 4, "schedule.warmup_epochs": 1, "checkpoint.every_steps": 4}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    preempt = signalled_after("medfm.pretrain.checkpoint:TorchStore.save", 1, signum)  # after step 4's checkpoint
    process = subprocess.run(
        [*preempt, *command(tiny("mae", run, **extra))[3:]],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    assert process.returncode == EXIT_REQUEUE, process.stderr.decode()[-2000:]
    stopped_at = ckpt.load_checkpoint(run / "last.pt")["step"]
    assert 4 <= stopped_at < 32, "the run finished before the signal"
    assert [e["step"] for e in events(run, "preempted")] == [stopped_at]
    assert events(run, "preempted")[0]["signal"] == signal.Signals(signum).name

    done = subprocess.run(command(tiny("mae", run, **extra)), cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert [e["step"] for e in events(run, "resume")] == [stopped_at]
    assert ckpt.load_checkpoint(run / "last.pt")["step"] == 32
    assert all(torch.isfinite(v).all() for v in ckpt.load_checkpoint(run / "last.pt")["model"].values())
