"""Results as ``results.json`` + ``results.md`` + ``results_summary.json`` and PNGs (ROC curves, confusion
matrix, 2D PCA embedding).

``results.json`` holds everything: ``{"protocol", "dataset", "backbone", "task", "settings", "val", "test",
"summary", ["label_efficiency"], ["robustness"], ["per_site"]}``; NaN (an undefined metric) is written as null, and the split's
``undefined`` (and each per-class row's) says why; ``results.md`` lists those reasons.
``results_summary.json`` is the small file other tools read (``medfm export`` puts it into the model card): its
format is defined in ``medfm.pretrain.release`` (protocol, dataset, init, backbone, test ``summary``).
The robustness index (protocol ``robustness_index``) has its own ``results.json`` / ``results.md`` and
``sites.png``: it is not a classifier's result.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score, roc_curve

from medfm.downstream.data import Task
from medfm.downstream.metrics import SUMMARY_KEYS
from medfm.pretrain.release import write_results_summary

MAX_EMBEDDING_POINTS = 5000


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf -> None, numpy scalars -> python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _pm(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}" if stats and stats.get("mean") is not None else "-"


def markdown(result: dict[str, Any]) -> str:
    """A readable summary: headline metrics, per-class table, label efficiency and robustness tables."""
    lines = [
        f"# {result['protocol']} on `{result['dataset']}`",
        "",
        f"Backbone `{result['backbone'].get('source')}` ({result['backbone'].get('architecture')}, init "
        f"{result['backbone'].get('init')}); task {result['task']['kind']} with classes "
        f"{', '.join(result['task']['class_names'])}.",
        "",
        "| split | n | " + " | ".join(SUMMARY_KEYS) + " |",
        "|---|---|" + "---|" * len(SUMMARY_KEYS),
    ]
    for split in ("val", "test"):
        metrics = result.get(split)
        if metrics:
            lines.append(
                f"| {split} | {metrics['n']} | " + " | ".join(_fmt(metrics.get(k)) for k in SUMMARY_KEYS) + " |"
            )
    test = result.get("test", {})
    if test.get("per_class"):
        columns = [c for c in ("support", "precision", "recall", "f1", "auc", "acc") if c in test["per_class"][0]]
        lines += _table_head("Per class (test):", ["class", *columns])
        lines += [
            f"| {row['class']} | " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in test["per_class"]
        ]
    undefined = _undefined_lines(result)
    if undefined:
        lines += ["", "Undefined metrics (NaN, shown as -):", "", *undefined]
    efficiency = result.get("label_efficiency")
    if efficiency:
        lines += _table_head(
            "Label efficiency (test, mean ± std over seeds):", ["labels", "n train", "seeds", *SUMMARY_KEYS]
        )
        for row in efficiency:
            stats = row["test"]
            lines.append(
                f"| {row['budget']} | {row['n_train']} | {len(row['seeds'])} | "
                + " | ".join(_pm(stats.get(k, {})) for k in SUMMARY_KEYS)
                + " |"
            )
    robustness = result.get("robustness")
    if robustness:
        columns = ["corruption", "severity", "auc", "acc", "auc drop", "acc drop"]
        lines += _table_head("Robustness (test; drop = clean - corrupted):", columns)
        for row in robustness:
            cells = [
                row["corruption"],
                row["severity"],
                *(_fmt(row[part][k]) for part in ("test", "drop") for k in ("auc", "acc")),
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    per_site = result.get("per_site")
    if per_site:
        lines += _table_head("Per site (test):", ["site", "n", *SUMMARY_KEYS])
        lines += [
            f"| {row['site']} | {row['n']} | " + " | ".join(_fmt(row.get(k)) for k in SUMMARY_KEYS) + " |"
            for row in per_site
        ]
    settings = result.get("settings")
    if settings:
        lines += ["", "Settings: `" + json.dumps(_clean(settings)) + "`"]
    return "\n".join(lines) + "\n"


def robustness_index_markdown(result: dict[str, Any]) -> str:
    """The robustness index of one backbone: one row per k, the sites and what the numbers mean."""
    backbone = result["backbone"]
    sites = ", ".join(f"{name} ({n})" for name, n in result["sites"].items())
    lines = [
        f"# Robustness index on `{result['dataset']}`",
        "",
        f"Backbone `{backbone.get('source')}` ({backbone.get('architecture')}, init {backbone.get('init')}); "
        f"{result['n']} labeled images of {len(result['sites'])} sites: {sites}.",
        "",
        "RI = neighbours of the same class from another site / neighbours of another class from the same site "
        "(cosine kNN, each image against all others). Above 1: biology dominates the site signature. The site kNN "
        f"accuracy is the control: how well a neighbour vote tells the site (the largest site's share: "
        f"{result['site_majority_share']:.4f}).",
        "",
        "| k | RI | same class, other site | other class, same site | site kNN acc | class kNN acc |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['k']} | {_fmt(row['robustness_index'])} | {row['same_class_other_site']} | {row['other_class_same_site']} | {_fmt(row['site_knn_acc'])} | {_fmt(row['class_knn_acc'])} |"
        )
    return "\n".join(lines) + "\n"


def robustness_index_table(results: dict[str, dict[str, Any]]) -> str:
    """summary.md's table of the robustness index: a row per (init, k)."""
    lines = ["| init | k | RI | site kNN acc | class kNN acc |", "|---|---|---|---|---|"]
    for init, result in results.items():
        for row in result["rows"]:
            lines.append(
                f"| {init} | {row['k']} | {_metric_cell(row['robustness_index'])} | {_metric_cell(row['site_knn_acc'])} | {_metric_cell(row['class_knn_acc'])} |"
            )
    return "\n".join(lines) + "\n"


def write_robustness_index(
    out_dir: Path, result: dict[str, Any], features: np.ndarray, sites: list[str], *, plots: bool
) -> None:
    """``results.json``, ``results.md`` and (with ``plots``) ``sites.png`` of protocol robustness_index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, out_dir / "results.json")
    (out_dir / "results.md").write_text(robustness_index_markdown(_clean(result)))
    if plots:
        plot_sites(result, features, sites, out_dir / "sites.png")


def plot_sites(result: dict[str, Any], features: np.ndarray, sites: list[str], path: Path) -> None:
    """Left: the robustness index over k (1 marked); right: the 2D PCA of the embeddings coloured by site."""
    rng = np.random.default_rng(0)
    names = np.asarray(sites)
    if len(features) > MAX_EMBEDDING_POINTS:
        keep = np.sort(rng.choice(len(features), MAX_EMBEDDING_POINTS, replace=False))
        features, names = features[keep], names[keep]
    points = pca_2d(features.astype(np.float64))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = [row for row in result["rows"] if row["robustness_index"] is not None]
    left.plot([r["k"] for r in rows], [r["robustness_index"] for r in rows], marker="o")
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="k (neighbours)", ylabel="robustness index", title="RI > 1: biology dominates the site")
    for site in sorted(set(names.tolist())):
        mask = names == site
        right.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.6, label=site)
    right.set(xlabel="PC 1", ylabel="PC 2", title=f"embedding by site ({result['backbone'].get('init')})")
    right.legend(markerscale=3, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _undefined_lines(result: dict[str, Any]) -> list[str]:
    """One bullet per undefined metric of val / test and of their per-class rows, with its reason."""
    lines = []
    for split in ("val", "test"):
        metrics = result.get(split) or {}
        lines += [f"- {split} {key}: {reason}" for key, reason in metrics.get("undefined", {}).items()]
        for row in metrics.get("per_class", []):
            lines += [f"- {split} {row['class']} {key}: {reason}" for key, reason in row.get("undefined", {}).items()]
    return lines


def write_results(out_dir: str | Path, result: dict[str, Any]) -> Path:
    """``results.json``, ``results.md`` and ``results_summary.json`` in ``out_dir``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, out_dir / "results.json")
    (out_dir / "results.md").write_text(markdown(_clean(result)))
    backbone = result.get("backbone", {})
    write_results_summary(
        out_dir,
        protocol=result["protocol"],
        dataset=result["dataset"],
        init=backbone.get("init"),
        summary=result["summary"],
        backbone=backbone.get("source"),
    )
    return out_dir / "results.json"


def plot_roc(task: Task, y_true: np.ndarray, scores: np.ndarray, path: Path, title: str = "") -> None:
    """One ROC curve per class (one-vs-rest) or per label; binary: the positive class only."""
    fig, ax = plt.subplots(figsize=(5, 5))
    classes = [1] if task.kind == "binary" else range(task.num_outputs)
    for c in classes:
        truth = y_true[:, c] if task.multilabel else (y_true == c)
        if truth.min() == truth.max():
            continue  # undefined without both outcomes
        fpr, tpr, _ = roc_curve(truth.astype(int), scores[:, c])
        ax.plot(fpr, tpr, label=f"{task.class_names[c]} (AUC {roc_auc_score(truth.astype(int), scores[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(task: Task, confusion: list[list[int]], path: Path, title: str = "") -> None:
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(matrix) + 2.5, 1.2 * len(matrix) + 2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    ticks = range(len(matrix))
    ax.set_xticks(ticks, task.class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, task.class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pca_2d(features: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2): projection on the two leading principal components (sklearn's PCA, exact SVD, signs fixed
    by sklearn's ``svd_flip``: deterministic). A component the data cannot define (N samples span at most N - 1
    directions, D features at most D; constant features none) stays 0."""
    features = np.asarray(features, dtype=np.float64)
    points = np.zeros((len(features), 2))
    components = min(2, len(features) - 1, features.shape[1])
    # constant features: sklearn would divide by a zero total variance (a RuntimeWarning) for all-zero points
    if components > 0 and np.ptp(features, axis=0).any():
        points[:, :components] = PCA(n_components=components, svd_solver="covariance_eigh").fit_transform(features)
    return points


def plot_embedding(task: Task, features: np.ndarray, labels: np.ndarray, path: Path, title: str = "") -> None:
    """2D PCA of frozen features coloured by label (multi-label: by the first positive label)."""
    rng = np.random.default_rng(0)
    if len(features) > MAX_EMBEDDING_POINTS:
        keep = np.sort(rng.choice(len(features), MAX_EMBEDDING_POINTS, replace=False))
        features, labels = features[keep], labels[keep]
    points = pca_2d(features.astype(np.float64))
    if task.multilabel:
        colour = np.where(labels.any(axis=1), labels.argmax(axis=1), -1)
        names = {-1: "none", **dict(enumerate(task.class_names))}
    else:
        colour, names = labels.astype(int), dict(enumerate(task.class_names))
    fig, ax = plt.subplots(figsize=(6, 5))
    for value in np.unique(colour):
        mask = colour == value
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.6, label=names.get(int(value), str(value)))
    ax.set(xlabel="PC 1", ylabel="PC 2", title=title or "frozen features (PCA)")
    ax.legend(markerscale=3, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(
    out_dir: Path,
    task: Task,
    y_true: np.ndarray,
    scores: np.ndarray,
    confusion: list[list[int]] | None,
    embedding: tuple[np.ndarray, np.ndarray] | None = None,
    title: str = "",
) -> list[Path]:
    """roc.png, confusion.png (single-label), embedding.png (when features are given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "roc.png"]
    plot_roc(task, y_true, scores, written[0], title)
    if confusion is not None:
        written.append(out_dir / "confusion.png")
        plot_confusion(task, confusion, written[-1], title)
    if embedding is not None:
        written.append(out_dir / "embedding.png")
        plot_embedding(task, *embedding, written[-1], title)
    return written


def summary_table(rows: list[tuple[dict[str, str], dict[str, float | None]]]) -> str:
    """The one results table (``medfm eval`` / ``medfm finetune`` summary.md and terminal): a Markdown row per
    ``(leading columns, test summary)``, the summary's metrics in ``SUMMARY_KEYS`` order, ``-`` where undefined."""
    if not rows:
        return ""
    columns = list(rows[0][0])
    lines = [
        "| " + " | ".join([*columns, *SUMMARY_KEYS]) + " |",
        "|" + "---|" * (len(columns) + len(SUMMARY_KEYS)),
    ]
    for leading, metrics in rows:
        cells = [_metric_cell(metrics.get(k)) for k in SUMMARY_KEYS]
        lines.append("| " + " | ".join([*(leading[c] for c in columns), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _metric_cell(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def _table_head(title: str, columns: list[str]) -> list[str]:
    """A titled Markdown table's first lines: a blank line, the title, a blank line, the header and its rule."""
    return ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
