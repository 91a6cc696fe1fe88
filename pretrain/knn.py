"""Weighted kNN accuracy of frozen features: the health signal of SSL pretraining (Wu et al. 2018; DINO's
``eval_knn.py``: cosine similarity, top-k neighbours voting with weight exp(sim / T))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from data_shards.stream import match_channels
from pretrain.backbones import pooled_features


@torch.no_grad()
def extract_features(
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
) -> tuple[Tensor, Tensor]:
    """L2-normalised pooled features (N, D) and integer labels (N,) of ``dataset`` (dicts with image, label).

    Images are only resized to ``img_size`` (when given) and normalised, no augmentation; the backbone runs in
    eval mode and is put back as it was.
    """
    if max_samples is not None and len(dataset) > max_samples:
        # An evenly spaced subset: deterministic, and spread over the whole file.
        dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, max_samples).long().tolist())
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    for batch in DataLoader(dataset, batch_size=batch_size):
        images = torch.stack([match_channels(image, in_chans) for image in batch["image"]]).to(device)
        if img_size is not None and images.shape[-2:] != (img_size, img_size):
            images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", antialias=True)
        images = (images - mean_t) / std_t
        features.append(F.normalize(pooled_features(backbone, images).float(), dim=1).cpu())
        labels.append(torch.as_tensor(batch["label"]).view(-1).long())
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    features: Tensor,
    labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Accuracy of weighted kNN classification of ``features`` (M, D) against the bank (N, D); both L2-normalised."""
    num_classes = int(max(train_labels.max(), labels.max())) + 1
    similarity, index = (features @ train_features.T).topk(min(k, len(train_features)), dim=1)
    votes = torch.zeros(len(features), num_classes)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return float((votes.argmax(dim=1) == labels).float().mean())


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
    ):
        self.bank, self.query, self.k, self.temperature = bank, query, k, temperature
        self.options = {"mean": mean, "std": std, "in_chans": in_chans, "img_size": img_size, "device": device,
                        "max_samples": max_samples}  # fmt: skip

    def __call__(self, backbone: nn.Module) -> float:
        bank = extract_features(backbone, self.bank, **self.options)
        query = extract_features(backbone, self.query, **self.options)
        return knn_accuracy(*bank, *query, k=self.k, temperature=self.temperature)
