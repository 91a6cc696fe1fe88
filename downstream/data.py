"""Labeled splits of a dataset spec, the task they define, and the deterministic eval transform.

``open_split(spec, split)`` gives a dataset of ``{"image", "label", "key"}`` for train / val / test:

- ``medmnist:FILE.npz``: the file's own splits.
- ``imagefolder:DIR``: ``DIR/{train,val,test}/CLASS/*`` folders; a missing ``val`` is carved out of ``train``
  (stratified ``val_fraction``), a tree without split folders is split by ``val_fraction`` / ``test_fraction``.
- ``csv:FILE``: a ``split`` column (train / val / test) when present, otherwise split by fractions like a flat
  image folder. One label column -> single-label, several 0/1 columns -> multi-label.
- ``shards:DIR``: samples whose metadata split matches, one exact pass (``resampled=False``).

Splits made by fractions are stratified and depend only on (labels, seed): every protocol sees the same ones.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, IterableDataset, Subset

from medfm.data_shards.errors import ConfigError, InputError
from medfm.data_shards.images import (
    CSV_PATH_COLUMNS,
    CSV_SITE_COLUMN,
    CSV_SPLIT_COLUMN,
    ImageFile,
    csv_rows,
    scan_imagefolder,
)
from medfm.data_shards.records import ReadOptions, SkipInput
from medfm.data_shards.specs import MedMNISTDataset, UnitImageDataset, open_dataset, parse_spec
from medfm.data_shards.stream import read_manifest_at

SPLITS = ("train", "val", "test")
_SHOWN = 5  # files / classes named in one message


class LabelError(InputError):
    """Labels that do not define the task they seem to: a split with fewer than 2 classes, a class without any
    sample (the message names the dataset, split and classes)."""


class UnreadableInputs(InputError):
    """Files of a labeled split that are missing or cannot be read (the message names the CSV lines or files)."""


@dataclass(frozen=True)
class Task:
    """What the labels ask for. binary / multiclass: int labels in [0, C); multilabel: (K,) 0/1 floats."""

    kind: str  # "binary" | "multiclass" | "multilabel"
    class_names: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        """Classifier width: C logits (softmax; 2 for binary, as in MedMNIST) or K logits (sigmoid)."""
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"


class EvalTransform(nn.Module):
    """Deterministic eval input: optional corruption in [0, 1] -> resize to ``size`` -> normalise.

    Its ``repr`` names every parameter: it is part of the feature-cache key.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        corruption: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.size, self.mean, self.std, self.corruption = size, list(mean), list(std), corruption

    def forward(self, image: Tensor) -> Tensor:
        """(C, H, W) float in [0, 1] -> (C, size, size), normalised."""
        if self.corruption is not None:
            image = self.corruption(image)
        if tuple(image.shape[-2:]) != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        channels = image.shape[0]
        mean = torch.tensor(self.mean * channels if len(self.mean) == 1 else self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std * channels if len(self.std) == 1 else self.std).view(-1, 1, 1)
        return (image - mean) / std

    def extra_repr(self) -> str:
        return f"size={self.size}, mean={self.mean}, std={self.std}, corruption={self.corruption!r}"


def stratified_split(labels: Sequence[Any], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Index arrays, one per fraction (the rest goes to the last group), stratified by label (the first
    positive label for multi-label rows); at least one sample per non-empty group and class where possible.

    The groups are taken in turn, each a :func:`stratified_take` of what the earlier ones left. Sorted,
    deterministic in (labels, fractions, seed).
    """
    strata = np.array([str(_strata(label)) for label in labels])  # str: int, -1 and numpy keys compare alike
    rest, left = np.arange(len(strata)), 1.0
    groups = []
    for group, fraction in enumerate(fractions):
        taken = stratified_take(strata[rest], fraction / left if left > 0 else 0.0, seed + group)
        groups.append(rest[taken])
        rest, left = rest[~taken], left - fraction
    return [np.sort(g).astype(np.int64) for g in [*groups, rest]]


def stratified_take(strata: np.ndarray, share: float, seed: int, *, leave: int = 1) -> np.ndarray:
    """(N,) bool mask of a random ``share`` of the samples, stratified by ``strata`` (N,), deterministic in seed.

    sklearn's ``train_test_split(stratify=...)`` (StratifiedShuffleSplit) draws the split. It cannot express three
    of our guarantees, so around it: (1) it refuses a class of one sample: such a sample is taken when
    ``share > 0.5`` (what rounding its share gives); (2) it needs as many samples as classes on each side: the
    requested size is clipped into that range; (3) its proportional allocation can give a rare class nothing: a
    class left out gets one member moved in, where that leaves at least ``leave`` members out (1: a split never
    takes a class's last sample from the groups after it; 0: every class is represented).
    """
    strata = np.asarray(strata)
    taken = np.zeros(len(strata), dtype=bool)
    if share <= 0 or share >= 1:
        taken[:] = share >= 1
        return taken
    _, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    pooled = np.flatnonzero(counts[inverse] > 1)
    rest = np.flatnonzero(counts[inverse] == 1)
    if len(pooled):
        classes = int((counts > 1).sum())
        size = min(max(round(share * len(pooled)), classes), len(pooled) - classes)
        chosen, rest_pooled = train_test_split(pooled, train_size=size, stratify=strata[pooled], random_state=seed)
        taken[chosen] = True
        rest = np.concatenate([rest_pooled, rest])  # in sklearn's shuffled order: the first left out moves in
    taken[counts[inverse] == 1] = share > 0.5
    for c in np.flatnonzero(np.bincount(inverse[taken], minlength=len(counts)) == 0):
        out = rest[inverse[rest] == c]
        if len(out) > leave:
            taken[out[0]] = True
    return taken


def _strata(label: Any) -> Any:
    if isinstance(label, (tuple, list, np.ndarray, Tensor)):
        values = list(np.asarray(label).reshape(-1))
        return int(np.argmax(values)) if any(values) else -1
    return label


def _unit_label(unit: Any) -> Any:
    return -1 if unit.label is None else unit.label


@dataclass(frozen=True)
class SplitPlan:
    units: list
    indices: dict[str, np.ndarray]  # split -> indices into units
    origin: str  # how the splits were made (for the results JSON)
    where: list[str]  # per unit, where it is listed (for messages): "FILE.csv:LINE", or the folder's file


def _spec_units(spec: str) -> tuple[list, list[str | None], list[str]]:
    """(units, given split per unit, where each unit is listed) of an ``imagefolder:`` or ``csv:`` spec; an image
    folder's class folders without an image are named in a warning (they are left out of the classes)."""
    parsed = parse_spec(spec)
    if parsed.kind == "imagefolder":
        tree = scan_imagefolder(parsed.path)
        if tree.empty_class_folders:
            names = ", ".join(tree.empty_class_folders)
            _warn_once(f"{spec}: class folders without an image, left out of the classes: {names}")
        return tree.units, [u.split for u in tree.units], [str(u.path) for u in tree.units]
    if parsed.kind == "csv":
        rows = csv_rows(parsed.path)
        return [r.unit for r in rows], [r.split for r in rows], [f"{parsed.path}:{r.line}" for r in rows]
    raise ConfigError(f"dataset spec {spec!r}: split planning is for imagefolder: and csv: specs")


@functools.cache
def _warn_once(message: str) -> None:
    """``warning: MESSAGE`` on stderr, once per process however often a spec is read (each split, each init)."""
    print(f"warning: {message}", file=sys.stderr)


def plan_unit_splits(spec: str, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> SplitPlan:
    """train / val / test indices over the units of an ``imagefolder:`` or ``csv:`` spec."""
    units, given, where = _spec_units(spec)
    labels = [_unit_label(u) for u in units]
    present = {s for s in given if s is not None}
    if not present:
        train, val, test = stratified_split(labels, [1 - val_fraction - test_fraction, val_fraction], seed)
        return SplitPlan(
            units,
            {"train": train, "val": val, "test": test},
            f"stratified {val_fraction}/{test_fraction} (seed {seed})",
            where,
        )
    indices = {s: np.array([i for i, g in enumerate(given) if g == s], dtype=np.int64) for s in SPLITS}
    origin = "given"
    if not len(indices["val"]) and len(indices["train"]):
        train_labels = [labels[i] for i in indices["train"]]
        keep, val = stratified_split(train_labels, [1 - val_fraction], seed)
        indices["val"], indices["train"] = indices["train"][val], indices["train"][keep]
        origin = f"given; val = stratified {val_fraction} of train (seed {seed})"
    return SplitPlan(units, indices, origin, where)


def open_split(
    spec: str,
    split: str,
    transform: Callable | None = None,
    *,
    channels: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """One labeled split of a spec (see the module docstring); unlabeled samples are dropped. The files of an
    ``imagefolder:`` / ``csv:`` split are checked first (they exist; image headers within Pillow's and medfm's
    pixel budgets): an UnreadableInputs names them, before any model or loader worker sees them."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    kind = parse_spec(spec).kind
    if kind == "shards":
        return open_dataset(spec, split, transform, channels=channels, resampled=False, shuffle_buffer=0)
    if kind == "medmnist":
        dataset = MedMNISTDataset(parse_spec(spec).path, split, transform, channels)
        labels = dataset.labels
        if labels is None:
            raise InputError(f"{spec}: no {split}_labels array")
        labeled = np.flatnonzero(labels.reshape(len(labels), -1).min(axis=1) >= 0)
        return dataset if len(labeled) == len(dataset) else Subset(dataset, labeled.tolist())
    plan = plan_unit_splits(spec, val_fraction, test_fraction, seed)
    chosen = [i for i in plan.indices[split] if _unit_label(plan.units[i]) != -1]
    if not chosen:
        raise LabelError(f"dataset {spec!r}: the {split!r} split has no labeled sample")
    check_readable([plan.units[i] for i in chosen], [plan.where[i] for i in chosen], spec)
    return UnitImageDataset([plan.units[i] for i in chosen], transform, channels)


def check_readable(units: Sequence[Any], where: Sequence[str], spec: str) -> None:
    """UnreadableInputs naming the first units (by CSV line / file) that are missing, or images whose header is
    not an image or declares more pixels than Pillow's decompression-bomb guard or ``ReadOptions.max_pixels``.

    Checked here, in the main process, because the same failure inside a DataLoader worker reaches the user as a
    worker traceback; only headers are read (the images are decoded later, once)."""
    options = ReadOptions()
    problems = []
    for unit, place in zip(units, where, strict=True):
        paths = [Path(p) for p in getattr(unit, "paths", [getattr(unit, "path", None)]) if p is not None]
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            problems.append(f"{place}: no such file {missing}")
        elif isinstance(unit, ImageFile):
            try:
                unit.check_header(options)
            except SkipInput as skip:
                problems.append(f"{place}: {skip.reason}")
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise UnreadableInputs(f"{spec}: {len(problems)} unreadable file(s){more}: " + "; ".join(problems[:_SHOWN]))


def split_labels(dataset: Dataset) -> list[Any] | None:
    """Labels without decoding images, where the dataset allows it (None for streams)."""
    if isinstance(dataset, Subset):
        inner = split_labels(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, MedMNISTDataset):
        labels = dataset.labels.reshape(len(dataset.labels), -1)
        return [int(row[0]) if row.shape[0] == 1 else tuple(int(v) for v in row) for row in labels]
    if isinstance(dataset, UnitImageDataset):
        return [_unit_label(u) for u in dataset.units]
    if isinstance(dataset, IterableDataset):
        return None
    return [dataset[i]["label"] for i in range(len(dataset))]


def infer_task(labels: Sequence[Any], class_names: Sequence[str] | None = None) -> Task:
    """binary / multiclass from int labels (classes 0..max), multilabel from 0/1 vectors."""
    first = labels[0]
    if isinstance(first, (tuple, list, np.ndarray, Tensor)) and len(np.asarray(first).reshape(-1)) > 1:
        width = len(np.asarray(first).reshape(-1))
        names = tuple(class_names) if class_names and len(class_names) == width else tuple(str(i) for i in range(width))
        return Task("multilabel", names)
    count = max(int(np.asarray(v).reshape(-1)[0]) for v in labels) + 1
    if class_names and len(class_names) >= count:
        names = tuple(class_names)
    else:
        names = tuple(str(i) for i in range(max(count, 2)))
    return Task("binary" if len(names) == 2 else "multiclass", names)


def checked_task(spec: str, labels_by_split: dict[str, Sequence[Any]], class_names: Sequence[str] | None) -> Task:
    """The task the labels of every split define (:func:`infer_task`), refused when it is not what they seem:
    a single-label split (each split trains, selects or tests a classifier) with fewer than 2 classes, or a
    class without a sample in any split (a phantom output: labels 0 and 2 make class 1). Raises LabelError
    naming the spec, the split and the classes found."""
    labels = [label for split_labels_ in labels_by_split.values() for label in split_labels_]
    if not labels:
        raise LabelError(f"dataset {spec!r}: no labeled sample in any split")
    task = infer_task(labels, class_names)
    if task.multilabel:
        return task
    counts = {
        split: Counter(int(np.asarray(v).reshape(-1)[0]) for v in values) for split, values in labels_by_split.items()
    }

    def name(c: int) -> str:
        return repr(task.class_names[c] if 0 <= c < len(task.class_names) else str(c))

    for split, classes in counts.items():
        if len(classes) < 2:
            found = next((f"only class {name(c)} ({n} samples)" for c, n in classes.items()), "no labeled sample")
            raise LabelError(
                f"dataset {spec!r}: the {split!r} split has {found}; a classifier needs at least 2 classes in each "
                "of train, val and test"
            )
    present = set().union(*counts.values())
    phantom = [name(c) for c in range(task.num_outputs) if c not in present]
    if phantom:
        raise LabelError(
            f"dataset {spec!r}: class {', '.join(phantom[:_SHOWN])} of {list(task.class_names)} has no sample in "
            "any split (a phantom output); class indices must be contiguous 0..C-1"
        )
    return task


def split_label_lists(
    spec: str, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[Any]] | None:
    """The labels of each split without reading an image (None for a shard set: only a pass over it tells)."""
    kind = parse_spec(spec).kind
    if kind == "shards":
        return None
    if kind == "medmnist":
        with np.load(parse_spec(spec).path) as archive:
            arrays = {s: archive.get(f"{s}_labels") for s in SPLITS}
        if any(a is None for a in arrays.values()):
            missing = [f"{s}_labels" for s, a in arrays.items() if a is None]
            raise InputError(f"{spec}: no {', '.join(missing)} array")
        rows = {s: a.reshape(len(a), -1) for s, a in arrays.items()}
        return {
            s: [int(r[0]) if len(r) == 1 else tuple(int(v) for v in r) for r in a if r.min() >= 0]
            for s, a in rows.items()
        }
    plan = plan_unit_splits(spec, val_fraction, test_fraction, seed)
    return {s: [label for i in plan.indices[s] if (label := _unit_label(plan.units[i])) != -1] for s in SPLITS}


def class_names_of(spec: str) -> list[str] | None:
    """Class names a spec records: image-folder class folders, CSV label columns / values, manifest classes."""
    parsed = parse_spec(spec)
    if parsed.kind == "imagefolder":
        units = scan_imagefolder(parsed.path).units
        names = {u.label: u.class_name for u in units}
        return [names[i] for i in sorted(names)]
    if parsed.kind == "csv":
        with open(parsed.path, newline="", encoding="utf-8-sig") as handle:
            columns = next(csv.reader(handle), [])
        labels = [c for c in columns if c.strip().lower() not in (*CSV_PATH_COLUMNS, CSV_SPLIT_COLUMN, CSV_SITE_COLUMN)]
        if len(labels) > 1:
            return labels
        units = [row.unit for row in csv_rows(parsed.path)]
        names = {u.label: getattr(u, "class_name", None) for u in units}
        if all(names.values()):
            return [names[i] for i in sorted(names)]
    if parsed.kind == "shards":
        return read_manifest_at(str(parsed.path)).class_names() or None
    return None


def dataset_fingerprint(spec: str) -> str:
    """Identity of a spec's content for cache keys: path plus size and mtime of its files (remote shards: the
    manifest, which holds every shard's sha256)."""
    parsed = parse_spec(spec)
    if isinstance(parsed.path, str):
        manifest = read_manifest_at(parsed.path)
        return hashlib.blake2b(json.dumps(manifest.shards, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = parsed.path.resolve()
    digest = hashlib.blake2b(str(path).encode(), digest_size=16)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = os.stat(file)
        digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
