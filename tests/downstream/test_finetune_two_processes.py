"""Fine-tuning under a real 2-process launch (gloo on CPU): one process writes, both train in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_process_finetune(tiny_release, medmnist, tmp_path):
    out = tmp_path / "ft"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "medfm.downstream.cli", "finetune", "--backbone", str(tiny_release),
        "--data", f"medmnist:{medmnist('breastmnist')}", "--out", str(out),
        "train.max_steps=4", "train.batch_size=16", "plots=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Accelerator(cpu=True) in the script: gloo on CPU
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "release" / "results.json").read_text())
    assert result["settings"]["derived"]["world_size"] == 2 and result["settings"]["derived"]["global_batch"] == 32
    assert result["test"]["n"] == 156  # gathered from both processes without the padding duplicates
    assert len((out / "release" / "metrics.jsonl").read_text().splitlines()) == len(result["history"])
