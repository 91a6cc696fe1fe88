"""Weighted kNN probe: correct on separable data, chance-level on noise, usable on a real backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medfm.data_shards.specs import MedMNISTDataset
from medfm.pretrain.backbones import build_backbone
from medfm.pretrain.knn import KNNMonitor, knn_accuracy


def test_separable_clusters_are_classified_exactly():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(3, 8), dim=1)
    labels = torch.arange(3).repeat_interleave(20)
    features = F.normalize(centers[labels] + 0.05 * torch.randn(60, 8), dim=1)
    assert knn_accuracy(features[::2], labels[::2], features[1::2], labels[1::2], k=5) == 1.0


def test_random_labels_are_near_chance():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(400, 16), dim=1)
    labels = torch.randint(0, 2, (400,))
    assert 0.35 < knn_accuracy(features[:200], labels[:200], features[200:], labels[200:]) < 0.65


def test_monitor_on_real_images(pneumonia):
    monitor = KNNMonitor(
        MedMNISTDataset(pneumonia, "train"),
        MedMNISTDataset(pneumonia, "val"),
        mean=(0.5,),
        std=(0.5,),
        in_chans=1,
        img_size=32,  # resized: a ViT at 32 px cannot take the 28 px images as they are
        max_samples=200,
    )
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).train()
    accuracy = monitor(backbone)
    assert 0.0 <= accuracy <= 1.0 and backbone.training  # train mode restored
    monitor.options["num_workers"] = 2  # as a pretraining run reads them (min(data.num_workers, 4))
    assert monitor(backbone) == accuracy
