"""Frozen features, computed once per (backbone, dataset, split, transform) and cached as safetensors.

The cache key hashes the backbone's weights checksum, the dataset spec's content fingerprint, the split, the
transform's ``repr`` and anything else the caller passes (e.g. a corruption); a changed input recomputes. Cached
files hold tensors only (``features`` (N, D) float32, ``labels`` (N,) int64 or (N, K) float32) plus the sample
keys as JSON metadata: nothing is unpickled when reading them back. A file is written as a temp file and renamed:
a full disk removes the temp file and raises ``DiskFull`` (the cached files already there stay valid).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from medfm.data_shards.outputs import disk_full, is_disk_full
from medfm.pretrain import knn
from medfm.pretrain.backbones import feature_function


@dataclass(frozen=True)
class Features:
    """Pooled features of one split: ``features`` (N, D) float32, ``labels`` (N,) int64 or (N, K) float32."""

    features: Tensor
    labels: Tensor
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.features)

    def labeled(self) -> Features:
        """Without unlabeled samples (label -1; shard sets may mix labeled and unlabeled images)."""
        if self.labels.ndim == 2:
            return self
        keep = torch.nonzero(self.labels >= 0).flatten()
        return self if len(keep) == len(self) else self.subset(keep)

    def subset(self, indices: Tensor) -> Features:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Features(self.features[index], self.labels[index], tuple(self.keys[i] for i in index.tolist()))


def collate(batch: list[dict]) -> dict:
    """Stack images; labels as int64 (N,) or float32 (N, K) for multi-label; keys as a list."""
    labels = [b["label"] for b in batch]
    if isinstance(labels[0], Tensor) and labels[0].ndim == 1:
        label_tensor = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in labels])
    else:
        label_tensor = torch.tensor([int(v) for v in labels], dtype=torch.long)
    return {"image": torch.stack([b["image"] for b in batch]), "label": label_tensor, "key": [b["key"] for b in batch]}


def dataset_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    pooling: str = "head",
    layers: int = 4,
) -> Features:
    """(N, D) pooled features of a dataset of ``{"image", "label", "key"}``, in dataset order: timm's pre-logits
    (``pooling="head"``) or the last ``layers`` blocks / stages concatenated (``"layers"``)."""
    backbone.to(device)
    features, labels, keys = knn.extract_features(
        backbone,
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        collate_fn=collate,
        features_of=feature_function(pooling, layers),
    )
    return Features(features, torch.cat(labels), tuple(keys))


def state_checksum(state: dict[str, Tensor], salt: str = "") -> str:
    digest = hashlib.blake2b(salt.encode(), digest_size=16)
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_key(**parts: object) -> str:
    """A stable hash of named parts (checksums, spec fingerprint, split, transform repr, ...)."""
    text = json.dumps({k: str(v) for k, v in sorted(parts.items())}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class FeatureCache:
    """``root/<key>.safetensors`` files of Features; ``root=None`` disables caching."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.safetensors" if self.root is not None else None

    def get_or_compute(self, parts: dict[str, object], compute: Callable[[], Features]) -> Features:
        key = cache_key(**parts)
        path = self.path(key)
        if path is not None and path.is_file():
            self.hits += 1
            return read_features(path)
        self.misses += 1
        features = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_features(features, path, {k: str(v) for k, v in parts.items()})
        return features


def write_features(features: Features, path: Path, description: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    metadata = {"keys": json.dumps(list(features.keys)), "description": json.dumps(description)}
    tensors = {"features": features.features.contiguous(), "labels": features.labels.contiguous()}
    try:
        save_file(tensors, str(tmp), metadata)
        os.replace(tmp, path)
    except Exception as err:  # safetensors reports a full disk as a SafetensorError
        if not is_disk_full(err):
            raise
        raise disk_full(
            f"the feature cache file {path}",
            "the files already cached there are intact",
            "rerun the same command (or point cache_dir at another disk)",
        ) from err
    finally:
        tmp.unlink(missing_ok=True)


def read_features(path: Path) -> Features:
    with safe_open(str(path), framework="pt") as handle:
        keys = tuple(json.loads(handle.metadata()["keys"]))
        return Features(handle.get_tensor("features"), handle.get_tensor("labels"), keys)
