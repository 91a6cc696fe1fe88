"""The benchmark's results: every release's evaluation and fine-tuning results gathered into rows, the target
check, the ablation comparison, the Markdown / JSON report and its plots."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from medfm.benchmark.config import Step
from medfm.data_shards.manifest import Manifest
from medfm.pretrain.config import to_dict

METRICS = ("acc", "auc")


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
