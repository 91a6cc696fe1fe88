"""The linear probe against scikit-learn's LogisticRegression (lbfgs, float64), the solver of DINOv2's logistic
regression evaluation, at the same C; and DINOv2's C grid, scaled with the number of training labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from medfm.downstream.data import Task
from medfm.downstream.linear import C_GRID, DINOV2_C_GRID, fit_linear_probe, select_linear_probe, weight_decay_for_c

BINARY = Task("binary", ("normal", "abnormal"))
FOUR_CLASSES = Task("multiclass", ("a", "b", "c", "d"))


def gaussian_classes(
    task: Task, n: int, *, dim: int = 16, separation: float = 1.0, positive_rate: float | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) features: isotropic unit Gaussians around one mean per class; labels (n,), balanced unless
    ``positive_rate`` (binary). The class means depend only on the task and ``dim``, so splits share them."""
    means = torch.randn(task.num_outputs, dim, generator=torch.Generator().manual_seed(1234)) * separation
    g = torch.Generator().manual_seed(seed)
    if positive_rate is None:
        labels = torch.randint(0, task.num_outputs, (n,), generator=g)
    else:
        labels = (torch.rand(n, generator=g) < positive_rate).long()
    return means[labels] + torch.randn(n, dim, generator=g), labels


def sklearn_probabilities(probe, train, test, c: float, class_weight: str | None = None) -> np.ndarray:
    """scikit-learn's LogisticRegression(C=c) on the probe's standardisation, fitted to convergence in float64."""

    def standardise(features: torch.Tensor) -> np.ndarray:
        return ((features.double() - probe.mean.double()) / probe.std.double()).numpy()

    model = LogisticRegression(C=c, class_weight=class_weight, tol=1e-10, max_iter=10_000)
    return model.fit(standardise(train[0]), train[1].numpy()).predict_proba(standardise(test))


@pytest.mark.parametrize(
    ("task", "class_weights", "separation"),
    [(BINARY, False, 0.5), (BINARY, True, 0.5), (FOUR_CLASSES, False, 0.6)],
    ids=["binary", "binary-balanced", "four-classes"],
)
def test_the_selected_probe_predicts_what_sklearn_predicts_at_its_c(task, class_weights, separation):
    rate = 0.75 if task is BINARY else None  # imbalanced binary: class weights matter
    train = gaussian_classes(task, 300, separation=separation, positive_rate=rate, seed=0)
    val = gaussian_classes(task, 200, separation=separation, positive_rate=rate, seed=1)
    test = gaussian_classes(task, 1000, separation=separation, positive_rate=rate, seed=2)[0]
    selection = select_linear_probe(train, val, task, class_weights=class_weights)
    assert any(selection.sklearn_c == pytest.approx(c) for c in C_GRID)
    ours = selection.probe.scores(test).double().numpy()
    reference = sklearn_probabilities(
        selection.probe, train, test, selection.sklearn_c, "balanced" if class_weights else None
    )
    assert (ours.argmax(axis=1) == reference.argmax(axis=1)).mean() >= 0.99
    np.testing.assert_allclose(ours, reference, atol=5e-4)


@pytest.mark.parametrize("c", [1e-4, 1e-2, 1.0, 1e2, 1e5], ids=lambda c: f"C={c:g}")
@pytest.mark.parametrize("task", [BINARY, FOUR_CLASSES], ids=["binary", "four-classes"])
def test_weight_decay_for_c_is_sklearns_c_across_the_grid(task, c):
    """From the prior-only strong end to the nearly unregularised weak end (overlapping classes: a finite optimum)."""
    train = gaussian_classes(task, 400, dim=8, separation=0.4, seed=0)
    test = gaussian_classes(task, 500, dim=8, separation=0.4, seed=1)[0]
    probe = fit_linear_probe(*train, task, weight_decay=weight_decay_for_c(c, len(train[1]), task))
    reference = sklearn_probabilities(probe, train, test, c)
    ours = probe.scores(test).double().numpy()
    assert (ours.argmax(axis=1) == reference.argmax(axis=1)).mean() >= 0.99
    np.testing.assert_allclose(ours, reference, atol=5e-4)


def test_multilabel_weight_decay_is_one_sklearn_problem_per_label_at_the_same_c():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(300, 3, generator=g) > 0.6).float()
    features = torch.randn(300, 6, generator=g) + torch.cat([labels, torch.zeros(300, 3)], dim=1)
    task = Task("multilabel", ("x", "y", "z"))
    probe = fit_linear_probe(features, labels, task, weight_decay=weight_decay_for_c(0.1, 300, task))
    ours = probe.scores(features).double().numpy()
    for k in range(3):
        reference = sklearn_probabilities(probe, (features, labels[:, k].long()), features, 0.1)[:, 1]
        np.testing.assert_allclose(ours[:, k], reference, atol=5e-4)


def test_the_default_grid_is_dinov2s_c_grid_as_weight_decays_that_scale_with_the_labels():
    val = gaussian_classes(BINARY, 100, seed=1)
    grids = {}
    for n in (20, 200):
        selection = select_linear_probe(gaussian_classes(BINARY, n, seed=0), val, BINARY)
        grids[n] = sorted(selection.grid)
        assert grids[n] == pytest.approx(sorted(weight_decay_for_c(c, n, BINARY) for c in C_GRID))
    assert len(DINOV2_C_GRID) == 45 and DINOV2_C_GRID[0] == pytest.approx(1e-6) and DINOV2_C_GRID[-1] == 1e5
    assert len(C_GRID) == 12 and (C_GRID[0], C_GRID[-1]) == pytest.approx((1e-6, 1e5))  # its range, per decade
    assert np.allclose(np.array(grids[20]) / np.array(grids[200]), 10.0)  # 10x fewer labels, 10x the decay
    assert grids[20][-1] == pytest.approx(1e5)  # 2 / (1e-6 * 20): a strong end where the former grid stopped at 0.1
    fixed = select_linear_probe(gaussian_classes(BINARY, 20, seed=0), val, BINARY, grid=[0.1, 0.01])
    assert sorted(fixed.grid) == [0.01, 0.1]  # linear.weight_decays: the same decays at every label budget
    assert fixed.sklearn_c == pytest.approx(2 / (20 * fixed.weight_decay))


def test_near_equal_val_auc_goes_to_the_lower_val_loss_not_to_the_prior_only_strong_end():
    """Isotropic classes: the strong end (w along the class-mean difference, shrunk to the prior) has the best val
    AUC by a hair, yet predicts the majority class everywhere; within the tolerance the val loss decides."""
    train, val, (test, test_labels) = (
        gaussian_classes(BINARY, n, dim=100, separation=0.25, positive_rate=0.75, seed=seed)
        for seed, n in enumerate([200, 500, 2000])
    )
    best_auc = select_linear_probe(train, val, BINARY, metric_tolerance=0.0)
    selected = select_linear_probe(train, val, BINARY)
    majority_rate = test_labels.float().mean().item()

    def test_acc(selection) -> float:
        return (selection.probe.scores(test).argmax(dim=1) == test_labels).float().mean().item()

    assert test_acc(best_auc) < majority_rate + 0.02 and test_acc(selected) > majority_rate + 0.1
    assert selected.val_metric >= max(selected.grid.values()) - 0.01
    assert selected.weight_decay < best_auc.weight_decay
