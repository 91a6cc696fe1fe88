"""Classification metrics with MedMNIST's conventions (Yang et al. 2023), in numpy.

- binary: scores (N, 2); AUC on the positive-class score, ACC at the argmax (= threshold 0.5 on softmax).
- multiclass: scores (N, C); macro one-vs-rest AUC, argmax ACC.
- multilabel: scores (N, K) in [0, 1]; per-label AUC and their mean, per-label ACC / F1 at 0.5.

Also balanced ACC (mean recall), F1 (binary: positive class; multiclass: macro), per-class tables and the
confusion matrix. A class absent from ``y_true`` gives an AUC of NaN (left out of means), not an exception.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

from downstream.data import Task
from pretrain.release import SUMMARY_KEYS  # the headline metrics, defined once with the results-file format


def binary_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic with average ranks for ties; NaN without both classes."""
    y_true = np.asarray(y_true).astype(bool)
    positives, negatives = int(y_true.sum()), int((~y_true).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y_true].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows true class, columns predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def _f1(tp: float, fp: float, fn: float) -> float:
    return _safe_div(2 * tp, 2 * tp + fp + fn)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def classification_metrics(task: Task, y_true: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Metrics of one split: ``acc``, ``balanced_acc``, ``auc``, ``f1``, ``per_class`` rows, ``confusion``.

    y_true: (N,) ints (binary / multiclass) or (N, K) 0/1 (multilabel); scores: (N, C) or (N, K).
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != task.num_outputs or len(scores) != len(y_true):
        raise ValueError(f"scores {scores.shape} do not fit {len(y_true)} samples of a {task.num_outputs}-output task")
    if task.multilabel:
        return _multilabel_metrics(task, y_true.astype(np.int64), scores)
    y_true = y_true.astype(np.int64).reshape(-1)
    num_classes = task.num_outputs
    y_pred = scores.argmax(axis=1)
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    rows = []
    for c, name in enumerate(task.class_names):
        tp = confusion[c, c]
        fp = confusion[:, c].sum() - tp
        fn = confusion[c, :].sum() - tp
        rows.append(
            {
                "class": name,
                "support": int(confusion[c, :].sum()),
                "precision": _safe_div(tp, tp + fp),
                "recall": _safe_div(tp, tp + fn),
                "f1": _f1(tp, fp, fn),
                "auc": binary_auc(y_true == c, scores[:, c]),
            }
        )
    present = [r["recall"] for r in rows if r["support"] > 0]
    if task.kind == "binary":
        auc, f1 = rows[1]["auc"], rows[1]["f1"]
    else:
        auc, f1 = _nanmean([r["auc"] for r in rows]), float(np.mean([r["f1"] for r in rows]))
    return {
        "n": len(y_true),
        "acc": float((y_pred == y_true).mean()),
        "balanced_acc": float(np.mean(present)),
        "auc": auc,
        "f1": f1,
        "per_class": rows,
        "confusion": confusion.tolist(),
    }


def _multilabel_metrics(task: Task, y_true: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    y_pred = scores >= 0.5
    rows = []
    for k, name in enumerate(task.class_names):
        truth, pred = y_true[:, k].astype(bool), y_pred[:, k]
        tp, fp, fn, tn = (truth & pred).sum(), (~truth & pred).sum(), (truth & ~pred).sum(), (~truth & ~pred).sum()
        recall, specificity = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
        rows.append(
            {
                "class": name,
                "support": int(truth.sum()),
                "acc": float((truth == pred).mean()),
                "balanced_acc": (recall + specificity) / 2,
                "precision": _safe_div(tp, tp + fp),
                "recall": recall,
                "f1": _f1(tp, fp, fn),
                "auc": binary_auc(truth, scores[:, k]),
            }
        )
    return {
        "n": len(y_true),
        "acc": float(np.mean([r["acc"] for r in rows])),
        "exact_match": float((y_pred == y_true.astype(bool)).all(axis=1).mean()),
        "balanced_acc": float(np.mean([r["balanced_acc"] for r in rows])),
        "auc": _nanmean([r["auc"] for r in rows]),
        "f1": float(np.mean([r["f1"] for r in rows])),
        "per_class": rows,
    }


def summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers (what tables and the model card show)."""
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
