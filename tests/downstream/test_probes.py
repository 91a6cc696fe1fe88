"""kNN as in DINO's eval_knn, the linear probe against scikit-learn, label budgets and corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from medfm.downstream.data import Task, stratified_split
from medfm.downstream.efficiency import label_subset, mean_std
from medfm.downstream.linear import C_GRID, class_weight_tensor, fit_linear_probe, select_linear_probe
from medfm.downstream.robustness import CORRUPTIONS, SEVERITIES, Corruption
from medfm.pretrain.knn import knn_scores


def dino_knn_reference(train, train_labels, test, num_classes, k, t):
    """facebookresearch/dino eval_knn.knn_classifier, one test row at a time."""
    train = torch.nn.functional.normalize(train, dim=1)
    out = []
    for row in torch.nn.functional.normalize(test, dim=1):
        similarity = train @ row
        distances, indices = similarity.topk(k)
        one_hot = torch.zeros(k, num_classes).scatter_(1, train_labels[indices].view(-1, 1), 1)
        probs = (one_hot * distances.div(t).exp().view(-1, 1)).sum(0)
        out.append(probs / probs.sum())
    return torch.stack(out)


def test_knn_matches_dino_reference():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    scores = knn_scores(train, labels, test, 3, k=5, temperature=0.1, chunk_size=3)
    torch.testing.assert_close(scores, dino_knn_reference(train, labels, test, 3, 5, 0.1))


def test_knn_multilabel_is_the_weighted_mean_of_neighbour_labels():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    scores = knn_scores(train, labels, torch.tensor([[1.0, 0.05]]), 2, k=2, temperature=1.0)
    sims = torch.nn.functional.normalize(train[:2], dim=1) @ torch.nn.functional.normalize(
        torch.tensor([1.0, 0.05]), dim=0
    )
    w = sims.exp() / sims.exp().sum()
    torch.testing.assert_close(scores[0], torch.stack([w.sum(), w[1]]))


def sklearn_probs(x, y, weight_decay):
    """sklearn minimises C * sum(loss) + ||W||^2 / 2; the probe mean(loss) + wd / 2 ||W||^2: C = 1 / (n wd)."""
    x = (x - x.mean(0)) / x.std(0, ddof=1)
    model = LogisticRegression(C=1 / (len(x) * weight_decay), max_iter=5000, tol=1e-10).fit(x, y)
    return model.predict_proba(x)


def test_linear_probe_matches_sklearn_multinomial_logistic_regression():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (120,), generator=g)
    features = torch.randn(120, 6, generator=g) + torch.nn.functional.one_hot(labels, 6).float()
    task = Task("multiclass", ("a", "b", "c"))
    probe = fit_linear_probe(features, labels, task, weight_decay=1e-2, max_iter=500)
    expected = sklearn_probs(features.double().numpy(), labels.numpy(), 1e-2)
    np.testing.assert_allclose(probe.scores(features).numpy(), expected, atol=2e-3)


def test_class_weights_and_multilabel_probe():
    labels = torch.tensor([0] * 90 + [1] * 10)
    torch.testing.assert_close(
        class_weight_tensor(labels, Task("binary", ("0", "1"))), torch.tensor([100 / 180, 100 / 20])
    )
    g = torch.Generator().manual_seed(1)
    multi = (torch.rand(200, 2, generator=g) > 0.7).float()
    features = torch.randn(200, 5, generator=g) + torch.cat([multi * 2, torch.zeros(200, 3)], dim=1)
    task = Task("multilabel", ("x", "y"))
    selection = select_linear_probe(
        (features[:150], multi[:150]), (features[150:], multi[150:]), task, class_weights=True
    )
    assert selection.val_metric > 0.85 and len(selection.grid) == len(C_GRID)  # DINOv2's C range, per decade
    assert selection.probe.scores(features).shape == (200, 2)


def test_label_budgets_are_stratified_and_deterministic():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    one_percent = label_subset(labels, fraction=0.01, seed=0)
    assert torch.bincount(labels[one_percent]).tolist() == [9, 1, 1]  # every class kept
    assert torch.equal(one_percent, label_subset(labels, fraction=0.01, seed=0))
    assert not torch.equal(one_percent, label_subset(labels, fraction=0.01, seed=1))
    assert torch.bincount(labels[label_subset(labels, per_class=20, seed=0)]).tolist() == [20, 20, 10]
    assert len(label_subset(labels, fraction=1.0)) == 1000
    stats = mean_std([{"auc": 0.8}, {"auc": 0.9}])["auc"]
    assert stats["mean"] == pytest.approx(0.85) and stats["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))


def test_stratified_split_partitions_every_class():
    labels = [0] * 50 + [1] * 10
    train, val = stratified_split(labels, [0.8], seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(60))
    assert sum(labels[i] for i in val) == 2 and len(val) == 12


def test_stratified_split_is_deterministic_and_stratified():
    rng = np.random.default_rng(0)
    labels = rng.permutation([0] * 300 + [1] * 150 + [2] * 42 + [3] * 8).tolist()
    groups = stratified_split(labels, [0.7, 0.1], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(groups, stratified_split(labels, [0.7, 0.1], seed=3), strict=True))
    assert not np.array_equal(groups[0], stratified_split(labels, [0.7, 0.1], seed=4)[0])
    assert sorted(np.concatenate(groups).tolist()) == list(range(500))
    counts = [np.bincount(np.asarray(labels)[g], minlength=4) for g in groups]
    totals = np.bincount(labels)
    for share, count in zip([0.7, 0.1, 0.2], counts, strict=True):
        assert np.abs(count - share * totals).max() <= 1.5  # each class split in the given proportions
        assert (count >= 1).all()  # even the class of 8 is in every group


def test_stratified_split_small_classes_and_multilabel_rows():
    labels = [0] * 4 + [1] * 4 + [2] * 4 + [3]  # val (10 %) is smaller than the number of classes
    train, val, test = stratified_split(labels, [0.7, 0.1], seed=0)
    assert sorted([*train, *val, *test]) == list(range(13))
    assert 12 in train  # a class of one goes where its share rounds to: train
    assert {labels[i] for i in train} == {0, 1, 2, 3} and len(val) >= 1 and {labels[i] for i in test} == {0, 1, 2}
    rows = [(1, 0, 0)] * 10 + [(0, 1, 1)] * 10 + [(0, 0, 0)] * 10  # strata: first positive label, none
    train, val = stratified_split(rows, [0.8], seed=0)
    assert [sum(1 for i in val if i // 10 == s) for s in range(3)] == [2, 2, 2]


def test_label_subsets_keep_every_class_even_a_class_of_one():
    labels = torch.tensor([0] * 500 + [1] * 30 + [2] * 2 + [3])
    for seed in range(3):
        subset = label_subset(labels, fraction=0.05, seed=seed)
        assert torch.bincount(labels[subset], minlength=4).min() >= 1
        assert torch.equal(subset, label_subset(labels, fraction=0.05, seed=seed))
    multilabel = torch.tensor([[1.0, 0.0]] * 50 + [[0.0, 1.0]] * 3 + [[0.0, 0.0]] * 20)
    subset = label_subset(multilabel, fraction=0.02, seed=0)
    assert {0, 1, 2} <= {0 if i < 50 else 1 if i < 53 else 2 for i in subset.tolist()}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_are_deterministic_in_range_and_grow_with_severity(name):
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    outputs = [Corruption(name, s)(image) for s in SEVERITIES]
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 1 for o in outputs)
    assert torch.equal(outputs[2], Corruption(name, 3)(image))
    distances = [(o - image).abs().mean().item() for o in outputs]
    assert distances[-1] > distances[0] > 0
    with pytest.raises(ValueError, match="severity"):
        Corruption(name, 6)
