"""Metrics follow MedMNIST's conventions and agree with scikit-learn on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from downstream.data import Task
from downstream.metrics import binary_auc, classification_metrics


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_binary_auc_with_ties_matches_sklearn():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.9, 0.4, 0.4])  # ties across classes
    assert binary_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert binary_auc(np.ones(4), np.arange(4)) != binary_auc(np.ones(4), np.arange(4))  # NaN: one class only


def test_binary_task():
    RNG = np.random.default_rng(0)
    y = RNG.integers(0, 2, 200)
    scores = softmax(RNG.normal(size=(200, 2)) + np.eye(2)[y])
    m = classification_metrics(Task("binary", ("normal", "pneumonia")), y, scores)
    pred = scores.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, scores[:, 1]))
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, scores[:, 1] >= 0.5))  # argmax = threshold 0.5
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))  # the positive class
    assert m["confusion"] == skm.confusion_matrix(y, pred).tolist()
    assert [r["class"] for r in m["per_class"]] == ["normal", "pneumonia"]


def test_multiclass_task():
    RNG = np.random.default_rng(1)
    y = RNG.integers(0, 4, 300)
    scores = softmax(RNG.normal(size=(300, 4)) + 1.5 * np.eye(4)[y])
    m = classification_metrics(Task("multiclass", ("a", "b", "c", "d")), y, scores)
    pred = scores.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, scores, multi_class="ovr", average="macro"))
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred)
    for c, row in enumerate(m["per_class"]):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[c], recall[c], f1[c], support[c])
        )
        assert row["auc"] == pytest.approx(skm.roc_auc_score(y == c, scores[:, c]))


def test_multilabel_task():
    RNG = np.random.default_rng(2)
    y = RNG.integers(0, 2, (250, 3))
    scores = 1 / (1 + np.exp(-(RNG.normal(size=(250, 3)) + 2 * y - 1)))
    m = classification_metrics(Task("multilabel", ("effusion", "nodule", "mass")), y, scores)
    pred = scores >= 0.5
    per_label_auc = skm.roc_auc_score(y, scores, average=None)
    assert [r["auc"] for r in m["per_class"]] == pytest.approx(list(per_label_auc))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, scores, average="macro"))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["exact_match"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["acc"] == pytest.approx(np.mean([(y[:, k] == pred[:, k]).mean() for k in range(3)]))


def test_an_absent_class_gives_nan_auc_not_an_error():
    y = np.array([0, 0, 1, 1])  # class 2 never occurs
    scores = softmax(np.array([[2.0, 0, 0], [0, 0, 2], [0, 2, 0], [2, 0, 0]]))
    m = classification_metrics(Task("multiclass", ("a", "b", "c")), y, scores)
    assert math.isnan(m["per_class"][2]["auc"])
    assert m["auc"] == pytest.approx(np.mean([m["per_class"][0]["auc"], m["per_class"][1]["auc"]]))
    with pytest.warns(UserWarning, match="not in y_true"):  # sklearn: mean recall over the classes present
        expected = skm.balanced_accuracy_score(y, scores.argmax(1))
    assert m["balanced_acc"] == pytest.approx(expected)


def test_scores_of_the_wrong_width_are_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        classification_metrics(Task("binary", ("0", "1")), np.array([0, 1]), np.zeros((2, 3)))
