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

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig

from medfm.data_shards.manifest import Manifest
from medfm.pretrain.config import OUTPUT_PATH, Need, config_need, load_structured, save_config, to_dict
from medfm.pretrain.config import load_config as load_pretrain_config

RunStep = Callable[[list[str]], int]  # one medfm command line (without "medfm") -> exit code
METRICS = ("acc", "auc")


@dataclass
class PoolConfig:
    """The unlabeled pretraining pool: ``medfm shard SOURCES --splits SPLITS`` (val / test images stay out)."""

    sources: list[str] = MISSING  # medfm shard SOURCEs: folders, files, medmnist:, imagefolder:, csv:
    splits: list[str] = field(default_factory=lambda: ["train"])  # kept splits of sources that define splits
    max_side: int | None = 64  # stored size; the recipes' data.img_size decides the training size
    dedup: str = "exact"  # none | exact | near


@dataclass
class PoolReduction:
    """Pretrain on a reduced pool (``medfm shard reduce``), for the same number of steps as on the whole pool."""

    model: str = MISSING  # the recipe whose release embeds the pool (it runs first), or any --model source
    keep: float = 0.5  # fraction of the pool kept
    method: str = "kcenter"  # kcenter | random (the same-size comparison)


@dataclass
class RecipeConfig:
    name: str = MISSING  # folder name under OUT/pretrain/
    config: str = MISSING  # a pretraining YAML (configs/pretrain/...)
    overrides: list[str] = field(default_factory=list)  # key=value on top (schedule, image size, ...)
    # An ablation: the name of the recipe this one varies (e.g. that recipe before a change, by overrides). It is
    # pretrained and probed like the others, then compared with it row by row under "Ablation" (same tasks, label
    # subsets and seeds); it is not fine-tuned nor counted for the target.
    ablation_of: str | None = None
    # pretrain on OUT/pool_reduced/<name> instead of the whole pool, with data.samples_per_epoch = the whole pool's
    # size (the same steps as a recipe on the whole pool)
    reduce: PoolReduction | None = None


@dataclass
class Reference:
    """A published number to compare with: test ACC / AUC and the protocol it was measured under."""

    acc: float | None = None
    auc: float | None = None
    protocol: str = ""


@dataclass
class TaskConfig:
    name: str = MISSING
    spec: str = MISSING  # a labeled dataset spec (medmnist:, imagefolder:, csv:, shards:)
    overrides: list[str] = field(default_factory=list)  # extra eval / finetune keys, e.g. backbone.img_size=64
    finetune: bool = True  # include in the fine-tuning stage
    published: dict[str, Reference] = field(default_factory=dict)


@dataclass
class FrozenStage:
    """``medfm eval``: kNN + linear probe on frozen features, release vs random init."""

    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # of the training labels
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # label subsets per fraction
    overrides: list[str] = field(default_factory=list)  # medfm eval keys, e.g. features.pooling=layers


@dataclass
class FinetuneStage:
    """``medfm finetune`` of every release and of the random init with the same recipe."""

    enabled: bool = True
    # recipe names to fine-tune (ablations included when named); empty: every recipe that is not an ablation
    recipes: list[str] = field(default_factory=list)
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    config: str | None = None  # a finetune YAML (configs/downstream/...); None: the schema's defaults
    overrides: list[str] = field(default_factory=list)  # medfm finetune keys, e.g. train.max_steps=150


@dataclass
class Target:
    """What the benchmark is trying to show; checked and stated in results.md."""

    reference: str = ""  # a key of the tasks' ``published`` to beat with a frozen linear probe (ACC and AUC)
    tasks: list[str] = field(default_factory=list)  # task names the check applies to
    finetune_fraction: float = 0.1  # fine-tuning a release on this fraction should match random init on 100 %


@dataclass
class QualityConfig:
    # everything the benchmark writes; steps/ records the finished steps
    out_dir: str = field(default="runs/bench_quality", metadata=OUTPUT_PATH)
    budget_minutes: float = 60.0  # what the YAML is sized for; the report states the measured wall time against it
    workers: int = 2  # shard reader processes
    pool: PoolConfig = field(default_factory=PoolConfig)
    recipes: list[RecipeConfig] = field(default_factory=list)  # one pretraining run each, on the pool
    tasks: list[TaskConfig] = field(default_factory=list)  # labeled tasks every release is evaluated on
    frozen: FrozenStage = field(default_factory=FrozenStage)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    target: Target = field(default_factory=Target)

    @staticmethod
    def check_config(cfg: DictConfig, need: Need) -> None:
        need(len(cfg.pool.sources) > 0, "pool.sources", "needs at least one SOURCE")
        need(len(cfg.recipes) > 0, "recipes", "needs at least one recipe")
        need(len(cfg.tasks) > 0, "tasks", "needs at least one labeled task")
        for key, items in (("recipes", cfg.recipes), ("tasks", cfg.tasks)):
            names = [item.name for item in items]
            need(len(set(names)) == len(names), key, f"names must be distinct, got {names}")
            need(all(n and "/" not in n for n in names), key, "names must be non-empty folder names")
        for i, recipe in enumerate(cfg.recipes):
            need(Path(recipe.config).is_file(), f"recipes[{i}].config", f"{recipe.config} does not exist")
        need(set(cfg.frozen.protocols) <= {"knn", "linear"}, "frozen.protocols", "must be a subset of [knn, linear]")
        need(all(0 < f <= 1 for f in cfg.frozen.fractions), "frozen.fractions", "must be in (0, 1]")
        need(all(0 < f <= 1 for f in cfg.finetune.fractions), "finetune.fractions", "must be in (0, 1]")
        names = {task.name for task in cfg.tasks}
        need(set(cfg.target.tasks) <= names, "target.tasks", f"must name tasks of {sorted(names)}")
        recipes = {recipe.name for recipe in cfg.recipes}
        need(set(cfg.finetune.recipes) <= recipes, "finetune.recipes", f"must name recipes of {sorted(recipes)}")
        for i, recipe in enumerate(cfg.recipes):
            if recipe.reduce is not None:
                need(0 < recipe.reduce.keep < 1, f"recipes[{i}].reduce.keep", "must be in (0, 1)")
                need(
                    recipe.reduce.method in ("kcenter", "random"),
                    f"recipes[{i}].reduce.method",
                    "must be kcenter or random",
                )
                earlier = [r.name for r in cfg.recipes[:i]]
                need(
                    recipe.reduce.model in earlier or Path(recipe.reduce.model).exists(),
                    f"recipes[{i}].reduce.model",
                    f"must name an earlier recipe of {earlier} or an existing model",
                )
            if recipe.ablation_of is not None:
                others = sorted(recipes - {recipe.name})
                need(recipe.ablation_of in others, f"recipes[{i}].ablation_of", f"must name another recipe of {others}")


def load_quality_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    cfg = load_structured(QualityConfig, path, list(overrides))
    QualityConfig.check_config(cfg, config_need(cfg))
    return cfg


@dataclass(frozen=True)
class Step:
    stage: str  # shard, inspect, pretrain, eval, finetune
    label: str  # what the progress line says
    argv: tuple[str, ...]

    @property
    def key(self) -> str:
        return hashlib.blake2b("\0".join(self.argv).encode(), digest_size=8).hexdigest()


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


# --- results -------------------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _stat(value: Any) -> dict[str, float] | None:
    """``{"mean", "std"}`` from a label-efficiency cell or a plain number; None when undefined."""
    if isinstance(value, dict):
        mean = value.get("mean")
        return None if mean is None or math.isnan(mean) else {"mean": float(mean), "std": float(value.get("std", 0.0))}
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return {"mean": float(value), "std": 0.0}


def result_rows(result: dict[str, Any], **identity: str) -> list[dict[str, Any]]:
    """One row per label budget of a results.json (the 100 % run without efficiency rows)."""
    efficiency = result.get("label_efficiency") or []
    rows = []
    for entry in efficiency:
        if entry.get("fraction") is None:
            continue
        rows.append(
            {
                **identity,
                "fraction": entry["fraction"],
                "n_train": entry["n_train"],
                **{m: _stat(entry["test"].get(m)) for m in METRICS},
            }
        )
    if not any(row["fraction"] == 1.0 for row in rows):
        rows.append(
            {**identity, "fraction": 1.0, "n_train": None, **{m: _stat(result["summary"].get(m)) for m in METRICS}}
        )
    return sorted(rows, key=lambda row: row["fraction"])


def build_report(cfg: DictConfig, steps: Sequence[Step] = ()) -> dict[str, Any]:
    """Every result under OUT as rows, the published references, the target check and the time per stage."""
    out = Path(cfg.out_dir)
    rows: list[dict[str, Any]] = []
    for recipe in cfg.recipes:
        for task in cfg.tasks:
            for init in ("release", "random"):
                for protocol in cfg.frozen.protocols:
                    result = _read(out / "eval" / recipe.name / task.name / init / protocol / "results.json")
                    if result is not None:
                        rows += result_rows(result, task=task.name, recipe=recipe.name, init=init, protocol=protocol)
                result = _read(out / "finetune" / recipe.name / task.name / init / "results.json")
                if result is not None:
                    rows += result_rows(result, task=task.name, recipe=recipe.name, init=init, protocol="finetune")
    published = {task.name: {name: to_dict(ref) for name, ref in task.published.items()} for task in cfg.tasks}
    seconds: dict[str, float] = {}
    for step in steps:
        record = _read(out / "steps" / f"{step.key}.json")
        if record is not None:
            seconds[step.stage] = seconds.get(step.stage, 0.0) + record["seconds"]
    pretrain = {recipe.name: _pretrain_info(out / "pretrain" / recipe.name) for recipe in cfg.recipes}
    report = {
        "format": "medfm-bench-quality/1",
        "config": to_dict(cfg),
        "rows": rows,
        "published": published,
        "target": check_target(cfg, rows, published),
        "ablation": [],
        "seconds": seconds,
        "total_minutes": sum(seconds.values()) / 60,
        "budget_minutes": cfg.budget_minutes,
        "pretrain": pretrain,
        "pool": _pool_info(out / "pool"),
    }
    report["ablation"] = ablation_rows(report)
    return report


def _pretrain_info(run_dir: Path) -> dict[str, Any]:
    release = _read(run_dir / "release" / "config.json") or {}
    info = release.get("medfm", {}) if isinstance(release.get("medfm"), dict) else {}
    return {"architecture": release.get("architecture"), "steps": info.get("steps"), "objective": info.get("objective")}


def _pool_info(pool: Path) -> dict[str, Any]:
    totals = Manifest.read(pool).totals if Manifest.exists(pool) else {}
    return {key: totals.get(key) for key in ("samples", "by_source", "by_modality")}


def _find(rows: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [row for row in rows if all(row.get(k) == v for k, v in where.items())]


def _mean(row: dict[str, Any] | None, metric: str) -> float:
    cell = row.get(metric) if row else None
    return cell["mean"] if cell else math.nan


def check_target(
    cfg: DictConfig, rows: list[dict[str, Any]], published: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per target task: does the best release's linear probe (100 % labels) beat the reference on ACC and AUC,
    and does fine-tuning a release on ``finetune_fraction`` of the labels match random init on all of them?"""
    checks = []
    ablations = {recipe.name for recipe in cfg.recipes if recipe.ablation_of is not None}
    for task in cfg.target.tasks:
        reference = published.get(task, {}).get(cfg.target.reference)
        probes = [
            r
            for r in _find(rows, task=task, init="release", protocol="linear", fraction=1.0)
            if r["recipe"] not in ablations
        ]

        def beats(row: dict[str, Any], reference: dict[str, Any] | None = reference) -> bool:
            return reference is not None and all(
                reference.get(m) is not None and _mean(row, m) > reference[m] for m in METRICS
            )

        # the recipe that beats the reference on every metric if one does, else the best on ACC + AUC
        best = max(probes, key=lambda r: (beats(r), _mean(r, "auc") + _mean(r, "acc")), default=None)
        check: dict[str, Any] = {"task": task, "reference": cfg.target.reference, "reference_metrics": reference}
        if best is not None and reference is not None:
            check["linear_probe"] = {"recipe": best["recipe"], "acc": _mean(best, "acc"), "auc": _mean(best, "auc")}
            check["beats_reference"] = beats(best)
        fraction = cfg.target.finetune_fraction
        tuned = {r["recipe"]: r for r in _find(rows, task=task, init="release", protocol="finetune", fraction=fraction)}
        scratch = {r["recipe"]: r for r in _find(rows, task=task, init="random", protocol="finetune", fraction=1.0)}
        matches = []
        for recipe, row in tuned.items():
            if recipe in scratch:
                matches.append(
                    {
                        "recipe": recipe,
                        **{f"release_{fraction:g}_{m}": _mean(row, m) for m in METRICS},
                        **{f"random_1_{m}": _mean(scratch[recipe], m) for m in METRICS},
                        "matches": all(_mean(row, m) >= _mean(scratch[recipe], m) for m in METRICS),
                    }
                )
        if matches:
            check["finetune"] = matches
        checks.append(check)
    return checks


def _cell(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["std"] >= 0.0005 else f"{stat['mean']:.3f}"


def budget_table(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """Markdown lines: one row per distinct ``keys`` values, one column per label fraction, cells ``ACC / AUC``."""
    fractions = sorted({row["fraction"] for row in rows})
    lines = [
        "| " + " | ".join(keys) + " | " + " | ".join(f"{f * 100:g} % labels" for f in fractions) + " |",
        "|" + "---|" * (len(keys) + len(fractions)),
    ]
    for values in dict.fromkeys(tuple(row[k] for k in keys) for row in rows):
        by_fraction = {r["fraction"]: r for r in _find(rows, **dict(zip(keys, values, strict=True)))}
        cells = []
        for fraction in fractions:
            row = by_fraction.get(fraction)
            n = f" ({row['n_train']})" if row and row["n_train"] is not None else ""
            cells.append(f"{_cell(row['acc'])} / {_cell(row['auc'])}{n}" if row else "-")
        lines.append("| " + " | ".join(str(v) for v in values) + " | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = ["# medfm quality benchmark", ""]
    pool = report["pool"]
    lines += [
        f"Pool: {pool.get('samples')} unlabeled images (splits {', '.join(cfg['pool']['splits'])} only) from "
        f"{len(cfg['pool']['sources'])} sources. Wall time {report['total_minutes']:.1f} min "
        f"(budget {report['budget_minutes']:g} min): "
        + ", ".join(f"{stage} {s / 60:.1f}" for stage, s in report["seconds"].items())
        + ".",
        "",
    ]
    for name, info in report["pretrain"].items():
        recipe = next(r for r in cfg["recipes"] if r["name"] == name)
        lines.append(
            f"- `{name}`: {info.get('objective')} on `{info.get('architecture')}`, {info.get('steps')} steps "
            f"(`{recipe['config']}` {' '.join(recipe['overrides'])})"
        )
    lines.append("")
    for task in cfg["tasks"]:
        name = task["name"]
        rows = _find(report["rows"], task=name)
        fractions = sorted({row["fraction"] for row in rows})
        lines += [
            f"## {name} (`{task['spec']}`)",
            "",
            "Test ACC / AUC (mean ± std over seeds; the number of training labels in brackets).",
            "",
            *budget_table(rows, ("recipe", "init", "protocol")),
        ]
        for ref_name, ref in report["published"].get(name, {}).items():
            acc = "-" if ref.get("acc") is None else f"{ref['acc']:.3f}"
            auc = "-" if ref.get("auc") is None else f"{ref['auc']:.3f}"
            cells = ["" for _ in fractions[:-1]] + [f"{acc} / {auc}"]
            lines.append(f"| published: {ref_name} | | {ref.get('protocol', '')} | " + " | ".join(cells) + " |")
        lines += ["", f"![{name}](plots/{name}_bars.png) ![{name} label efficiency](plots/{name}_efficiency.png)", ""]
    lines += ablation_section(report)
    if report["target"]:
        lines += ["## Target", ""]
        for check in report["target"]:
            probe = check.get("linear_probe")
            ref = check.get("reference_metrics") or {}
            if probe:
                verdict = "beats" if check.get("beats_reference") else "does not beat"
                lines.append(
                    f"- {check['task']}: best linear probe ({probe['recipe']}) ACC {probe['acc']:.3f} / AUC "
                    f"{probe['auc']:.3f} {verdict} {check['reference']} ({ref.get('acc')} / {ref.get('auc')})."
                )
            for match in check.get("finetune", []):
                verdict = "matches" if match["matches"] else "does not match"
                values = [v for k, v in match.items() if k.startswith(("release_", "random_"))]
                lines.append(
                    f"- {check['task']}: fine-tuning {match['recipe']} on "
                    f"{cfg['target']['finetune_fraction'] * 100:g} % of the labels (ACC {values[0]:.3f} / AUC "
                    f"{values[1]:.3f}) {verdict} random init on 100 % ({values[2]:.3f} / {values[3]:.3f})."
                )
        lines.append("")
    return "\n".join(lines)


def ablation_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per ablation recipe, task, protocol and label fraction: the recipe's release vs the ablation's release
    (mean over the same label subsets and seeds), with the differences."""
    compared = []
    for ablation in (r for r in report["config"]["recipes"] if r.get("ablation_of")):
        for row in _find(report["rows"], recipe=ablation["name"], init="release"):
            where = {k: row[k] for k in ("task", "protocol", "fraction")}
            recipe = next(iter(_find(report["rows"], recipe=ablation["ablation_of"], init="release", **where)), None)
            if recipe is None:
                continue
            deltas = {f"delta_{m}": _mean(recipe, m) - _mean(row, m) for m in METRICS}
            compared.append(
                {
                    **where,
                    "recipe": ablation["ablation_of"],
                    "ablation": ablation["name"],
                    "n_train": row["n_train"],
                    **{m: _mean(recipe, m) for m in METRICS},
                    **{f"ablation_{m}": _mean(row, m) for m in METRICS},
                    **deltas,
                }
            )
    return compared


def ablation_section(report: dict[str, Any]) -> list[str]:
    """Markdown: each ablation beside its recipe (releases only; positive differences favour the recipe)."""
    compared = report.get("ablation") or []
    if not compared:
        return []
    lines = ["## Ablation", ""]
    for ablation in (r for r in report["config"]["recipes"] if r.get("ablation_of")):
        lines += [
            f"`{ablation['ablation_of']}` against `{ablation['name']}` ({' '.join(ablation['overrides'])}): "
            "test ACC / AUC of the releases on the same label subsets and seeds; difference = recipe - "
            "ablation.",
            "",
            "| task | protocol | labels | recipe | ablation | difference |",
            "|---|---|---|---|---|---|",
        ]
        for row in (r for r in compared if r["ablation"] == ablation["name"]):
            labels = f"{row['fraction'] * 100:g} %" + (f" ({row['n_train']})" if row["n_train"] is not None else "")
            lines.append(
                f"| {row['task']} | {row['protocol']} | {labels} | {row['acc']:.3f} / {row['auc']:.3f} | "
                f"{row['ablation_acc']:.3f} / {row['ablation_auc']:.3f} | "
                f"{row['delta_acc']:+.3f} / {row['delta_auc']:+.3f} |"
            )
        wins = [r for r in compared if r["ablation"] == ablation["name"]]
        better = sum(r["delta_auc"] > 0 for r in wins)
        mean_delta = sum(r["delta_auc"] for r in wins) / len(wins) if wins else math.nan
        lines += [
            "",
            f"The recipe has the higher AUC in {better} of {len(wins)} comparisons (mean AUC difference "
            f"{mean_delta:+.3f}).",
            "",
        ]
    return lines


def write_report(cfg: DictConfig, report: dict[str, Any]) -> Path:
    from medfm.downstream.report import write_json

    out = Path(cfg.out_dir)
    write_json(report, out / "results.json")
    plot_report(report, out / "plots")
    path = out / "results.md"
    path.write_text(markdown(report))
    return path


def plot_report(report: dict[str, Any], folder: Path) -> None:
    """Per task: a bar chart (ACC and AUC at 100 % labels per recipe / init / protocol, published lines) and
    label-efficiency curves (AUC vs fraction of labels, mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for task in report["config"]["tasks"]:
        name = task["name"]
        rows = _find(report["rows"], task=name)
        if not rows:
            continue
        full = [r for r in rows if r["fraction"] == 1.0]
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [f"{r['recipe']}\n{r['protocol']} ({r['init']})" for r in full]
        for axis, metric in zip(axes, METRICS, strict=True):
            means = [_mean(r, metric) for r in full]
            stds = [(r[metric] or {}).get("std", 0.0) for r in full]
            colors = ["tab:blue" if r["init"] == "release" else "tab:gray" for r in full]
            axis.bar(range(len(full)), means, yerr=stds, color=colors, capsize=3)
            axis.set_xticks(range(len(full)), labels, rotation=60, ha="right", fontsize=7)
            for (ref_name, ref), style in zip(
                report["published"].get(name, {}).items(), itertools.cycle(("--", ":", "-."))
            ):
                if ref.get(metric) is not None:
                    axis.axhline(ref[metric], linestyle=style, color="tab:red", label=ref_name)
            finite = [m for m in means if not math.isnan(m)]
            axis.set_ylim(max(0.0, min(finite, default=0.5) - 0.1), 1.0)
            axis.set_title(f"{name}: test {metric.upper()} (100 % labels)")
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=6, loc="lower right")
        figure.tight_layout()
        figure.savefig(folder / f"{name}_bars.png", dpi=110)
        plt.close(figure)

        figure, axis = plt.subplots(figsize=(6.5, 4.5))
        for key in sorted({(r["recipe"], r["init"], r["protocol"]) for r in rows}):
            curve = _find(rows, recipe=key[0], init=key[1], protocol=key[2])
            points = [(r["fraction"], _mean(r, "auc"), (r["auc"] or {}).get("std", 0.0)) for r in curve]
            xs, ys, errs = zip(*points, strict=True)
            axis.errorbar(
                xs,
                ys,
                yerr=errs,
                marker="o",
                capsize=3,
                label=f"{key[0]} {key[2]} ({key[1]})",
                linestyle="-" if key[1] == "release" else "--",
            )
        axis.set_xscale("log")
        axis.set_xlabel("fraction of training labels")
        axis.set_ylabel("test AUC")
        axis.set_title(f"{name}: label efficiency")
        axis.legend(fontsize=6)
        figure.tight_layout()
        figure.savefig(folder / f"{name}_efficiency.png", dpi=110)
        plt.close(figure)
