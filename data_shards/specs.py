"""Dataset specs: one string names a dataset, training code sees a torch dataset of dicts.

Specs: ``shards:DIR`` (a shard set written by ``medfm shard``), ``medmnist:FILE.npz``,
``imagefolder:DIR``, ``csv:FILE``. Every dataset yields ``{"image": ..., "label": ..., "key": str}``
where ``image`` is the transform's output (default: float32 tensor (C, H, W) in [0, 1]) and ``label`` is
an int (-1 when unlabeled) or a float tensor of 0/1 for multi-label sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from medfm.data_shards.codec import UNLABELED, label_value, match_channels, pixels_to_tensor
from medfm.data_shards.errors import ConfigError, InputError, MissingInputError
from medfm.data_shards.manifest import Manifest
from medfm.data_shards.records import ReadOptions, SkipInput
from medfm.data_shards.stream import ShardStream, is_remote

SPEC_KINDS = ("shards", "medmnist", "imagefolder", "csv")


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    path: Path | str  # a str only for remote shards (a URL, a pipe: command or a brace pattern)

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def parse_spec(spec: str) -> DatasetSpec:
    """Parse ``KIND:PATH``; a bare directory holding ``manifest.json`` is read as ``shards:``."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SPEC_KINDS:
        path = Path(spec)
        if Manifest.exists(path):
            return DatasetSpec("shards", path)
        if path.suffix == ".npz":
            return DatasetSpec("medmnist", path)
        raise ConfigError(f"dataset spec {spec!r}: expected one of {', '.join(k + ':PATH' for k in SPEC_KINDS)}")
    if kind == "shards" and is_remote(rest):  # URL, pipe: command or brace pattern: webdataset opens it
        return DatasetSpec(kind, rest)
    path = Path(rest).expanduser()
    if not path.exists():
        raise MissingInputError(f"dataset spec {spec!r}: {path} does not exist")
    return DatasetSpec(kind, path)


class MedMNISTDataset(Dataset):
    """One split of a MedMNIST-style ``.npz`` held in memory (these files are small by design)."""

    def __init__(
        self, path: Path, split: str = "train", transform: Callable | None = None, channels: int | None = None
    ):
        with np.load(path) as archive:
            key = f"{split}_images"
            if key not in archive:
                raise InputError(f"{path}: no {key!r} array (has {', '.join(archive.files)})")
            self.images = archive[key]
            self.labels = archive.get(f"{split}_labels")
        self.split = split
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = match_channels(pixels_to_tensor(self.images[index]), self.channels)
        label = label_value(self.labels[index]) if self.labels is not None else UNLABELED
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": label, "key": f"{self.split}-{index:06d}"}


class UnitImageDataset(Dataset):
    """Map-style dataset over single-image input units (image files, single-frame DICOM) with labels."""

    def __init__(
        self,
        units: list,
        transform: Callable | None = None,
        channels: int | None = None,
        options: ReadOptions | None = None,
    ):
        self.units = units
        self.transform = transform
        self.channels = channels
        self.options = options or ReadOptions()

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> dict[str, Any]:
        unit = self.units[index]
        try:
            record = next(iter(unit.read(self.options)))
        except SkipInput as skip:
            raise InputError(f"{unit.source}: {skip.reason}") from None
        image = match_channels(pixels_to_tensor(record.pixels), self.channels)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": label_value(record.label), "key": unit.source}


def open_dataset(
    spec: str,
    split: str | None = None,
    transform: Callable | None = None,
    *,
    seed: int = 0,
    samples_per_epoch: int | None = None,
    shuffle_buffer: int = 1000,
    channels: int | None = None,
    resampled: bool = True,
) -> Dataset:
    """Open a dataset spec (see the module docstring) as a torch dataset of dicts.

    ``shards:`` gives a :class:`~medfm.data_shards.stream.ShardStream` (resampled with a fixed epoch length for
    training, or one exact pass with ``resampled=False``); the others are map-style datasets. ``split``
    selects train/val/test where the source defines splits (MedMNIST defaults to train).
    """
    parsed = parse_spec(spec)
    if parsed.kind == "shards":
        return ShardStream(
            parsed.path,
            transform,
            samples_per_epoch=samples_per_epoch,
            resampled=resampled,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            channels=channels,
            split=split,
        )
    if parsed.kind == "medmnist":
        return MedMNISTDataset(parsed.path, split or "train", transform, channels)
    from medfm.data_shards.images import csv_units, imagefolder_units

    units = imagefolder_units(parsed.path) if parsed.kind == "imagefolder" else csv_units(parsed.path)
    if split is not None:
        units = [u for u in units if getattr(u, "split", None) == split]
        if not units:
            raise InputError(f"dataset {spec!r} has no {split!r} split")
    return UnitImageDataset(units, transform, channels)
