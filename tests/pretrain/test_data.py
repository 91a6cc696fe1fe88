"""Data order: deterministic per (seed, epoch), disjoint across ranks, independent of workers, resumable."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import IterableDataset

from medfm.data_shards.specs import MedMNISTDataset
from medfm.pretrain.data import EpochLoader, EpochSampler
from medfm.pretrain.transforms import MedicalAugment, MultiView


def test_sampler_is_deterministic_and_splits_ranks():
    ranks = [list(EpochSampler(10, 8, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert ranks[0] == list(EpochSampler(10, 8, seed=1, rank=0, world_size=2))
    seeds = [s for rank in ranks for _, s in rank]
    assert len(set(seeds)) == 16  # every position its own augmentation seed
    order = [ranks[p % 2][p // 2][0] for p in range(16)]  # global positions, interleaved over ranks
    assert sorted(order[:10]) == list(range(10))  # one permutation, then the next one continues


def test_sampler_epochs_differ_and_start_skips():
    sampler = EpochSampler(100, 20, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, start=5)
    assert list(sampler) == first[5:] and len(sampler) == 15


def loader(pneumonia, workers: int) -> EpochLoader:
    transform = MultiView([MedicalAugment(20, scale=(0.3, 1.0))] * 2)
    dataset = MedMNISTDataset(pneumonia)
    return EpochLoader(dataset, transform, batch_size=4, batches_per_epoch=5, in_chans=1, seed=0, num_workers=workers)


def test_resume_mid_epoch_gives_the_remaining_batches(pneumonia):
    data = loader(pneumonia, workers=0)
    full = list(data.epoch(2))
    rest = list(data.epoch(2, skip=3))
    assert len(full) == 5 and len(rest) == 2
    for a, b in zip(full[3:], rest, strict=True):
        assert a["key"] == b["key"] and all(torch.equal(x, y) for x, y in zip(a["views"], b["views"], strict=True))
    assert full[0]["views"][0].shape == (4, 1, 20, 20) and len(full[0]["views"]) == 2


def test_worker_count_does_not_change_the_batches(pneumonia):
    serial = list(loader(pneumonia, workers=0).epoch(0))
    parallel = list(loader(pneumonia, workers=2).epoch(0))
    for a, b in zip(serial, parallel, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["views"][1], b["views"][1])


def test_loading_does_not_touch_the_global_generator(pneumonia):
    data = loader(pneumonia, workers=0)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    list(data.epoch(0, skip=2))
    assert torch.equal(torch.rand(2), expected)


def test_loading_never_reseeds_the_gpu_generators(pneumonia, monkeypatch):
    """torch.manual_seed(per-sample seed) reseeded every CUDA generator, which fork_rng(devices=[]) does not
    protect: with num_workers=0 on a GPU, MAE masks and drop path took the last sample's seed every batch."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    first, again = (next(loader(pneumonia, workers=0).epoch(0)) for _ in range(2))
    assert reseeded == []
    assert all(torch.equal(a, b) for a, b in zip(first["views"], again["views"], strict=True))  # still seeded


class ToyStream(IterableDataset):
    """Stands in for ShardStream: deterministic per epoch, ``set_epoch``."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.epoch)
        for i in range(24):
            yield {"image": torch.rand(1, 12, 12, generator=generator), "label": i, "key": f"{self.epoch}-{i}"}


@pytest.mark.parametrize("skip", [0, 2])
def test_stream_resume_skips_consumed_batches(skip):
    transform = MultiView([MedicalAugment(8)])
    data = EpochLoader(ToyStream(), transform, batch_size=4, batches_per_epoch=5, in_chans=3, seed=0)
    full, rest = list(data.epoch(1)), list(data.epoch(1, skip=skip))
    assert len(full) == 5 and len(rest) == 5 - skip
    for a, b in zip(full[skip:], rest, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["views"][0], b["views"][0])
    assert full[0]["views"][0].shape == (4, 3, 8, 8)  # gray matched to in_chans=3
