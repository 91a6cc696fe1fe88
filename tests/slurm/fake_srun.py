"""A fake ``srun`` for the sbatch tests: N tasks on one node with Slurm's semantics for what the tests check.

- N from ``--ntasks`` / ``-n``, else ``SLURM_NTASKS`` (what sbatch exports); each task gets ``SLURM_PROCID``,
  ``SLURM_LOCALID`` and ``SLURM_NTASKS``.
- ``SLURM_CPUS_PER_TASK`` reaches a task only when ``--cpus-per-task`` / ``-c`` or ``SRUN_CPUS_PER_TASK`` is given,
  as on Slurm >= 22.05, which binds a step's task to one CPU otherwise (sbatch's value is not inherited).
- ``--kill-on-bad-exit=1`` / ``-K``: once a task exits non-zero, every process of the other tasks is SIGKILLed
  (as the step's cgroup is: the task's descendants too, whatever their process group).
- Returns the highest exit code of the tasks, 128 + signal for a killed one (137 for SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SHORT = {"-n": "ntasks", "-c": "cpus-per-task", "-K": "kill-on-bad-exit"}


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    while argv and argv[0].startswith("-"):
        arg = argv.pop(0)
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            options[key] = value or "1"
        elif arg == "-K":
            options["kill-on-bad-exit"] = "1"
        else:
            options[SHORT[arg]] = argv.pop(0)
    return options, argv


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_task(pid: int) -> None:
    for target in [pid, *descendants(pid)]:  # collected before the kill: orphans are reparented
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def main() -> int:
    options, command = parse(sys.argv[1:])
    ntasks = int(options.get("ntasks") or os.environ["SLURM_NTASKS"])
    cpus = options.get("cpus-per-task") or os.environ.get("SRUN_CPUS_PER_TASK")
    kill_on_bad_exit = options.get("kill-on-bad-exit", "0") != "0"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    ranks = [{"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_NTASKS": str(ntasks)} for i in range(ntasks)]
    tasks = [subprocess.Popen(command, env={**env, **rank}) for rank in ranks]
    codes: list[int | None] = [None] * ntasks
    while None in codes:
        for i, task in enumerate(tasks):
            if codes[i] is None and (returncode := task.poll()) is not None:
                codes[i] = returncode if returncode >= 0 else 128 - returncode
                if codes[i] and kill_on_bad_exit:
                    for j, other in enumerate(tasks):
                        if codes[j] is None and other.poll() is None:
                            kill_task(other.pid)
        time.sleep(0.01)
    for i, code in enumerate(codes):
        if code:
            print(f"srun: error: task {i}: exited with exit code {code}", file=sys.stderr)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
