"""Streaming reader of ``medfm shard`` output for training on one or many processes.

Each rank and DataLoader worker reads its own stream; nothing per sample is held in memory (no index),
so memory stays flat however large the shard set is.

Two modes:
- ``resampled=True`` (training): every (rank, worker) draws shards at random with replacement from its own
  seeded RNG and yields exactly its share of ``samples_per_epoch``. All ranks therefore see the same
  number of batches whatever the shard count and sizes: DDP collectives cannot hang on an uneven split.
- ``resampled=False`` (evaluation): one pass, shards split by rank then by worker without overlap.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_shards.codec import decode_pixels, label_value, match_channels, pixels_to_tensor
from data_shards.manifest import Manifest

IMAGE_EXTENSIONS = ("png", "npy")


def is_remote(location: str) -> bool:
    """A shard location webdataset opens rather than a local folder: a URL, a ``pipe:`` command or a brace pattern."""
    return location.startswith("pipe:") or "://" in location or "{" in location


def beside(location: str, name: str) -> str:
    """The file ``name`` in the folder of a shard pattern: ``https://h/s/shard-{0..9}.tar`` -> ``https://h/s/NAME``;
    for ``pipe:CMD`` the argument holding the pattern (or the last ``.tar`` argument) is replaced the same way."""
    if location.startswith("pipe:"):
        words = location[len("pipe:") :].split(" ")
        at = next((i for i in reversed(range(len(words))) if "{" in words[i] or words[i].endswith(".tar")), None)
        if at is None:
            raise ValueError(f"shards:{location}: no shard pattern (*.tar or {{a..b}}) in the pipe command")
        words[at] = posixpath.join(posixpath.dirname(words[at]), name)
        return "pipe:" + " ".join(words)
    if "{" in location or location.endswith(".tar"):
        return posixpath.join(posixpath.dirname(location), name)
    return posixpath.join(location, name)  # a folder URL


def read_manifest_at(location: str) -> Manifest:
    """The manifest of a shard set: ``manifest.json`` of a local folder, or beside a remote pattern (read with
    webdataset's ``gopen``: files, http(s) through curl, ``pipe:`` commands)."""
    if not is_remote(location):
        return Manifest.read(location)
    where = beside(location, "manifest.json")
    try:
        with wds.gopen(where) as handle:
            text = handle.read().decode()
    except Exception as err:  # gopen raises per scheme (IOError, ValueError, subprocess errors)
        raise FileNotFoundError(f"shards:{location}: cannot read its manifest at {where} ({err})") from None
    return Manifest.parse(text, where)


def open_shard_set(location: str) -> tuple[list[str], Manifest]:
    """(shard URLs in manifest order, manifest) of a local folder or a remote location: a brace pattern
    (``https://host/set/shard-{000000..000099}.tar``, ``pipe:aws s3 cp s3://b/set/shard-{000000..000099}.tar -``)
    or a folder URL (``https://host/set/``), with the manifest beside the shards."""
    manifest = read_manifest_at(location)
    if not is_remote(location):
        return shard_paths(Path(location), manifest), manifest
    if "{" in location:
        urls = list(wds.shardlists.expand_urls(location))
    elif location.startswith("pipe:"):
        raise ValueError(f"shards:{location}: give the shards as a brace pattern, e.g. shard-{{000000..000009}}.tar")
    else:
        urls = [posixpath.join(location, shard["name"]) for shard in manifest.shards]
    names = [shard["name"] for shard in manifest.shards]
    if len(urls) != len(names) or any(name not in url for url, name in zip(urls, names, strict=True)):
        raise ValueError(f"shards:{location}: the pattern gives {len(urls)} shards, the manifest lists {len(names)} ({names[0]} ... {names[-1]})")  # fmt: skip
    return urls, manifest


def shard_paths(shard_dir: Path, manifest: Manifest | None = None) -> list[str]:
    """Shard files of a complete shard set, from its manifest (names checked to exist)."""
    if manifest is None:
        manifest = Manifest.read(shard_dir)
    paths = [str(Path(shard_dir) / shard["name"]) for shard in manifest.shards]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{shard_dir}: shards listed in the manifest are missing: {missing[:3]}")
    return paths


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """Iterable dataset of ``{"image", "label", "key"}`` (plus ``"meta"`` with ``with_meta=True``).

    image: ``transform(x)`` where x is a float32 tensor (C, H, W) in [0, 1] with ``channels`` channels.
    label: int (-1 when unlabeled) or a float tensor of 0/1 for multi-label data.
    samples_per_epoch: samples each rank yields per epoch in resampled mode (default: the shard set's
        total divided by the world size).
    split: keep only samples whose metadata split equals this (e.g. "train" of a sharded MedMNIST file).
    """

    def __init__(
        self,
        shard_dir: str | Path,
        transform: Callable[[torch.Tensor], Any] | None = None,
        *,
        samples_per_epoch: int | None = None,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        channels: int | None = None,
        split: str | None = None,
        with_meta: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.shard_dir = str(shard_dir)
        self.urls, manifest = open_shard_set(self.shard_dir)
        totals = manifest.totals
        self.total_samples = totals["by_split"].get(split, 0) if split else totals["samples"]
        if split and self.total_samples == 0:
            known = sorted(totals["by_split"])
            hint = (
                f"splits: {known}"
                if known
                else "this shard set has no splits: read it whole (split None, data.split=null)"
            )
            raise ValueError(f"{shard_dir}: no sample with split {split!r} ({hint})")
        self.transform = transform
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.channels = channels
        self.split = split
        self.with_meta = with_meta
        # DataLoader workers are separate processes without the process group: resolve the rank here, in
        # the process that owns the group, when the caller did not pass it (launchers also set RANK).
        if (
            rank is None
            and world_size is None
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self._rank, self._world = rank, world_size
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the shard draw and shuffle order are a function of (seed, epoch, rank, worker)."""
        self.epoch = epoch

    def rank_world(self) -> tuple[int, int]:
        rank, world = distributed_rank_world()
        return (
            self._rank if self._rank is not None else rank,
            self._world if self._world is not None else world,
        )

    def __len__(self) -> int:
        """Samples this rank yields per epoch (resampled), or an upper bound of it (one pass)."""
        _, world = self.rank_world()
        if self.resampled:
            return self.samples_per_epoch or math.ceil(self.total_samples / world)
        return math.ceil(self.total_samples / world)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shard_urls(self, rng: random.Random) -> Iterator[dict[str, str]]:
        rank, world = self.rank_world()
        worker, workers = self._worker()
        if self.resampled:
            while True:
                yield {"url": rng.choice(self.urls)}
        else:
            for url in self.urls[rank::world][worker::workers]:
                yield {"url": url}

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        record = json.loads(raw["json"])
        if self.split is not None and record.get("split") != self.split:
            return None
        extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if extension is None:
            raise ValueError(f"sample {raw['__key__']} in {raw.get('__url__')} has no image (keys: {sorted(raw)})")
        image = match_channels(pixels_to_tensor(decode_pixels(extension, raw[extension])), self.channels)
        sample = {
            "image": self.transform(image) if self.transform is not None else image,
            "label": label_value(record.get("label")),
            "key": raw["__key__"],
        }
        if self.with_meta:
            sample["meta"] = record
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _ = self.rank_world()
        worker, workers = self._worker()
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
        stream = wds.tarfile_to_samples()(self._shard_urls(rng))
        if self.shuffle_buffer > 1:
            stream = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(stream)
        quota = None
        if self.resampled:
            per_rank = len(self)
            quota = per_rank // workers + (1 if worker < per_rank % workers else 0)
            if quota == 0:
                return
        produced = 0
        for raw in stream:
            sample = self._decode(raw)
            if sample is None:
                continue
            yield sample
            produced += 1
            if quota is not None and produced >= quota:
                return
