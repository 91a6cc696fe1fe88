"""``medfm shard reduce``: k-center greedy and the cluster quotas against their definitions, and the command end to
end on real BreastMNIST images with planted near-copies: the embedding reduction drops the copies, a random subset
of the same size does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medfm.cli import main
from medfm.data_shards.manifest import Manifest
from medfm.data_shards.stream import open_shard_set, read_shard, sample_record
from medfm.downstream.reduce import kcenter_order, kept_per_cluster


def test_kcenter_order_picks_the_farthest_and_its_gains_fall():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 16))
    copies = base + rng.normal(scale=1e-3, size=base.shape)  # a near-copy of each
    points = np.concatenate([base, copies])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    order, gain = kcenter_order(points, start=0)
    assert sorted(order.tolist()) == list(range(12)) and gain[0] == 2.0
    assert sorted(i % 6 for i in order[:6]) == list(range(6))  # one of each pair first: the copies add ~nothing
    assert (gain[6:] < 1e-4).all() and (np.diff(gain) <= 0).all()
    # the naive definition: each pick is the point with the lowest similarity to everything picked before it
    for step in range(1, 12):
        before = order[:step].tolist()
        rest = [i for i in range(12) if i not in before]
        farthest = min(rest, key=lambda i: max(float(points[i] @ points[c]) for c in before))
        assert order[step] == farthest
        assert gain[step] == pytest.approx(1 - max(float(points[farthest] @ points[c]) for c in before), abs=1e-6)


def test_one_coverage_radius_over_all_clusters():
    gains = [np.array([2.0, 0.5, 0.01]), np.array([2.0]), np.array([2.0, 0.9, 0.8, 0.001])]
    assert kept_per_cluster(gains, 5).tolist() == [1, 1, 3]  # gains 2, 2, 2, 0.9, 0.8
    assert kept_per_cluster(gains, 6).tolist() == [2, 1, 3]  # then 0.5
    assert kept_per_cluster(gains, 2).tolist() == [1, 1, 0]  # fewer than clusters: ties by cluster
    assert kept_per_cluster(gains, 100).tolist() == [3, 1, 4]


def twins_pool(medmnist, path: Path, n: int = 150) -> Path:
    """BreastMNIST's first ``n`` train images, then a near-copy of each (+-2 grey levels of noise): n pairs."""
    with np.load(medmnist("breastmnist")) as data:
        images, labels = data["train_images"][:n], data["train_labels"][:n]
    noise = np.random.default_rng(0).integers(-2, 3, images.shape)
    copies = (images.astype(int) + noise).clip(0, 255).astype(np.uint8)
    pool = {"train_images": np.concatenate([images, copies]), "train_labels": np.concatenate([labels, labels])}
    np.savez(path, **pool, val_images=images[:2], val_labels=labels[:2], test_images=images[:2], test_labels=labels[:2])
    return path


def kept_indices(shards: Path) -> list[int]:
    urls, manifest = open_shard_set(str(shards))
    return [
        int(sample_record(raw, u)["index"])
        for u, e in zip(urls, manifest.shards, strict=True)
        for raw in read_shard(u, e, whole=False)
    ]


def test_reduce_drops_near_copies_and_a_random_subset_does_not(tiny_release, medmnist, tmp_path, capsys):
    n = 150
    pool = twins_pool(medmnist, tmp_path / "pool.npz", n)
    shards = tmp_path / "shards"
    common = ["--workers", "1", "--dedup", "none", "--max-count", "100"]
    assert main(["shard", f"medmnist:{pool}", "--out", str(shards), "--splits", "train", *common]) == 0
    both_kept = {}
    for method in ("kcenter", "random"):
        out = tmp_path / method
        args = ["shard", "reduce", str(shards), "--model", str(tiny_release), "--keep", "0.5", "--out", str(out),
                "--method", method, "--batch-size", "64"]  # fmt: skip
        assert main(args) == 0
        assert f"kept {n} of {2 * n} ({method})" in capsys.readouterr().out
        manifest = Manifest.read(out)
        assert manifest.totals["samples"] == n and manifest.reduction["method"] == method
        assert manifest.reduction["from"] == str(shards) and manifest.reduction["model"] == str(tiny_release)
        dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
        assert len(dropped) == n and all(entry["source"] and entry["reason"] for entry in dropped)
        assert main(["shard", "inspect", str(out), "--verify"]) == 0  # a complete, valid shard set
        kept = kept_indices(out)
        both_kept[method] = sum(i in kept and i + n in kept for i in range(n)) / n
        if method == "kcenter":
            assert manifest.reduction["clusters"] == 18  # ceil(sqrt(300))
            assert all("redundant: cosine" in entry["reason"] for entry in dropped)
    # random keeps both of a pair a quarter of the time (0.227 measured) and loses both as often; the embedding
    # reduction keeps one of nearly every pair (0.007 both, 0.993 at least one, measured)
    assert both_kept["random"] > 0.15 and both_kept["kcenter"] < 0.05, both_kept


def test_reduce_errors_name_the_option(tiny_release, tmp_path, capsys):
    assert main(["shard", "reduce", str(tmp_path), "--out", str(tmp_path / "o")]) == 2  # no --model / --keep
    assert "usage: medfm shard reduce" in capsys.readouterr().err
    args = ["shard", "reduce", str(tmp_path), "--model", str(tiny_release), "--keep", "1.5", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2
    assert "--keep" in capsys.readouterr().err


def test_reduce_through_the_python_api(tiny_release, medmnist, tmp_path):
    import medfm

    pool = twins_pool(medmnist, tmp_path / "pool.npz", 30)
    shards = medfm.shard([f"medmnist:{pool}"], tmp_path / "shards", workers=1, dedup="none", splits=["train"])
    for method in ("kcenter", "random"):
        reduced = medfm.reduce(shards, tmp_path / method, model=tiny_release, keep=0.5, method=method, batch_size=32)
        assert isinstance(reduced, medfm.ShardResult) and reduced.samples == 30
        assert reduced.manifest.reduction["method"] == method and (reduced.out / "dropped.jsonl").is_file()
    with pytest.raises(medfm.ConfigError, match="--keep"):
        medfm.reduce(shards, tmp_path / "bad", model=tiny_release, keep=0)
