"""Results files carry undefined metrics as null plus their reasons; the embedding plot's PCA is sklearn's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.decomposition import PCA

from medfm.downstream.data import Task
from medfm.downstream.metrics import classification_metrics, summary
from medfm.downstream.report import markdown, pca_2d, write_results


def test_undefined_metrics_are_null_in_json_and_explained_in_markdown(tmp_path):
    task = Task("binary", ("normal", "pneumonia"))
    test = classification_metrics(task, np.array([0, 0, 0]), np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]))
    result = {
        "protocol": "linear",
        "dataset": "medmnist:toy.npz",
        "backbone": {"source": "random", "architecture": "vit_tiny", "init": "random"},
        "task": {"kind": task.kind, "class_names": list(task.class_names)},
        "test": test,
        "summary": summary(test),
    }
    write_results(tmp_path, result)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["test"]["auc"] is None and written["summary"]["auc"] is None
    assert written["test"]["undefined"]["auc"] == "class 'pneumonia' absent from the labels"
    assert written["test"]["per_class"][1]["undefined"]["recall"] == "class 'pneumonia' absent from the labels"
    text = (tmp_path / "results.md").read_text()
    assert "- test auc: class 'pneumonia' absent from the labels" in text
    assert "- test normal auc: only class 'normal' in the labels" in text
    assert text == markdown(written)


def test_pca_2d_is_sklearns_exact_pca():
    features = np.random.default_rng(0).normal(size=(40, 6)) * np.arange(1, 7)
    expected = PCA(n_components=2, svd_solver="full").fit_transform(features)
    np.testing.assert_allclose(pca_2d(features), expected)
    np.testing.assert_array_equal(pca_2d(features), pca_2d(features.copy()))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("shape", [(0, 5), (1, 5), (2, 5), (7, 1), (4, 3)])
def test_pca_2d_degenerate_inputs_give_n_by_2_points(shape):
    features = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    if shape == (4, 3):
        features = np.ones(shape)  # constant features: no direction at all
    points = pca_2d(features)
    assert points.shape == (shape[0], 2) and np.isfinite(points).all()
    if min(shape[0] - 1, shape[1]) < 2:
        assert (points[:, 1] == 0).all()
    if shape[0] > 1 and shape[1] == 1:  # one feature: PC 1 is that feature, centred
        np.testing.assert_allclose(np.abs(points[:, 0]), np.abs(features[:, 0] - features[:, 0].mean()))
