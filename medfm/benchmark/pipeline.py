"""The benchmark as ``medfm`` command lines (``plan_steps``) and the loop that runs those not yet done
(``run_benchmark``), each finished one recorded in ``OUT/steps/`` with its wall time."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from medfm.benchmark.config import Step
from medfm.benchmark.report import build_report, write_report
from medfm.data_shards.manifest import Manifest
from medfm.pretrain.config import load_config as load_pretrain_config
from medfm.pretrain.config import save_config

RunStep = Callable[[list[str]], int]  # one medfm command line (without "medfm") -> exit code


def _list(values: Sequence[Any]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def plan_steps(cfg: DictConfig) -> list[Step]:
    """The benchmark as medfm command lines, in the order they run."""
    out = Path(cfg.out_dir)
    pool = out / "pool"
    shard = ["shard", *cfg.pool.sources, "--out", str(pool), "--splits", *cfg.pool.splits,
             "--dedup", cfg.pool.dedup, "--workers", str(cfg.workers), "--hash-paths"]  # fmt: skip
    if cfg.pool.max_side is not None:
        shard += ["--max-side", str(cfg.pool.max_side)]
    steps = [
        Step("shard", "pool the unlabeled train images", (*shard, "--overwrite")),
        Step("inspect", "look at the pool", ("shard", "inspect", str(pool))),
    ]
    recipe_names = {recipe.name for recipe in cfg.recipes}
    for recipe in cfg.recipes:
        run_dir = out / "pretrain" / recipe.name
        data = [f"data.spec=shards:{pool}"]
        if recipe.reduce is not None:
            reduction = recipe.reduce
            reduced = out / "pool_reduced" / recipe.name
            model = str(out / "pretrain" / reduction.model) if reduction.model in recipe_names else reduction.model
            steps.append(Step("reduce", f"reduce the pool for {recipe.name} ({reduction.method}, keep {reduction.keep})",
                              ("shard", "reduce", str(pool), "--model", model, "--keep", str(reduction.keep),
                               "--method", reduction.method, "--out", str(reduced), "--overwrite")))  # fmt: skip
            # an epoch as long as on the whole pool: the recipe's own samples_per_epoch, else the pool's size (known
            # once it is written: run_benchmark plans again before every step)
            size = load_pretrain_config(
                recipe.config, ["data.spec=shards:unused", "train.run_dir=unused", *recipe.overrides]
            ).data.samples_per_epoch
            if size is None:
                size = Manifest.read(pool).totals["samples"] if Manifest.exists(pool) else "POOL_SIZE"
            data = [f"data.spec=shards:{reduced}", f"data.samples_per_epoch={size}"]
        # data.split=null: every pool image, also those of sources without splits (DICOM, NIfTI)
        argv = [
            "pretrain",
            "--config",
            recipe.config,
            *data,
            f"train.run_dir={run_dir}",
            "data.split=null",
            *recipe.overrides,
        ]
        steps.append(Step("pretrain", f"pretrain {recipe.name}", tuple(argv)))
    for recipe in cfg.recipes:
        for task in cfg.tasks:
            argv = ["eval", "--backbone", str(out / "pretrain" / recipe.name), "--data", task.spec,
                    "--out", str(out / "eval" / recipe.name / task.name), "backbone.inits=[release,random]",
                    f"protocols={_list(cfg.frozen.protocols)}", f"efficiency.fractions={_list(cfg.frozen.fractions)}",
                    f"efficiency.seeds={_list(cfg.frozen.seeds)}", "robustness.corruptions=[]",
                    *cfg.frozen.overrides, *task.overrides]  # fmt: skip
            steps.append(Step("eval", f"kNN + linear probe: {recipe.name} on {task.name}", tuple(argv)))
    if cfg.finetune.enabled:
        # the recipes named in finetune.recipes (an ablation too: a method comparison fine-tunes both), else every
        # recipe that is not an ablation
        named = cfg.finetune.recipes
        tuned = [r for r in cfg.recipes if (r.name in named if named else r.ablation_of is None)]
        for recipe in tuned:
            for task in (t for t in cfg.tasks if t.finetune):
                argv = ["finetune", *(["--config", cfg.finetune.config] if cfg.finetune.config else []),
                        "--backbone", str(out / "pretrain" / recipe.name), "--data", task.spec,
                        "--out", str(out / "finetune" / recipe.name / task.name), "backbone.inits=[release,random]",
                        f"efficiency.fractions={_list(cfg.finetune.fractions)}",
                        f"efficiency.seeds={_list(cfg.finetune.seeds)}", "robustness.corruptions=[]",
                        *cfg.finetune.overrides, *task.overrides]  # fmt: skip
                steps.append(Step("finetune", f"fine-tune: {recipe.name} on {task.name}", tuple(argv)))
    return steps


def run_benchmark(cfg: DictConfig, run_step: RunStep, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step not yet done (``OUT/steps/<key>.json`` marks a finished one), then write the report."""
    out = Path(cfg.out_dir)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    steps = plan_steps(cfg)
    started = time.monotonic()
    for number in range(1, len(steps) + 1):
        step = steps[number - 1] = plan_steps(cfg)[number - 1]  # planned again: a step may follow from an earlier one
        marker = out / "steps" / f"{step.key}.json"
        prefix = f"[{number}/{len(steps)} {_clock(time.monotonic() - started)}]"
        if marker.is_file():
            echo(f"{prefix} done before: {step.label}")
            continue
        echo(f"{prefix} {step.label}\n$ medfm {' '.join(step.argv)}")
        step_start = time.monotonic()
        code = run_step(list(step.argv))
        if code != 0:
            raise BenchmarkError(f"step {number} ({step.label}) failed with exit code {code}", code)
        record = {
            "stage": step.stage,
            "label": step.label,
            "argv": list(step.argv),
            "seconds": time.monotonic() - step_start,
        }
        marker.write_text(json.dumps(record, indent=2))
    report = build_report(cfg, steps)
    write_report(cfg, report)
    return report


class BenchmarkError(RuntimeError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):d}:{int(seconds % 60):02d}"
