"""Weighted kNN accuracy of frozen features: the health signal of SSL pretraining (Wu et al. 2018; DINO's
``eval_knn.py``: cosine similarity, top-k neighbours voting with weight exp(sim / T))."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from medfm.data_shards.codec import match_channels
from medfm.pretrain.backbones import pooled_features
from medfm.pretrain.distributed import gpu_supports_bf16
from medfm.pretrain.errors import ConfigError, InputError


def feature_precision(device: torch.device | str) -> str:
    """The precision frozen features are computed in: ``bf16`` on a GPU with native bf16 (the features are
    returned in fp32; they agree with fp32 ones to ~1e-2 relative, far below what the probes resolve), else
    ``fp32``. Recorded in the feature cache's key."""
    return "bf16" if torch.device(device).type == "cuda" and gpu_supports_bf16() else "fp32"


def feature_autocast(device: torch.device | str) -> AbstractContextManager:
    """Autocast for evaluation forwards (``feature_precision``)."""
    if feature_precision(device) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    collate_fn: Callable[[list[dict]], dict] | None = None,
    prepare: Callable[[Tensor], Tensor] | None = None,
    features_of: Callable[[nn.Module, Tensor], Tensor] = pooled_features,
) -> tuple[Tensor, list[Tensor], list[str]]:
    """The one feature loop (online kNN monitor, downstream protocols): pooled pre-logits features (N, D)
    float32 of ``dataset`` (dicts with image, label, key), in dataset order, with the batches' labels and keys.

    ``prepare(images)`` runs on the batch on ``device`` before the backbone (resize, normalise); no augmentation.
    ``features_of(backbone, images)`` pools (default: timm's pre-logits; ``backbones.layer_features``: several layers).
    The backbone runs in eval mode and is put back as it was; on a GPU with bf16 under autocast
    (``feature_precision``).
    """
    was_training = backbone.training
    backbone.eval()
    features, labels, keys = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn):
        images = batch["image"].to(device, non_blocking=True)
        with feature_autocast(device):
            pooled = features_of(backbone, prepare(images) if prepare else images)
        features.append(pooled.float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
        keys.extend(str(k) for k in batch.get("key", ()))
    backbone.train(was_training)
    if not features:
        raise InputError("the dataset is empty: no features to extract")
    return torch.cat(features), labels, keys


def knn_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    in_chans: int = 1,
    img_size: int | None = None,
    batch_size: int = 256,
    max_samples: int | None = None,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """L2-normalised pooled features (N, D) and integer labels (N,) for the kNN monitor.

    Images are only matched to ``in_chans``, resized to ``img_size`` (when given) and normalised.
    """
    if max_samples is not None and len(dataset) > max_samples:
        # An evenly spaced subset: deterministic, and spread over the whole file.
        dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, max_samples).long().tolist())
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def prepare(images: Tensor) -> Tensor:
        images = torch.stack([match_channels(image, in_chans) for image in images])
        if img_size is not None and images.shape[-2:] != (img_size, img_size):
            images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", antialias=True)
        return (images - mean_t) / std_t

    features, labels, _ = extract_features(
        backbone, dataset, batch_size=batch_size, device=device, prepare=prepare, num_workers=num_workers
    )
    return F.normalize(features, dim=1), torch.cat([label.view(-1) for label in labels]).long()


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
        raise ConfigError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
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


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    features: Tensor,
    labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Accuracy of weighted kNN classification of ``features`` (M, D) against the bank (N, D)."""
    num_classes = int(max(train_labels.max(), labels.max())) + 1
    scores = knn_scores(train_features, train_labels, features, num_classes, k=k, temperature=temperature)
    return float((scores.argmax(dim=1) == labels).float().mean())


class KNNMonitor:
    """``monitor(backbone) -> accuracy`` of ``query`` images classified by their neighbours in ``bank``."""

    def __init__(
        self,
        bank: Dataset,
        query: Dataset,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        in_chans: int,
        img_size: int | None = None,
        k: int = 20,
        temperature: float = 0.07,
        max_samples: int | None = 5000,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
    ):
        self.bank, self.query, self.k, self.temperature = bank, query, k, temperature
        # num_workers: the other ranks wait at their next collective while the main process runs the monitor, so
        # its images are read by loader workers, as the training batches are.
        self.options = {
            "mean": mean,
            "std": std,
            "in_chans": in_chans,
            "img_size": img_size,
            "device": device,
            "max_samples": max_samples,
            "num_workers": num_workers,
        }

    def __call__(self, backbone: nn.Module) -> float:
        bank = knn_features(backbone, self.bank, **self.options)
        query = knn_features(backbone, self.query, **self.options)
        return knn_accuracy(*bank, *query, k=self.k, temperature=self.temperature)
