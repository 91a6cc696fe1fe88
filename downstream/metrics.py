"""Classification metrics with MedMNIST's conventions (Yang et al. 2023), computed by scikit-learn.

- binary: scores (N, 2); AUC on the positive-class score, ACC at the argmax (= threshold 0.5 on softmax).
- multiclass: scores (N, C); macro one-vs-rest AUC, argmax ACC.
- multilabel: scores (N, K) in [0, 1]; per-label AUC and their mean, per-label ACC / F1 at 0.5.

Also balanced ACC (mean recall over the classes present, as sklearn's ``balanced_accuracy_score``), F1 (binary:
positive class; multiclass / multilabel: macro), per-class tables and the confusion matrix.

A metric that is undefined on the given labels (AUC of a class absent from ``y_true`` or of the only class present,
precision of a class never predicted, recall of an absent class) is NaN, never an exception or a silent 0, and
``undefined`` says why: ``{"auc": "class 'c' absent from the labels"}`` at the top level and in each per-class
row. Means (macro AUC / F1) leave NaNs out (sklearn's ``zero_division=np.nan``) and are NaN only when every class
is undefined.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from medfm.downstream.data import Task
from medfm.pretrain.release import SUMMARY_KEYS  # the headline metrics, defined once with the results-file format


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    """sklearn's ROC AUC of a 0/1 ``truth`` (N,) against ``score`` (N,); NaN without both outcomes.

    Checked beforehand: sklearn returns NaN there too, with an UndefinedMetricWarning.
    """
    truth = np.asarray(truth).astype(bool)
    if truth.all() or not truth.any():
        return math.nan
    return float(roc_auc_score(truth, score))


def classification_metrics(task: Task, y_true: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Metrics of one split: ``acc``, ``balanced_acc``, ``auc``, ``f1``, ``per_class`` rows, ``confusion``
    (single-label) or ``exact_match`` (multilabel), ``undefined`` (metric -> reason, for each NaN headline metric).

    y_true: (N,) ints (binary / multiclass) or (N, K) 0/1 (multilabel); scores: (N, C) or (N, K); N = 0 gives NaNs.
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != task.num_outputs or len(scores) != len(y_true):
        raise ValueError(f"scores {scores.shape} do not fit {len(y_true)} samples of a {task.num_outputs}-output task")
    if not len(y_true):  # e.g. a val split that stratification left empty: every metric undefined, not a crash
        reason = "no samples in this split"
        return {
            "n": 0,
            **dict.fromkeys(SUMMARY_KEYS, math.nan),
            "per_class": [],
            "undefined": dict.fromkeys(SUMMARY_KEYS, reason),
        }
    if task.multilabel:
        return _multilabel_metrics(task, y_true.astype(np.int64), scores)
    y_true = y_true.astype(np.int64).reshape(-1)
    labels = list(range(task.num_outputs))
    y_pred = scores.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=np.nan
    )
    rows = []
    for c, name in enumerate(task.class_names):
        row = {
            "class": name,
            "support": int(support[c]),
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "auc": _auc(y_true == c, scores[:, c]),
        }
        absent = f"class {name!r} absent from the labels"
        reasons = {
            "precision": f"no sample predicted as class {name!r}",
            "recall": absent,
            "f1": f"{absent} and never predicted",
            "auc": absent if not support[c] else f"only class {name!r} in the labels",
        }
        rows.append(_with_reasons(row, reasons))
    if task.kind == "binary":
        positive = rows[1]
        auc, f1_value = positive["auc"], positive["f1"]
        undefined = {k: positive["undefined"][k] for k in ("auc", "f1") if k in positive["undefined"]}
    else:
        auc = _mean_of_defined([r["auc"] for r in rows])
        f1_value = float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=np.nan))
        undefined = _undefined_means(rows, {"auc": auc, "f1": f1_value}, "class")
    return {
        "n": len(y_true),
        "acc": float(accuracy_score(y_true, y_pred)),
        # = balanced_accuracy_score(y_true, y_pred), without its warning when a predicted class is absent
        "balanced_acc": _mean_of_defined(recall),
        "auc": auc,
        "f1": f1_value,
        "per_class": rows,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "undefined": undefined,
    }


def _multilabel_metrics(task: Task, y_true: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    y_pred = (scores >= 0.5).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=np.nan)
    # specificity = recall of the complement; balanced ACC of a label = the mean of the two that are defined
    specificity = precision_recall_fscore_support(1 - y_true, 1 - y_pred, average=None, zero_division=np.nan)[1]
    rows = []
    for k, name in enumerate(task.class_names):
        row = {
            "class": name,
            "support": int(support[k]),
            "acc": float(accuracy_score(y_true[:, k], y_pred[:, k])),
            "balanced_acc": _mean_of_defined([recall[k], specificity[k]]),
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "auc": _auc(y_true[:, k], scores[:, k]),
        }
        no_positive = f"no sample has label {name!r}"
        reasons = {
            "precision": f"no sample predicted to have label {name!r}",
            "recall": no_positive,
            "f1": f"{no_positive} or is predicted to have it",
            "auc": no_positive if not support[k] else f"every sample has label {name!r}",
        }
        rows.append(_with_reasons(row, reasons))
    auc = _mean_of_defined([r["auc"] for r in rows])
    f1_value = float(f1_score(y_true, y_pred, average="macro", zero_division=np.nan))
    return {
        "n": len(y_true),
        "acc": float(np.mean([r["acc"] for r in rows])),
        "exact_match": float(accuracy_score(y_true, y_pred)),
        "balanced_acc": float(np.mean([r["balanced_acc"] for r in rows])),
        "auc": auc,
        "f1": f1_value,
        "per_class": rows,
        "undefined": _undefined_means(rows, {"auc": auc, "f1": f1_value}, "label"),
    }


def _with_reasons(row: dict[str, Any], reasons: dict[str, str]) -> dict[str, Any]:
    """``row`` plus ``undefined``: the reason for each of its NaN metrics."""
    return {**row, "undefined": {k: reasons[k] for k, v in row.items() if isinstance(v, float) and math.isnan(v)}}


def _undefined_means(rows: list[dict[str, Any]], means: dict[str, float], noun: str) -> dict[str, str]:
    """Reasons for the NaN means over classes (or labels): every row's own reason."""
    return {
        key: f"undefined for every {noun}: {'; '.join(r['undefined'][key] for r in rows)}"
        for key, value in means.items()
        if math.isnan(value)
    }


def _mean_of_defined(values: Any) -> float:
    """Mean of the non-NaN values; NaN when there are none (without numpy's empty-slice warning)."""
    finite = [float(v) for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers (what tables and the model card show): floats, NaN where undefined."""
    return {k: float(metrics[k]) for k in SUMMARY_KEYS if k in metrics}
