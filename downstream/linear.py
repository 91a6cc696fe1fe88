"""Linear probe: L2-regularised logistic regression on frozen, standardised features.

Full-batch L-BFGS in float64 (as scikit-learn's default solver) on ``CE(W x + b) + wd / 2 * ||W||^2`` for
single-label tasks, per-label BCE for multi-label tasks; optional class weights for imbalance (scikit-learn's
"balanced": ``n / (K * n_k)`` for K classes; multi-label: ``pos_weight = n_neg / n_pos`` per label). Our own
torch solver rather than scikit-learn's, because it does multi-label BCE with ``pos_weight`` and the probe is a
module that fine-tuning folds into its head; ``tests/downstream/test_linear_probe.py`` pins it to scikit-learn.

The regularisation is chosen on the val split over DINOv2's range of scikit-learn's ``C`` (``dinov2/eval/
log_regression.py``: 1e-6 .. 1e5, at most 1000 L-BFGS iterations each, float64), one value per decade (12) rather
than its 45: the weakly regularised fits run to the iteration cap, and the 45-value sweep made one PneumoniaMNIST
evaluation of a ViT-Tiny's 960-wide features take ~20 minutes on 2 cores (the README's quickstart demo with it).
Values within ``METRIC_TOLERANCE`` count as equal (below), which a quarter-decade step rarely separates. ``C`` weighs the
summed loss, so the probe's weight decay on the mean loss is ``~1 / (C n)``: the grid scales with the number n of
training labels, and a 20-label budget gets the strong-regularisation end that a fixed weight-decay grid lacks. The
grid is walked from strong to weak regularisation, each fit warm-started from the previous solution (scikit-learn's
regularisation path).

Selection deviates from DINOv2 (which keeps the best val accuracy) in two ways. (1) Val metrics within
``METRIC_TOLERANCE`` of the best count as equal, and among them the lowest val loss wins. A rank metric (AUC, our
default) cannot see that the strong end shrinks every probability towards the class prior: on imbalanced
isotropic Gaussian classes (200 labels, 192 dims, 74 % positive, 8 seeds) keeping the best val AUC gave test ACC
0.77 (the majority rate) at AUC 0.979; the tolerance gives 0.91 at 0.969, the former 6-value grid 0.91 at 0.971.
(2) The selected probe is not refitted on train + val: val is the whole split at every label budget, so a refit
would add its labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from medfm.downstream.data import Task
from medfm.downstream.metrics import classification_metrics

DINOV2_C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))  # scikit-learn's C, as dinov2's log_regression.py
C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 12))  # the default: DINOv2's range, one value per decade
DINOV2_MAX_ITER = 1000
# Val metric differences below this are noise: an AUC on a few hundred val samples has a standard error >= ~0.01.
METRIC_TOLERANCE = 0.01


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


def _c_times_weight_decay(num_samples: int, task: Task) -> float:
    """``C * wd``, constant for a task and training-set size: the probe at weight decay ``wd`` is scikit-learn's
    ``LogisticRegression(C=C)`` on the same standardised features.

    scikit-learn minimises ``C * sum_i loss_i + ||W||^2 / 2``, the probe ``mean_i loss_i + wd / 2 * ||W||^2``:
    ``wd = 1 / (C n)`` (multiclass: both multinomial, one penalised row per class). Binary: the probe's two softmax
    rows end as ``(-w / 2, w / 2)`` for sklearn's one row ``w``, so they carry half its penalty: ``wd = 2 / (C n)``.
    Multi-label (sklearn: one binary problem per label): BCE averages the ``n K`` entries: ``wd = 1 / (C n K)``.
    """
    if task.multilabel:
        return 1.0 / (num_samples * task.num_outputs)
    return (2.0 if task.num_outputs == 2 else 1.0) / num_samples


def weight_decay_for_c(c: float, num_samples: int, task: Task) -> float:
    """The probe's weight decay that equals scikit-learn's ``LogisticRegression(C=c)`` on ``num_samples`` labels."""
    return _c_times_weight_decay(num_samples, task) / c


class _RegularisationPath:
    """One training set in float64, standardised once, fitted at one weight decay after another; each fit starts
    from the previous solution (a warm start), so walking the grid from strong to weak regularisation is cheap."""

    def __init__(self, features: Tensor, labels: Tensor, task: Task, class_weights: bool):
        features = features.double()
        self.task = task
        self.mean, self.std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
        self.inputs = (features - self.mean) / self.std
        self.targets = self._targets(labels)
        self.criterion = loss_function(task, class_weight_tensor(labels, task).double() if class_weights else None)
        self.weight = torch.zeros(task.num_outputs, features.shape[1], dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros(task.num_outputs, dtype=torch.float64, requires_grad=True)

    def _targets(self, labels: Tensor) -> Tensor:
        return labels.double() if self.task.multilabel else labels.long()

    def _logits(self, standardised: Tensor) -> Tensor:
        return torch.addmm(self.bias, standardised, self.weight.T)

    def fit(self, weight_decay: float, max_iter: int) -> LinearProbe:
        """Minimise from the current solution; returns the probe (float32, as features are)."""
        optimizer = torch.optim.LBFGS(
            [self.weight, self.bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            penalty = weight_decay / 2 * self.weight.pow(2).sum()
            loss = self.criterion(self._logits(self.inputs), self.targets) + penalty
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        probe = LinearProbe(self.mean.float(), self.std.float(), self.task.num_outputs, self.task.multilabel)
        with torch.no_grad():
            probe.linear.weight.copy_(self.weight)
            probe.linear.bias.copy_(self.bias)
        return probe.eval()

    @torch.no_grad()
    def loss(self, features: Tensor, labels: Tensor) -> float:
        """The training loss (class weights included, no penalty) of the current solution on other samples."""
        standardised = (features.double() - self.mean) / self.std
        return float(self.criterion(self._logits(standardised), self._targets(labels)))


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    task: Task,
    *,
    weight_decay: float = 1e-4,
    class_weights: bool = False,
    max_iter: int = DINOV2_MAX_ITER,
) -> LinearProbe:
    """Fit on (N, D) features; labels (N,) int64 or (N, K) float. Deterministic (zero init, full batch)."""
    return _RegularisationPath(features, labels, task, class_weights).fit(weight_decay, max_iter)


@dataclass(frozen=True)
class ProbeSelection:
    probe: LinearProbe
    weight_decay: float
    val_metric: float
    grid: dict[float, float]  # weight decay -> val metric
    sklearn_c: float  # scikit-learn's C of the selected probe (inf at weight decay 0)


def select_linear_probe(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    task: Task,
    *,
    grid: Sequence[float] = (),
    metric: str = "auc",
    class_weights: bool = False,
    max_iter: int = DINOV2_MAX_ITER,
    metric_tolerance: float = METRIC_TOLERANCE,
) -> ProbeSelection:
    """Fit one probe per weight decay on train (strong to weak, warm-started), keep the best on val.

    ``grid``: weight decays on the mean loss, the same at every training-set size; empty: ``C_GRID`` (DINOv2's
    range) as weight decays :func:`weight_decay_for_c` of the n training labels. Kept: among the probes whose val ``metric`` is within
    ``metric_tolerance`` of the best, the one with the lowest val loss (ties: stronger decay); see the module doc.
    """
    num_samples = len(train[1])
    weight_decays = list(grid) or [weight_decay_for_c(c, num_samples, task) for c in C_GRID]
    path = _RegularisationPath(*train, task, class_weights)
    results: dict[float, tuple[float, float, LinearProbe]] = {}  # weight decay -> (val metric, val loss, probe)
    for weight_decay in sorted(weight_decays, reverse=True):
        probe = path.fit(weight_decay, max_iter)
        value = classification_metrics(task, val[1].numpy(), probe.scores(val[0]).numpy())[metric]
        results[weight_decay] = (-math.inf if math.isnan(value) else value, path.loss(*val), probe)
    best_value = max(value for value, _, _ in results.values())
    near_best = [wd for wd, (value, _, _) in results.items() if value >= best_value - metric_tolerance]
    chosen = min(near_best, key=lambda wd: (results[wd][1], -wd))
    return ProbeSelection(
        probe=results[chosen][2],
        weight_decay=chosen,
        val_metric=results[chosen][0],
        grid={wd: float(np.float64(value)) for wd, (value, _, _) in sorted(results.items())},
        sklearn_c=_c_times_weight_decay(num_samples, task) / chosen if chosen > 0 else math.inf,
    )
