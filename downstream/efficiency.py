"""Label efficiency: train on a fraction of the labels (1 %, 10 %, 100 %) or N per class, over several seeds,
reported as mean +- std, so the value of pretraining shows as a curve (as in the MedMNIST+ and SSL literature).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medfm.downstream.data import stratified_take
from medfm.pretrain.errors import ConfigError


def _strata(labels: Tensor) -> np.ndarray:
    """One stratum per sample: the class, or for multi-label rows the first positive label (-1 for none)."""
    if labels.ndim == 2:
        positive = labels > 0.5
        return np.where(positive.any(dim=1).numpy(), positive.float().argmax(dim=1).numpy(), -1)
    return labels.numpy()


def label_subset(
    labels: Tensor, *, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> Tensor:
    """Indices of a stratified subset: ``fraction`` of the samples, stratified by class with at least one per class
    (:func:`medfm.downstream.data.stratified_take`), or ``per_class`` of each class (all when a class has fewer). Exactly
    one of the two. Sorted, deterministic in (labels, seed)."""
    if (fraction is None) == (per_class is None):
        raise ConfigError("give exactly one of fraction and per_class")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    strata = _strata(labels)
    if fraction is not None:
        chosen = np.flatnonzero(stratified_take(strata, fraction, seed, leave=0))
    else:  # N per class is no sklearn splitter's contract: a seeded permutation of each class
        rng = np.random.default_rng(seed)
        chosen = np.concatenate([rng.permutation(np.flatnonzero(strata == v))[:per_class] for v in np.unique(strata)])
    return torch.from_numpy(np.sort(chosen)).long()


def budget_name(fraction: float | None = None, per_class: int | None = None) -> str:
    return f"{fraction * 100:g}%" if fraction is not None else f"{per_class}/class"


def mean_std(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """``[{metric: value}]`` over seeds -> ``{metric: {"mean", "std", "n"}}`` (sample std; NaNs left out)."""
    out: dict[str, dict[str, float]] = {}
    for key in runs[0] if runs else ():
        values = np.array([r[key] for r in runs if not math.isnan(r[key])], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[key] = {"mean": float(values.mean()) if len(values) else math.nan, "std": std, "n": len(values)}
    return out


def budgets(fractions: Sequence[float], per_class: Sequence[int]) -> list[dict[str, Any]]:
    """The label budgets to run: ``[{"fraction": f} ...] + [{"per_class": n} ...]``."""
    return [{"fraction": float(f)} for f in fractions] + [{"per_class": int(n)} for n in per_class]


def label_efficiency_rows(
    efficiency: Any, run: Callable[[dict[str, Any], int], tuple[dict[str, float], int]]
) -> list[dict[str, Any]]:
    """The one label-efficiency loop (frozen protocols and fine-tuning): for each budget of the ``efficiency``
    config section x each of its seeds, ``run(budget, seed) -> (test summary, n_train)``; mean +- std over seeds."""
    rows = []
    for budget in budgets(efficiency.fractions, efficiency.per_class):
        outcomes = [run(budget, seed) for seed in efficiency.seeds]
        runs = [metrics for metrics, _ in outcomes]
        rows.append(
            {
                "budget": budget_name(**budget),
                **budget,
                "n_train": int(np.median([n for _, n in outcomes])),
                "seeds": list(efficiency.seeds),
                "runs": runs,
                "test": mean_std(runs),
            }
        )
    return rows
