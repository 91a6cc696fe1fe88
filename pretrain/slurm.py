"""``medfm slurm``: render an sbatch script from ``slurm/<job>.sbatch`` with resources and a config baked in.

The templates in ``slurm/`` are complete, shellcheck-clean scripts; rendering only rewrites their
``#SBATCH`` resource lines and sets the default arguments (config + overrides), so a rendered script and
the template never drift apart. The scripts pass ``--cpus-per-task`` to srun themselves (Slurm >= 22.05 no longer
hands sbatch's value down to the tasks); rendering warns when the config's ``data.num_workers`` leaves no core of
them for the training process.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from medfm.pretrain.errors import InputError, MissingInputError

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm"
JOBS = ("pretrain", "finetune")


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: time to finish a step and checkpoint


def render(job: str, config: str, overrides: list[str], resources: Resources) -> str:
    """The template of ``job`` with ``resources`` in its #SBATCH lines and ``config overrides`` as default arguments."""
    template = TEMPLATES / f"{job}.sbatch"
    if not template.is_file():
        raise MissingInputError(f"template {template} not found (medfm slurm runs from a clone of the repository)")
    text = template.read_text()
    values = {
        "nodes": str(resources.nodes),
        "gpus-per-node": str(resources.gpus_per_node),
        "ntasks-per-node": str(resources.gpus_per_node),  # one task per GPU
        "cpus-per-task": str(resources.cpus_per_task),
        "time": resources.time,
        "signal": f"USR1@{resources.signal_seconds}",
    }
    if resources.job_name:
        values["job-name"] = resources.job_name
    for key, value in values.items():
        text, count = re.subn(rf"^#SBATCH --{key}=.*$", f"#SBATCH --{key}={value}", text, flags=re.MULTILINE)
        if count != 1 and key in ("nodes", "time"):
            raise InputError(f"template {template} has no single '#SBATCH --{key}=' line")
    extra = [
        f"#SBATCH --{key}={value}"
        for key, value in (("partition", resources.partition), ("account", resources.account))
        if value
    ]
    lines = text.splitlines()
    last_sbatch = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    lines[last_sbatch + 1 : last_sbatch + 1] = extra
    arguments = " ".join(shlex.quote(a) for a in [config, *overrides])
    marker = next(i for i, line in enumerate(lines) if line.startswith("set -euo pipefail"))
    lines.insert(marker + 1, f'[ "$#" -gt 0 ] || set -- {arguments}  # rendered by medfm slurm')
    return "\n".join(lines) + "\n"


def loader_workers(config: str, overrides: list[str]) -> int | None:
    """``data.num_workers`` as the command line or the config file sets it (None: the schema default or unreadable)."""
    for override in reversed(overrides):
        key, _, value = override.partition("=")
        if key == "data.num_workers":
            return int(value) if value.strip().isdigit() else None
    import yaml  # PyYAML (omegaconf's dependency); this module stays free of the training imports

    try:
        value = ((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}).get("num_workers")
    except (OSError, AttributeError, yaml.YAMLError):
        return None
    return value if isinstance(value, int) else None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "slurm",
        help="render an sbatch script (pretrain or finetune) for N nodes x G GPUs from a config",
        description="Render slurm/<JOB>.sbatch with resources filled in; submit the result with sbatch.",
    )
    parser.add_argument("job", choices=JOBS)
    parser.add_argument("config", help="YAML config the job runs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides baked into the script")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per GPU task (data loading)")
    parser.add_argument("--time", default="24:00:00", help="time limit, e.g. 24:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--job-name")
    parser.add_argument("--signal-seconds", type=int, default=300, help="preemption signal lead time")
    parser.add_argument("--out", type=Path, help="write the script here (default: print it)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        print(f"medfm slurm: config {args.config} not found", file=sys.stderr)
        return 2
    resources = Resources(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
    )
    workers = loader_workers(args.config, args.overrides)
    if args.job == "pretrain" and workers is not None and workers >= args.cpus_per_task:
        print(
            f"medfm slurm: warning: data.num_workers={workers} loader processes on --cpus-per-task "
            f"{args.cpus_per_task} leave no core for the training process; add data.num_workers="
            f"{max(args.cpus_per_task - 1, 0)} or raise --cpus-per-task",
            file=sys.stderr,
        )
    script = render(args.job, args.config, args.overrides, resources)
    if args.out is None:
        sys.stdout.write(script)
    else:
        args.out.write_text(script)
        args.out.chmod(0o755)
        print(f"wrote {args.out}; submit with: sbatch {args.out}", file=sys.stderr)
    return 0
