"""Metrics follow MedMNIST's conventions and agree with scikit-learn on known inputs; undefined ones are NaN with
a reason, without warnings."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from medfm.downstream.data import Task
from medfm.downstream.metrics import classification_metrics, summary


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.filterwarnings("error")
def test_small_binary_example_matches_sklearn_with_ties():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.9, 0.4, 0.4])  # ties across classes
    scores = np.stack([1 - s, s], axis=1)
    m = classification_metrics(Task("binary", ("normal", "pneumonia")), y, scores)
    pred = scores.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert m["confusion"] == skm.confusion_matrix(y, pred).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred)
    assert [r["precision"] for r in m["per_class"]] == pytest.approx(list(precision))
    assert [r["recall"] for r in m["per_class"]] == pytest.approx(list(recall))
    assert [r["f1"] for r in m["per_class"]] == pytest.approx(list(f1))
    assert [r["support"] for r in m["per_class"]] == list(support)
    assert m["undefined"] == {} and all(r["undefined"] == {} for r in m["per_class"])


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
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(Task("multiclass", ("a", "b", "c")), y, scores)
    assert math.isnan(m["per_class"][2]["auc"])
    assert m["auc"] == pytest.approx(np.mean([m["per_class"][0]["auc"], m["per_class"][1]["auc"]]))
    with pytest.warns(UserWarning, match="not in y_true"):  # sklearn: mean recall over the classes present
        expected = skm.balanced_accuracy_score(y, scores.argmax(1))
    assert m["balanced_acc"] == pytest.approx(expected)


@pytest.mark.filterwarnings("error")
def test_an_absent_class_is_nan_with_a_reason_naming_it():
    y = np.array([0, 0, 1, 1, 0])  # class "c" never occurs and is never predicted; "b" is never predicted
    scores = softmax(np.array([[2.0, 0, 0], [2, 0, 0], [2, 0, 0], [0, 0, 2], [0, 0, 2]]))
    m = classification_metrics(Task("multiclass", ("a", "b", "c")), y, scores)
    b, c = m["per_class"][1], m["per_class"][2]
    assert math.isnan(c["auc"]) and "'c'" in c["undefined"]["auc"] and "absent" in c["undefined"]["auc"]
    assert math.isnan(c["recall"]) and "'c'" in c["undefined"]["recall"]
    assert c["precision"] == 0.0 and c["f1"] == 0.0  # predicted twice, wrongly: defined, 0
    assert math.isnan(b["precision"]) and b["undefined"] == {"precision": "no sample predicted as class 'b'"}
    assert m["undefined"] == {}  # the means are over the classes where they are defined
    pred = scores.argmax(1)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=np.nan))


@pytest.mark.filterwarnings("error")
def test_a_binary_split_without_positives_has_undefined_headline_metrics():
    y = np.array([0, 0, 0])
    m = classification_metrics(Task("binary", ("normal", "pneumonia")), y, softmax(np.tile([1.0, 0.0], (3, 1))))
    assert math.isnan(m["auc"]) and math.isnan(m["f1"])
    assert m["undefined"] == {
        "auc": "class 'pneumonia' absent from the labels",
        "f1": "class 'pneumonia' absent from the labels and never predicted",
    }
    assert m["per_class"][0]["undefined"] == {"auc": "only class 'normal' in the labels"}
    assert m["acc"] == 1.0 and m["balanced_acc"] == 1.0
    headline = summary(m)
    assert set(headline) == {"acc", "balanced_acc", "auc", "f1"} and all(type(v) is float for v in headline.values())


@pytest.mark.filterwarnings("error")
def test_a_single_class_split_has_no_multiclass_auc_and_says_why():
    y = np.array([1, 1, 1])
    m = classification_metrics(Task("multiclass", ("a", "b", "c")), y, softmax(np.eye(3)))
    assert math.isnan(m["auc"])
    reason = m["undefined"]["auc"]
    assert "only class 'b'" in reason and "'a' absent" in reason and "'c' absent" in reason


@pytest.mark.filterwarnings("error")
def test_multilabel_absent_label_is_nan_with_a_reason():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])  # nobody has "nodule"
    scores = np.array([[0.9, 0.7], [0.2, 0.1], [0.4, 0.2], [0.1, 0.3]])
    m = classification_metrics(Task("multilabel", ("effusion", "nodule")), y, scores)
    nodule = m["per_class"][1]
    assert math.isnan(nodule["auc"]) and nodule["undefined"]["auc"] == "no sample has label 'nodule'"
    assert math.isnan(nodule["recall"]) and nodule["f1"] == 0.0  # one false positive
    assert nodule["balanced_acc"] == pytest.approx(3 / 4)  # sklearn: mean recall over the outcomes present
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y[:, 0], scores[:, 0]))
    assert m["f1"] == pytest.approx(skm.f1_score(y, scores >= 0.5, average="macro", zero_division=np.nan))
    effusion = m["per_class"][0]
    pred = scores[:, 0] >= 0.5
    assert effusion["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y[:, 0], pred))
    assert m["undefined"] == {}


def test_scores_of_the_wrong_width_are_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        classification_metrics(Task("binary", ("0", "1")), np.array([0, 1]), np.zeros((2, 3)))


def test_an_empty_split_gives_nan_metrics_with_the_reason():
    m = classification_metrics(Task("binary", ("0", "1")), np.zeros(0), np.zeros((0, 2)))
    assert m["n"] == 0 and all(math.isnan(m[k]) for k in ("acc", "auc", "f1", "balanced_acc"))
    assert m["undefined"]["auc"] == "no samples in this split"
