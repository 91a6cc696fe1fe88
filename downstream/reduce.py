"""``medfm shard reduce SHARDS --model SRC --keep FRACTION --out DIR``: a smaller pretraining pool without the
redundant images, chosen on a backbone's embeddings.

After "Less is More" (medical SSL on a reduced pool: higher downstream AUC, up to 9x faster pretraining), which
compared deep-embedding, information-theoretic and hashing reductions; medfm's shard-time dedup covers exact and
perceptual-hash duplicates, this covers images that are different pixels but the same content to a backbone.

``kcenter`` (default), cluster-balanced k-center greedy on L2-normalised embeddings:

1. embed every sample with the backbone (any ``model.init`` source: a medfm release or run, a timm hub snapshot,
   ``hf-hub:`` from the local cache, a weights file), streaming, into a float32 file on disk; the embeddings are
   centred on their mean before L2 normalisation (pooled features share a large common direction, which would
   make every cosine similarity ~1 and hide what tells images apart);
2. mini-batch k-means (scikit-learn's ``MiniBatchKMeans``, fitted chunk by chunk) into ``ceil(sqrt(N))`` clusters;
3. within each cluster, k-center greedy to the end (start at the image nearest the centroid, then repeatedly the
   image farthest from everything picked), which orders the cluster's images by how much each adds: its cosine
   distance to the nearest image picked before it;
4. the images with the largest such gain over all clusters are kept (one coverage radius for the whole set): a
   near-copy of a kept image adds ~0 and goes first, an isolated image (rare content) stays, and each cluster
   keeps a prefix of its order. What is dropped lies closest to a kept image.

``random`` keeps a seeded uniform sample of the same size (the comparison a reduction must beat).

Memory stays flat in the number of images: the embeddings live in a file, k-means sees one chunk at a time, and
k-center works one cluster at a time (about ``sqrt(N)`` images; O(N sqrt(N) D) in all). The output is a new shard set (samples copied
byte for byte in source order, keys renumbered); its ``manifest.json`` records the reduction, and
``dropped.jsonl`` (named and hashed in the manifest) has one ``{"key", "source", "reason"}`` per dropped sample:
the kept sample it is nearest to and their cosine similarity.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medfm.data_shards.codec import file_sha256, match_channels, pixels_to_tensor
from medfm.data_shards.errors import ConfigError, InputError
from medfm.data_shards.manifest import FORMAT, MANIFEST, Manifest
from medfm.data_shards.merge import SampleSink
from medfm.data_shards.outputs import LOCK_NAME, lock_folder
from medfm.data_shards.stream import open_shard_set, read_shard, sample_pixels, sample_record
from medfm.downstream.data import EvalTransform
from medfm.downstream.load import load_backbone
from medfm.pretrain.backbones import pooled_features
from medfm.pretrain.knn import feature_autocast
from medfm.pretrain.weights import read_init

METHODS = ("kcenter", "random")
INHERITED_TOTALS = ("inputs_planned", "inputs_read", "inputs_skipped", "duplicates_exact", "duplicates_near")
DROPPED_NAME = "dropped.jsonl"
_EMBEDDINGS = ".reduce_embeddings.npy"  # scratch, removed when the reduction is written


@dataclass(frozen=True)
class Embedded:
    """What the embedding pass gives: the (N, D) float32 memmap of pooled embeddings, their mean (D,) and, per row,
    the sample's key and its ``source`` metadata (for the dropped list)."""

    vectors: np.memmap
    mean: np.ndarray
    keys: list[str]
    sources: list[str]

    def unit(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) centred and L2-normalised, float32."""
        return self.units(np.arange(start, min(stop, len(self.vectors))))

    def units(self, rows: np.ndarray) -> np.ndarray:
        centred = np.asarray(self.vectors[rows], dtype=np.float32) - self.mean
        return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def reduce_shards(
    shard_dir: str | Path,
    out: str | Path,
    *,
    model: str,
    keep: float,
    method: str = "kcenter",
    architecture: str | None = None,
    img_size: int | None = None,
    batch_size: int = 256,
    clusters: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    command: str = "",
) -> Manifest:
    """Write the reduced shard set into ``out`` (see the module docstring); returns its manifest."""
    if not 0 < keep < 1:
        raise ConfigError(f"--keep must be a fraction in (0, 1), got {keep}")
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {method!r}")
    out = Path(out)
    with lock_folder(out, "medfm shard reduce") as lock:
        if lock.warning:
            print(f"medfm shard reduce: warning: {lock.warning}", file=sys.stderr)
        _clear(out, overwrite)
        urls, manifest = open_shard_set(str(shard_dir))
        count = int(manifest.totals["samples"])
        target = max(1, round(keep * count))
        embedded = embed_shards(urls, manifest, out / _EMBEDDINGS, model, architecture, img_size, batch_size)
        try:
            if method == "random":
                kept = np.sort(np.random.default_rng(seed).choice(count, target, replace=False))
                reasons = {int(i): "random subset (--method random)" for i in np.setdiff1d(np.arange(count), kept)}
                chosen_clusters = 0
            else:
                chosen_clusters = clusters or math.ceil(math.sqrt(count))
                kept, reasons = cluster_kcenter(embedded, target, chosen_clusters, seed)
        finally:
            (out / _EMBEDDINGS).unlink(missing_ok=True)  # the open memmap stays readable until it is dropped
        reduction = {
            "from": str(shard_dir),
            "model": model,
            "method": method,
            "keep": keep,
            "samples_before": count,
            "kept": len(kept),
            "dropped": count - len(kept),
            "clusters": chosen_clusters,
            "seed": seed,
        }
        return write_reduced(urls, manifest, out, set(kept.tolist()), reasons, embedded, reduction, command)


def _clear(out: Path, overwrite: bool) -> None:
    if any(path.name != LOCK_NAME for path in out.iterdir()):
        if not overwrite:
            raise InputError(f"{out} is not empty; choose an empty folder or pass --overwrite")
        for path in [*out.glob("shard-*.tar*"), out / MANIFEST, out / DROPPED_NAME, out / _EMBEDDINGS]:
            path.unlink(missing_ok=True)


def embed_shards(
    urls: list[str],
    manifest: Manifest,
    scratch: Path,
    model: str,
    architecture: str | None,
    img_size: int | None,
    batch_size: int,
) -> Embedded:
    """One pass over the shard set: each sample's pooled embedding into a float32 memmap at ``scratch`` (rows in
    shard order), their mean, and each sample's key and source."""
    weights = read_init(model, architecture or "", key="--model")
    if not weights.architecture:
        raise ConfigError(f"--model {model}: a bare weights file needs --architecture (a timm model name)")
    init = "release" if weights.info else "baseline"  # a medfm release loads strictly, others as a warm start
    backbone = load_backbone(weights, img_size=img_size, init=init).eval()
    cfg = backbone.pretrained_cfg
    channels, size = int(cfg["input_size"][0]), int(cfg["input_size"][-1])
    transform = EvalTransform(size, cfg["mean"], cfg["std"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)
    count = int(manifest.totals["samples"])
    vectors: np.memmap | None = None
    keys: list[str] = []
    sources: list[str] = []
    batch: list[torch.Tensor] = []
    total = None

    def flush() -> None:
        nonlocal vectors, total
        images = torch.stack(batch).to(device)
        with torch.no_grad(), feature_autocast(device):
            pooled = pooled_features(backbone, images).float().cpu().numpy()
        if vectors is None:
            vectors = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(count, pooled.shape[1]))
            total = np.zeros(pooled.shape[1], dtype=np.float64)
        total += pooled.sum(axis=0, dtype=np.float64)
        start = len(keys) - len(batch)
        vectors[start : start + len(batch)] = pooled
        batch.clear()

    progress = tqdm(total=count, unit="img", desc="embed", file=sys.stderr, disable=None)
    for url, entry in zip(urls, manifest.shards, strict=True):
        for raw in read_shard(url, entry, whole=False):
            record = sample_record(raw, url)
            image = match_channels(pixels_to_tensor(sample_pixels(raw, record, url)), channels)
            batch.append(transform(image))
            keys.append(raw["__key__"])
            sources.append(str(record.get("source", "")))
            if len(batch) == batch_size:
                flush()
            progress.update()
    if batch:
        flush()
    progress.close()
    if len(keys) != count:
        raise InputError(f"{urls[0]}...: read {len(keys)} samples, the manifest lists {count}")
    return Embedded(vectors, (total / count).astype(np.float32), keys, sources)


def cluster_kcenter(embedded: Embedded, target: int, clusters: int, seed: int) -> tuple[np.ndarray, dict[int, str]]:
    """(sorted kept row indices, row -> reason for each dropped row): see the module docstring, steps 2-4."""
    from sklearn.cluster import MiniBatchKMeans

    count = len(embedded.vectors)
    clusters = max(1, min(clusters, count))
    chunk = max(4096, 3 * clusters)
    kmeans = MiniBatchKMeans(n_clusters=clusters, random_state=seed, batch_size=min(chunk, 1024), n_init=1)
    for _ in range(3):  # passes over the data, one chunk in memory at a time
        for start in range(0, count, chunk):
            part = embedded.unit(start, start + chunk)
            if len(part) >= clusters:  # partial_fit needs as many rows as clusters
                kmeans.partial_fit(part)
    if not hasattr(kmeans, "cluster_centers_"):
        kmeans.fit(embedded.unit(0, count))
    assignment = np.concatenate([kmeans.predict(embedded.unit(s, s + chunk)) for s in range(0, count, chunk)])
    members = [np.flatnonzero(assignment == c) for c in range(clusters)]
    orders, gains = [], []
    for cluster in tqdm(range(clusters), desc="order", unit="cluster", file=sys.stderr, disable=None):
        points = embedded.units(members[cluster])
        centre = kmeans.cluster_centers_[cluster].astype(np.float32)
        start = int(np.argmax(points @ centre)) if len(points) else 0
        order, gain = kcenter_order(points, start)
        orders.append(order)
        gains.append(gain)
    counts = kept_per_cluster(gains, target)
    kept, reasons = [], {}
    for cluster in range(clusters):
        rows = members[cluster][orders[cluster]]  # in pick order
        prefix = int(counts[cluster])
        kept.append(rows[:prefix])
        if prefix == len(rows):
            continue
        if prefix == 0:
            reason = f"cluster {cluster} not represented (--keep keeps fewer images than there are clusters)"
            reasons.update({int(row): reason for row in rows})
            continue
        dropped, chosen = embedded.units(rows[prefix:]), embedded.units(rows[:prefix])
        similarity = dropped @ chosen.T
        for row, best, value in zip(rows[prefix:], similarity.argmax(axis=1), similarity.max(axis=1), strict=True):
            reasons[int(row)] = (
                f"redundant: cosine {value:.4f} to kept sample {embedded.keys[rows[best]]} (cluster {cluster})"
            )
    return np.sort(np.concatenate(kept)), reasons


def kept_per_cluster(gains: list[np.ndarray], target: int) -> np.ndarray:
    """How many of each cluster's pick order to keep: the ``target`` picks with the largest gain over all
    clusters (one coverage radius for the whole set), ties broken by cluster then position. Each cluster's gains
    fall along its order, so what a cluster keeps is a prefix of it."""
    cluster = np.concatenate([np.full(len(g), c) for c, g in enumerate(gains)]) if gains else np.zeros(0, int)
    position = np.concatenate([np.arange(len(g)) for g in gains]) if gains else np.zeros(0, int)
    gain = np.concatenate(gains) if gains else np.zeros(0)
    best = np.lexsort((position, cluster, -gain))[:target]
    return np.bincount(cluster[best], minlength=len(gains))


def kcenter_order(points: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """k-center greedy on unit vectors run to the end (Sener and Savarese 2018's core-set selection, cosine
    distance): (indices in pick order, each pick's gain). The first pick is ``start`` (gain 2, the largest
    cosine distance); each next one is the point farthest from everything picked, and its gain is that distance
    (1 - its highest cosine similarity to a picked point), non-increasing along the order. points: (n, D)."""
    if not len(points):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    order, gain = [start], [2.0]
    similarity = points @ points[start]
    taken = np.zeros(len(points), dtype=bool)
    taken[start] = True
    for _ in range(1, len(points)):
        # a picked point is masked, not trusted to have the highest similarity: a near-copy can be as similar to
        # a picked point as it is to itself in float32
        masked = np.where(taken, np.inf, similarity)
        pick = int(np.argmin(masked))
        order.append(pick)
        gain.append(float(1.0 - masked[pick]))
        taken[pick] = True
        similarity = np.maximum(similarity, points @ points[pick])
    return np.asarray(order), np.minimum.accumulate(np.asarray(gain))


def write_reduced(
    urls: list[str],
    source: Manifest,
    out: Path,
    kept: set[int],
    reasons: dict[int, str],
    embedded: Embedded,
    reduction: dict[str, Any],
    command: str,
) -> Manifest:
    """Copy the kept samples (source order, bytes unchanged) through a SampleSink; ``dropped.jsonl``, then the
    manifest last (a reduction that died leaves no manifest)."""
    config = source.config
    sink = SampleSink(out, int(config.get("max_count", 2000)), int(config.get("max_bytes", 256 * 1024**2)))
    row = 0
    for url, entry in zip(urls, source.shards, strict=True):
        for raw in read_shard(url, entry, whole=False):
            if row in kept:
                sample = {k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}
                sink.write(sample, sample_record(raw, url))
            row += 1
    shards = sink.finish()
    dropped = out / DROPPED_NAME
    tmp = dropped.with_name(dropped.name + ".tmp")
    with open(tmp, "w") as handle:
        for index in sorted(reasons):
            entry = {"key": embedded.keys[index], "source": embedded.sources[index], "reason": reasons[index]}
            handle.write(json.dumps(entry) + "\n")
    shutil.move(tmp, dropped)
    manifest = Manifest(
        format=FORMAT,
        command=command,
        config=config,
        sources=source.sources,
        totals={
            **{key: source.totals.get(key, 0) for key in INHERITED_TOTALS},  # how the source set was read
            "samples": sink.counts["samples"],
            "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
            "labeled": sink.counts["labeled"],
            "dropped_by_reduction": len(reasons),
            "by_modality": dict(sorted(sink.by_modality.items())),
            "by_source": {reduction["from"]: sink.counts["samples"]},
            "by_split": dict(sorted(sink.by_split.items())),
        },
        classes=source.classes,
        shards=shards,
        skipped=source.skipped,
        reduction={**reduction, "dropped_list": DROPPED_NAME, "dropped_list_sha256": file_sha256(dropped)},
    )
    manifest.write(out)
    return manifest
