"""Streaming reader of ``medfm shard`` output for training on one or many processes.

Each rank and DataLoader worker reads its own stream; nothing per sample is held in memory (no index),
so memory stays flat however large the shard set is.

Two modes:
- ``resampled=True`` (training): every (rank, worker) draws shards at random with replacement from its own
  seeded RNG and yields exactly its share of ``samples_per_epoch``. All ranks therefore see the same
  number of batches whatever the shard count and sizes: DDP collectives cannot hang on an uneven split.
- ``resampled=False`` (evaluation): one pass, shards split by rank then by worker without overlap.

Integrity, checked as the samples stream (what the writer recorded: each shard's ``count``, ``bytes`` and
``sha256`` in the manifest, each sample's pixel ``sha256`` in its json record):
- every sample's decoded pixels against their sha256 (about the cost of one copy of the pixels);
- every shard read to its end against its listed ``count``: a damaged tar header, which ends a tar stream without
  an error, or a truncated file, shows here;
- one pass: the shard file's bytes and sha256, hashed as they are read (a record edited after writing, e.g. a
  label, shows only here); a local shard's size against ``bytes`` when the set is opened.
What a mismatch does: one pass (evaluation) raises :class:`ShardDamaged` naming the shard (and the sample);
resampled (training) leaves the sample or the rest of the shard out, reports it in each sample's ``"damage"``
field (read by ``medfm.pretrain.data.EpochLoader``: warnings and counts in ``metrics.jsonl``) and raises once what was
left out passes ``DAMAGE_BUDGET`` of the shard set's samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import posixpath
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from medfm.data_shards.codec import content_hash, decode_pixels, label_value, match_channels, pixels_to_tensor
from medfm.data_shards.errors import InputError, MissingInputError, ShardError
from medfm.data_shards.manifest import Manifest, ManifestError

IMAGE_EXTENSIONS = ("png", "npy")
# Training stops once the damaged shards' listed samples plus the rejected samples pass this share of the shard
# set: a few bad shards of thousands cost little, a set that is mostly unreadable trains on something else.
DAMAGE_BUDGET = 0.05
VERIFY_HINT = "`medfm shard inspect --verify DIR` checks every shard"


class ShardDamaged(ShardError):
    """A shard that does not hold what the manifest lists: unreadable tar, fewer or more samples, other bytes."""


class SampleDamaged(ShardDamaged):
    """One sample whose record or pixels do not decode, or whose pixels do not match their sha256."""


@dataclass
class DamageLedger:
    """What a resampled stream left out, by name (each counted once however often it is met again), and the budget.

    total: listed samples of the shard set; shards: damaged shard -> its listed count; samples: rejected
    ``(shard, key)`` of shards not already damaged.
    """

    total: int
    shards: dict[str, int] = field(default_factory=dict)
    samples: set[tuple[str, str]] = field(default_factory=set)

    @property
    def lost(self) -> int:
        return sum(self.shards.values()) + len(self.samples)

    def add(self, event: dict[str, Any]) -> bool:
        """Record ``{"shard", "count", "key", "reason"}`` (``key`` None: the whole shard); False if known."""
        shard = event["shard"]
        if event.get("key") is None:
            if shard in self.shards:
                return False
            self.shards[shard] = int(event["count"])
            self.samples = {s for s in self.samples if s[0] != shard}
            return True
        name = (shard, event["key"])
        if shard in self.shards or name in self.samples:
            return False
        self.samples.add(name)
        return True

    def check(self, where: str, last: str) -> None:
        """ShardDamaged once more than ``DAMAGE_BUDGET`` of the samples are left out."""
        if self.lost > DAMAGE_BUDGET * self.total:
            raise ShardDamaged(
                f"{where}: {len(self.shards)} damaged shard(s) and {len(self.samples)} rejected sample(s) leave out "
                f"{self.lost} of {self.total} samples, more than {DAMAGE_BUDGET:.0%}: stopped (last: {last}); "
                f"{VERIFY_HINT}"
            )


class _HashingReader:
    """A read-only stream that hashes (sha256) and counts the bytes read through it."""

    def __init__(self, raw: Any):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def read_shard(url: str, entry: dict[str, Any], *, whole: bool) -> Iterator[dict[str, Any]]:
    """The samples of one shard, ``{"__key__", "__url__", extension: bytes}``, grouped by key as webdataset does.

    Raises :class:`ShardDamaged` naming the shard when its tar cannot be read, when it ends with another number of
    samples than its manifest ``entry`` lists (a damaged header ends a tar stream silently) and, with ``whole``,
    when its bytes do not match the entry's ``bytes`` and ``sha256`` (hashed while reading: no second read).
    """
    name, listed = url, entry["count"]  # messages name the file (or URL) itself
    try:
        handle = wds.gopen(url)
    except Exception as err:  # gopen raises per scheme (OSError, ValueError, subprocess errors)
        raise ShardDamaged(f"{name}: cannot open {url} ({err})") from None
    source = _HashingReader(handle) if whole else handle
    read, at, sample = 0, 0, None
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            for member in tar:
                at = member.offset
                if not member.isreg():
                    continue
                key, extension = base_plus_ext(member.name)
                if key is None:
                    raise ShardDamaged(f"{name}: member {member.name!r} at byte {at} is not a sample file")
                data = tar.extractfile(member).read()
                tar.members = []  # stream mode keeps every header otherwise
                at = tar.offset
                if sample is not None and key != sample["__key__"]:
                    yield sample
                    read += 1
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                if extension.lower() in sample:
                    raise ShardDamaged(f"{name}: member {member.name!r} at byte {at} appears twice")
                sample[extension.lower()] = data
            if sample is not None:
                yield sample
                read += 1
            at = tar.offset
        if whole:
            source.drain()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ShardDamaged(
            f"{name}: read {read} of {listed} samples listed in the manifest (unreadable at byte {at}: {err})"
        ) from None
    finally:
        with contextlib.suppress(Exception):  # a pipe stopped early exits non-zero: what was read is checked
            handle.close()
    if read != listed:
        raise ShardDamaged(
            f"{name}: read {read} of {listed} samples listed in the manifest (the tar stops at byte {at} of "
            f"{entry['bytes']}: damaged or truncated there)"
        )
    if whole and source.size != entry["bytes"]:
        raise ShardDamaged(f"{name}: {source.size} bytes, the manifest lists {entry['bytes']}")
    if whole and source.digest.hexdigest() != entry["sha256"]:
        raise ShardDamaged(
            f"{name}: its sha256 is not the manifest's (the file changed after it was written, e.g. an edited record)"
        )


def sample_record(raw: dict[str, Any], shard: str) -> dict[str, Any]:
    """A sample's json record; :class:`SampleDamaged` when it is missing or not a JSON object."""
    try:
        record = json.loads(raw["json"])
    except (KeyError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SampleDamaged(f"{shard}: sample {raw['__key__']}: no readable json record ({err})") from None
    if not isinstance(record, dict):
        raise SampleDamaged(f"{shard}: sample {raw['__key__']}: its json record is not an object")
    return record


def sample_pixels(raw: dict[str, Any], record: dict[str, Any], shard: str) -> np.ndarray:
    """A sample's stored pixels, checked against the sha256 of its record (:class:`SampleDamaged` otherwise)."""
    key = raw["__key__"]
    extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if extension is None:
        raise SampleDamaged(f"{shard}: sample {key} has no image (members: {sorted(k for k in raw if k[:2] != '__')})")
    try:
        pixels = decode_pixels(extension, raw[extension])
    except Exception as err:  # any decoder failure on stored bytes is damage (np.load, Pillow, zlib ...)
        raise SampleDamaged(f"{shard}: sample {key}: its .{extension} does not decode ({err})") from None
    if content_hash(pixels) != record.get("sha256"):
        raise SampleDamaged(f"{shard}: sample {key}: its pixels do not match the sha256 of its record")
    return pixels


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
            raise InputError(f"shards:{location}: no shard pattern (*.tar or {{a..b}}) in the pipe command")
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
        raise MissingInputError(f"shards:{location}: cannot read its manifest at {where} ({err})") from None
    return Manifest.parse(text, where)


def open_shard_set(location: str) -> tuple[list[str], Manifest]:
    """(shard URLs in manifest order, manifest) of a local folder or a remote location: a brace pattern
    (``https://host/set/shard-{000000..000099}.tar``, ``pipe:aws s3 cp s3://b/set/shard-{000000..000099}.tar -``)
    or a folder URL (``https://host/set/``), with the manifest beside the shards."""
    manifest = read_manifest_at(location)
    if not manifest.shards:  # a summary without its shard list (Manifest.parse refuses an empty list)
        raise ManifestError(f"{location}: its manifest lists no shard (key 'shards')")
    if not is_remote(location):
        return shard_paths(Path(location), manifest), manifest
    if "{" in location:
        urls = list(wds.shardlists.expand_urls(location))
    elif location.startswith("pipe:"):
        raise InputError(f"shards:{location}: give the shards as a brace pattern, e.g. shard-{{000000..000009}}.tar")
    else:
        urls = [posixpath.join(location, shard["name"]) for shard in manifest.shards]
    names = [shard["name"] for shard in manifest.shards]
    if len(urls) != len(names) or any(name not in url for url, name in zip(urls, names, strict=True)):
        raise InputError(
            f"shards:{location}: the pattern gives {len(urls)} shards, the manifest lists {len(names)} ({names[0]} ... {names[-1]})"
        )
    return urls, manifest


def shard_paths(shard_dir: Path, manifest: Manifest | None = None) -> list[str]:
    """Shard files of a complete shard set, from its manifest (names checked to exist)."""
    if manifest is None:
        manifest = Manifest.read(shard_dir)
    paths = [str(Path(shard_dir) / shard["name"]) for shard in manifest.shards]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise MissingInputError(f"{shard_dir}: shards listed in the manifest are missing: {missing[:3]}")
    return paths


def size_mismatches(paths: list[str], manifest: Manifest) -> dict[str, str]:
    """path -> ``"NAME: N bytes on disk, the manifest lists M"`` for each local shard whose size is not its listed
    ``bytes`` (one ``stat`` per shard: a truncated or replaced file, or an edited manifest, found before anything
    is sized from the manifest)."""
    found = {}
    for path, entry in zip(paths, manifest.shards, strict=True):
        size = os.stat(path).st_size
        if size != entry["bytes"]:
            found[path] = f"{entry['name']}: {size} bytes on disk, the manifest lists {entry['bytes']}"
    return found


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
        self.entries = dict(zip(self.urls, manifest.shards, strict=True))
        # Damage known before reading (local shards of the wrong size): one pass refuses the set, training
        # leaves those shards out (``damaged_at_open``: events for the loader's ledger) within the budget.
        self.damaged_at_open: list[dict[str, Any]] = []
        self.total_samples_listed = manifest.totals["samples"]  # every split: what the damage budget counts
        self._ledger = DamageLedger(self.total_samples_listed)
        self._pending: list[dict[str, Any]] = []
        mismatches = {} if is_remote(self.shard_dir) else size_mismatches(self.urls, manifest)
        if mismatches and not resampled:
            raise ShardDamaged(f"shards:{shard_dir}: {'; '.join(list(mismatches.values())[:3])}; {VERIFY_HINT}")
        for url, reason in mismatches.items():
            entry = self.entries[url]
            self.damaged_at_open.append(
                {"shard": entry["name"], "count": entry["count"], "key": None, "reason": reason}
            )
            self._ledger.add(self.damaged_at_open[-1])
            self._ledger.check(f"shards:{shard_dir}", reason)
        totals = manifest.totals
        self.total_samples = totals["by_split"].get(split, 0) if split else totals["samples"]
        if split and self.total_samples == 0:
            known = sorted(totals["by_split"])
            hint = (
                f"splits: {known}"
                if known
                else "this shard set has no splits: read it whole (split None, data.split=null)"
            )
            raise InputError(f"{shard_dir}: no sample with split {split!r} ({hint})")
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

    def _shard_urls(self, rng: random.Random) -> Iterator[str]:
        rank, world = self.rank_world()
        worker, workers = self._worker()
        if self.resampled:
            while True:
                url = rng.choice(self.urls)
                if self.entries[url]["name"] in self._ledger.shards:  # known damaged: draw again
                    if len(self._ledger.shards) == len(self.urls):
                        raise ShardDamaged(f"shards:{self.shard_dir}: every shard is damaged; {VERIFY_HINT}")
                    continue
                yield url
        else:
            yield from self.urls[rank::world][worker::workers]

    def _raw_samples(self, urls: Iterator[str]) -> Iterator[dict[str, Any]]:
        """Raw samples of the shards in ``urls``; resampled, a damaged shard is recorded and left (see module)."""
        for url in urls:
            entry = self.entries[url]
            try:
                yield from read_shard(url, entry, whole=not self.resampled)
            except ShardDamaged as err:
                if not self.resampled:
                    raise
                self._reject({"shard": entry["name"], "count": entry["count"], "key": None, "reason": str(err)})

    def _reject(self, event: dict[str, Any]) -> None:
        """Resampled: record a damaged shard or sample for the loader (once per worker) and apply the budget."""
        if self._ledger.add(event):
            self._pending.append(event)
            self._ledger.check(f"shards:{self.shard_dir}", event["reason"])

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        shard = raw["__url__"]
        record = sample_record(raw, shard)
        if self.split is not None and record.get("split") != self.split:
            return None
        image = match_channels(pixels_to_tensor(sample_pixels(raw, record, shard)), self.channels)
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
        self._pending = []
        stream = self._raw_samples(self._shard_urls(rng))
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
            try:
                sample = self._decode(raw)
            except SampleDamaged as err:
                if not self.resampled:
                    raise
                shard = self.entries[raw["__url__"]]["name"]
                self._reject({"shard": shard, "count": 1, "key": raw["__key__"], "reason": str(err)})
                continue
            if sample is None:
                continue
            if self.resampled:
                # What this worker has left out since its last sample, for the loader's ledger (usually "").
                sample["damage"] = json.dumps(self._pending) if self._pending else ""
                self._pending = []
            yield sample
            produced += 1
            if quota is not None and produced >= quota:
                return
