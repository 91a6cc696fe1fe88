"""Linear probe: L2-regularised logistic regression on frozen, standardised features.

Full-batch L-BFGS (as scikit-learn's default solver) on ``CE(W x + b) + wd / 2 * ||W||^2`` for single-label
tasks, per-label BCE for multi-label tasks; optional class weights for imbalance (scikit-learn's "balanced":
``n / (C * n_c)``; multi-label: ``pos_weight = n_neg / n_pos`` per label). The regularisation strength is chosen
on the val split from a grid, as in the MedMNIST+ and DINO linear evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from downstream.data import Task
from downstream.metrics import classification_metrics

DEFAULT_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class LinearProbe(nn.Module):
    """features (N, D) -> logits (N, C): standardisation with the training statistics, then a linear layer."""

    def __init__(self, mean: Tensor, std: Tensor, num_outputs: int, multilabel: bool):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.shape[0], num_outputs)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.multilabel = multilabel

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features - self.mean) / self.std)

    @torch.no_grad()
    def scores(self, features: Tensor) -> Tensor:
        """(N, D) -> probabilities (N, C): softmax, or per-label sigmoid for multi-label."""
        logits = self(features.float())
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=1)


def class_weight_tensor(labels: Tensor, task: Task) -> Tensor:
    """Single-label: ``n / (C * n_c)`` per class (0 for absent classes); multi-label: ``n_neg / n_pos``."""
    if task.multilabel:
        positives = labels.float().sum(dim=0)
        return (len(labels) - positives) / positives.clamp_min(1)
    counts = torch.bincount(labels.long(), minlength=task.num_outputs).float()
    return torch.where(counts > 0, len(labels) / (task.num_outputs * counts.clamp_min(1)), torch.zeros_like(counts))


def loss_function(task: Task, weights: Tensor | None = None, label_smoothing: float = 0.0) -> nn.Module:
    """CE (with label smoothing) for single-label, BCE-with-logits (pos_weight) for multi-label."""
    if task.multilabel:
        return nn.BCEWithLogitsLoss(pos_weight=weights)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    task: Task,
    *,
    weight_decay: float = 1e-4,
    class_weights: bool = False,
    max_iter: int = 200,
) -> LinearProbe:
    """Fit on (N, D) features; labels (N,) int64 or (N, K) float. Deterministic (zero init, full batch)."""
    features = features.float()
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    probe = LinearProbe(mean, std, task.num_outputs, task.multilabel)
    standardised = (features - mean) / std  # once, not in every L-BFGS evaluation
    criterion = loss_function(task, class_weight_tensor(labels, task) if class_weights else None)
    targets = labels.float() if task.multilabel else labels.long()
    optimizer = torch.optim.LBFGS(
        probe.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = criterion(probe.linear(standardised), targets) + weight_decay / 2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe.eval()


@dataclass(frozen=True)
class ProbeSelection:
    probe: LinearProbe
    weight_decay: float
    val_metric: float
    grid: dict[float, float]  # weight decay -> val metric


def select_linear_probe(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    task: Task,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    metric: str = "auc",
    class_weights: bool = False,
    max_iter: int = 200,
) -> ProbeSelection:
    """Fit one probe per weight decay on train, keep the best by ``metric`` on val (ties: stronger decay)."""
    results: dict[float, tuple[float, LinearProbe]] = {}
    for weight_decay in sorted(grid, reverse=True):
        probe = fit_linear_probe(
            *train, task, weight_decay=weight_decay, class_weights=class_weights, max_iter=max_iter
        )
        value = classification_metrics(task, val[1].numpy(), probe.scores(val[0]).numpy())[metric]
        results[weight_decay] = (-math.inf if math.isnan(value) else value, probe)
    best = max(results, key=lambda wd: (results[wd][0], wd))
    return ProbeSelection(
        probe=results[best][1],
        weight_decay=best,
        val_metric=results[best][0],
        grid={wd: float(np.float64(v)) for wd, (v, _) in sorted(results.items())},
    )
