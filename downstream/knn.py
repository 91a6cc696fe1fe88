"""Weighted kNN on frozen features, as in DINO's ``eval_knn.py`` (Wu et al. 2018; Caron et al. 2021).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples, whose votes are
weighted by ``exp(similarity / temperature)``. Single-label: class scores are the normalised weighted votes
(N, C). Multi-label: each label's score is the weighted mean of the neighbours' 0/1 labels (N, K).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """train (M, D) with labels (M,) int64 or (M, K) float, test (N, D) -> scores (N, C), rows summing to 1
    for single-label, each in [0, 1] for multi-label."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = min(k, len(train_features))
    train = F.normalize(train_features.float(), dim=1)
    multilabel = train_labels.ndim == 2
    targets = train_labels.float() if multilabel else F.one_hot(train_labels.long(), num_classes).float()
    scores = []
    for start in range(0, len(test_features), chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)  # (B, k)
        weights = (similarity / temperature).exp()  # DINO: distances.div_(T).exp_()
        votes = (weights.unsqueeze(-1) * targets[index]).sum(dim=1)  # (B, C)
        scores.append(votes / weights.sum(dim=1, keepdim=True))
    return torch.cat(scores)
