"""The training process of one fake Slurm task, started by the real ``medfm pretrain`` supervisor
(``MEDFM_SUPERVISE_CHILD``): logs what it sees to ``$CALLS`` and exits as ``$FAKE_EXITS`` says for its rank.

``FAKE_EXITS``: one entry per rank, comma-separated: ``CODE`` exits at once (and marks "a task has exited"),
``CODE:late`` waits for that mark, then ``$FAKE_LATE_S`` seconds (a rank still tearing down), then exits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def log(line: str) -> None:
    with open(os.environ["CALLS"], "a") as calls:
        calls.write(line + "\n")


def main() -> int:
    rank = int(os.environ["RANK"])
    code, _, when = os.environ["FAKE_EXITS"].split(",")[rank].partition(":")
    env = os.environ
    log(
        f"task rank={rank} local={env['LOCAL_RANK']} world={env['WORLD_SIZE']} "
        f"cpus={env.get('SLURM_CPUS_PER_TASK', 'unset')} omp={env.get('OMP_NUM_THREADS')} "
        f"master={env['MASTER_ADDR']} args={' '.join(sys.argv[1:])}"
    )
    first = Path(os.environ["CALLS"]).with_name("first-exit")
    if when == "late":
        deadline = time.monotonic() + 60
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(float(os.environ.get("FAKE_LATE_S", "30")))
    log(f"exit rank={rank} code={code}")
    first.touch()
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
