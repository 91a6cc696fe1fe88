"""From a dataset spec to batches of augmented views, in an order that a resumed run reproduces exactly.

Every sample's augmentation is drawn from torch's generator seeded by a per-sample seed: (seed, epoch,
position in the epoch) for indexable datasets, (seed, epoch, rank, worker, count) for streams. The batches of
an epoch are therefore a function of (config, epoch) alone (for indexable datasets, also independent of the
number of loader workers) and not of where a run was interrupted: resuming mid-epoch skips the consumed
batches (indexable datasets: without loading them; streams: read and dropped).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from medfm.data_shards.codec import match_channels
from medfm.data_shards.specs import open_dataset
from medfm.data_shards.stream import DamageLedger, ShardStream

ViewsTransform = Callable[[torch.Tensor], list[torch.Tensor]]


def sample_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple of ints / strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def open_source(
    spec: str, split: str | None, *, seed: int, samples_per_epoch: int | None, shuffle_buffer: int
) -> Dataset:
    """The dataset named by ``spec`` yielding ``{"image": (C, H, W) float in [0, 1], "label", "key"}``."""
    return open_dataset(
        spec, split, None, seed=seed, samples_per_epoch=samples_per_epoch, shuffle_buffer=shuffle_buffer
    )


class EpochSampler(Sampler):
    """This rank's ``(index, sample_seed)`` pairs of one epoch, from ``start`` on.

    An epoch is ``samples_per_rank x world_size`` positions of a seeded random order over the dataset
    (permutations concatenated when an epoch is longer than the dataset); rank r takes positions r, r + W, ...
    """

    def __init__(self, dataset_size: int, samples_per_rank: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset_size, self.samples_per_rank = dataset_size, samples_per_rank
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.samples_per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        total = self.samples_per_rank * self.world_size
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, "order"))
        repeats = math.ceil(total / self.dataset_size)
        order = torch.cat([torch.randperm(self.dataset_size, generator=generator) for _ in range(repeats)])
        for position in range(self.rank + self.start * self.world_size, total, self.world_size):
            yield int(order[position]), sample_seed(self.seed, self.epoch, position)


class SeededViews(Dataset):
    """Indexable dataset + views transform; ``dataset[(index, seed)]`` -> ``{"views", "label", "key"}``."""

    def __init__(self, dataset: Dataset, transform: ViewsTransform, in_chans: int):
        self.dataset, self.transform, self.in_chans = dataset, transform, in_chans

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        return _views(self.dataset[index], self.transform, self.in_chans, seed)


class StreamViews(IterableDataset):
    """Stream (``set_epoch``-able, deterministic per (seed, epoch, rank, worker)) + views transform."""

    def __init__(self, stream: IterableDataset, transform: ViewsTransform, in_chans: int, seed: int, rank: int):
        # The rank is given, not read from the environment inside a worker: without a launcher's RANK every
        # process would read 0 and two ranks would draw the same augmentations.
        self.stream, self.transform, self.in_chans, self.seed, self.rank = stream, transform, in_chans, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for count, sample in enumerate(self.stream):
            seed = sample_seed(self.seed, self.epoch, self.rank, worker, count)
            views = _views(sample, self.transform, self.in_chans, seed)
            if "damage" in sample:  # what a shard stream left out (medfm.data_shards.stream), for EpochLoader.damage
                views["damage"] = sample["damage"]
            yield views


def _views(sample: dict[str, Any], transform: ViewsTransform, in_chans: int, seed: int) -> dict[str, Any]:
    image = match_channels(sample["image"], in_chans)
    # The per-sample seed must not disturb the caller's generators (the training loop's masks, drop path): fork the
    # CPU generator and seed only it. torch.manual_seed would also reseed every CUDA generator, which
    # fork_rng(devices=[]) does not protect: with num_workers=0 on a GPU, masks and drop path were reseeded to the
    # last sample's seed every batch. The augmentations draw from the CPU generator only.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        views = transform(image)
    return {"views": views, "label": sample["label"], "key": sample["key"]}


class ShardDamage:
    """What this rank's shard stream has left out (damaged shards, rejected samples), gathered from its loader
    workers: the stream puts each worker's new findings in the ``"damage"`` field of its next sample (a JSON string,
    usually empty), so counting costs no extra process, file or host sync. Each shard or sample counts once, across
    workers and epochs, and is reported once to ``report(reason)`` (the training loop sets it: a warning event;
    default: a line on stderr); past ``medfm.data_shards.stream.DAMAGE_BUDGET`` of the set it raises ``ShardDamaged``."""

    def __init__(self, where: str, total: int, at_open: list[dict[str, Any]]):
        self.where, self.ledger = where, DamageLedger(total)
        self.report: Callable[[str], None] = lambda reason: print(f"warning: {reason}", file=sys.stderr)
        self.at_open = at_open  # reported when training starts: the report is set by then

    @property
    def shards(self) -> int:
        return len(self.ledger.shards)

    @property
    def samples(self) -> int:
        return len(self.ledger.samples)

    def observe(self, fields: list[str]) -> None:
        """A batch's ``"damage"`` strings (one per sample)."""
        self._add(self.at_open)
        self.at_open = []
        for text in fields:
            if text:
                self._add(json.loads(text))

    def _add(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if self.ledger.add(event):
                self.report(event["reason"])
                self.ledger.check(self.where, event["reason"])


class EpochLoader:
    """``loader.epoch(e, skip)`` yields this rank's ``batches_per_epoch - skip`` batches of epoch ``e``.

    Each batch: ``{"views": [(B, C, H, W), ...], "label": (B,) or (B, K), "key": [str] * B}``.
    ``damage``: a :class:`ShardDamage` for shard streams (None otherwise).
    Not passed through ``accelerator.prepare``: sharding across ranks happens here, deterministically.
    A views transform with a ``collate(samples) -> batch`` method makes the batches itself (in the loader's
    workers, on the host: DINOv2 adds its masks' indices, which the step then needs no host sync to count).
    """

    def __init__(
        self,
        source: Dataset,
        transform: ViewsTransform,
        *,
        batch_size: int,
        batches_per_epoch: int,
        in_chans: int,
        seed: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        self.batches_per_epoch = batches_per_epoch
        self.streaming = isinstance(source, IterableDataset)
        common = {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "drop_last": True,
            "pin_memory": pin_memory,
            # A private generator: creating an iterator must not consume the global RNG, whose state is part
            # of the checkpoint (a resumed run creates its iterator at a different point than the original).
            "generator": torch.Generator(),
            "collate_fn": getattr(transform, "collate", None),  # None: torch's default collate
        }
        self.damage = None
        if isinstance(source, ShardStream):
            self.damage = ShardDamage(f"shards:{source.shard_dir}", source.total_samples_listed, source.damaged_at_open)
        if self.streaming:
            self.dataset = StreamViews(source, transform, in_chans, seed, rank)
            self.sampler = None
            self.loader = DataLoader(self.dataset, **common)
        else:
            self.dataset = SeededViews(source, transform, in_chans)
            self.sampler = EpochSampler(len(source), batches_per_epoch * batch_size, seed, rank, world_size)
            self.loader = DataLoader(self.dataset, sampler=self.sampler, persistent_workers=num_workers > 0, **common)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        if self.streaming:
            self.dataset.set_epoch(epoch)
            # Streams cannot seek: consumed batches are read again and dropped.
            return islice(self._observed(iter(self.loader)), skip, self.batches_per_epoch)
        self.sampler.set_epoch(epoch, start=skip * self.loader.batch_size)
        return iter(self.loader)

    def _observed(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches, their ``"damage"`` field taken out into ``self.damage`` (dropped batches included)."""
        for batch in batches:
            if self.damage is not None and "damage" in batch:
                self.damage.observe(batch.pop("damage"))
            yield batch


def build_loader(
    spec: str,
    split: str | None,
    transform: ViewsTransform,
    *,
    batch_size: int,
    batches_per_epoch: int,
    in_chans: int,
    seed: int,
    num_workers: int,
    shuffle_buffer: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> EpochLoader:
    """Open ``spec`` for training; streams are asked for whole batches per DataLoader worker."""
    workers = max(1, num_workers)
    per_rank = math.ceil(batches_per_epoch / workers) * workers * batch_size  # used by streams only
    source = open_source(spec, split, seed=seed, samples_per_epoch=per_rank, shuffle_buffer=shuffle_buffer)
    return EpochLoader(
        source,
        transform,
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        in_chans=in_chans,
        seed=seed,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
    )


def dataset_size(spec: str, split: str | None, world_size: int = 1) -> int:
    """Samples in one pass over ``spec`` (streams: their per-rank share x world size)."""
    source = open_source(spec, split, seed=0, samples_per_epoch=None, shuffle_buffer=1)
    return len(source) * (world_size if isinstance(source, IterableDataset) else 1)
