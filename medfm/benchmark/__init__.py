"""``medfm bench quality``: is a medfm backbone worth it? One command pools unlabeled images into shards, pretrains
one backbone per recipe on the pool (labels never used), evaluates every release on every labeled task (kNN,
linear probe and a short fine-tune, label fractions over seeds, against the same architecture at random init) and
writes one results table (Markdown + JSON) next to published numbers, with plots.

The chain is a list of ``medfm`` command lines (shown as they run, so any step can be reproduced by hand).
A step that finished is recorded in ``OUT/steps/`` with its wall time and is not run again: re-running the same
command continues an interrupted benchmark (pretraining itself resumes from its checkpoints).
``run_benchmark(cfg, run_step)`` takes the function that runs one command line, so this module does not import
the console command.
"""

from medfm.benchmark.config import QualityConfig, Step, load_quality_config
from medfm.benchmark.pipeline import BenchmarkError, RunStep, plan_steps, run_benchmark
from medfm.benchmark.report import (
    METRICS,
    ablation_rows,
    ablation_section,
    budget_table,
    build_report,
    check_target,
    markdown,
    result_rows,
    write_report,
)

__all__ = [
    "METRICS",
    "BenchmarkError",
    "QualityConfig",
    "RunStep",
    "Step",
    "ablation_rows",
    "ablation_section",
    "budget_table",
    "build_report",
    "check_target",
    "load_quality_config",
    "markdown",
    "plan_steps",
    "result_rows",
    "run_benchmark",
    "write_report",
]
