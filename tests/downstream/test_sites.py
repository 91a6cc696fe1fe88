"""The robustness index (medfm.downstream.sites): its counts against a naive loop, the site sources (CSV column, folder
level, shard metadata, key file), and ``medfm eval`` on real brain MRI whose site signature the test plants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfm.cli import main
from medfm.data_shards.errors import ConfigError, InputError
from medfm.downstream.config import EvalConfig, load_config
from medfm.downstream.data import class_names_of, split_label_lists
from medfm.downstream.sites import robustness_index, sample_sites


def naive_index(features: np.ndarray, labels: np.ndarray, sites: list[str], k: int) -> tuple[int, int, float]:
    """(same class other site, other class same site, site vote accuracy) by plain loops."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    so = os_ = right = 0
    for i in range(len(features)):
        others = [j for j in range(len(features)) if j != i]
        nearest = sorted(others, key=lambda j: -float(unit[i] @ unit[j]))[:k]
        so += sum(labels[j] == labels[i] and sites[j] != sites[i] for j in nearest)
        os_ += sum(labels[j] != labels[i] and sites[j] == sites[i] for j in nearest)
        votes = {s: sum(sites[j] == s for j in nearest) for s in sorted(set(sites))}
        right += max(votes, key=lambda s: (votes[s], -sorted(set(sites)).index(s))) == sites[i]
    return so, os_, right / len(features)


def test_the_index_counts_neighbours_as_a_naive_loop_does():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(31, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 31)
    sites = [f"site{s}" for s in rng.integers(0, 3, 31)]
    result = robustness_index(torch.from_numpy(features), torch.from_numpy(labels), sites, [1, 5, 100])
    assert [row["k"] for row in result["rows"]] == [1, 5, 30]  # 100 is clipped to N - 1
    for row in result["rows"]:
        so, os_, site_acc = naive_index(features, labels, sites, row["k"])
        assert (row["same_class_other_site"], row["other_class_same_site"]) == (so, os_)
        assert row["robustness_index"] == pytest.approx(so / os_)
        assert row["site_knn_acc"] == pytest.approx(site_acc)
    assert sum(result["sites"].values()) == 31 and result["n"] == 31
    with pytest.raises(InputError, match="2 or more"):
        robustness_index(torch.from_numpy(features), torch.from_numpy(labels), ["a"] * 31, [5])


def test_a_csv_site_column_is_a_site_not_a_label(tmp_path):
    for i in range(8):
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows = ["path,finding,site"] + [
        f"{i}.png,{'mass' if i % 2 else 'normal'},{'north' if i < 4 else 'south'}" for i in range(8)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    spec = f"csv:{tmp_path / 'labels.csv'}"
    assert class_names_of(spec) == ["mass", "normal"]  # not a multi-label task of (finding, site)
    labels = split_label_lists(spec, 0.25, 0.25)
    assert all(isinstance(label, int) for split in labels.values() for label in split)
    assert sample_sites("csv", spec, ["0.png", "5.png"]) == ["north", "south"]
    assert sample_sites("level:2", f"imagefolder:{tmp_path}", ["train/mass/b/x.png"]) == ["b"]
    with pytest.raises(InputError, match="no site"):  # a path with fewer folders than the level
        sample_sites("level:3", f"imagefolder:{tmp_path}", ["train/mass/b/x.png"])
    key_file = tmp_path / "sites.csv"
    key_file.write_text("key,site\ntest-000000,a\ntest-000001,b\n")
    assert sample_sites(f"file:{key_file}", f"imagefolder:{tmp_path}", ["test-000001"]) == ["b"]
    with pytest.raises(InputError, match="test-000002"):
        sample_sites(f"file:{key_file}", f"imagefolder:{tmp_path}", ["test-000002"])
    with pytest.raises(ConfigError, match=r"sites\.source"):
        sample_sites("csv", f"imagefolder:{tmp_path}", ["test-000000"])
    with pytest.raises(ConfigError, match="unknown form"):
        sample_sites("scanner", spec, ["0.png"])


def test_the_protocol_needs_a_site_source():
    with pytest.raises(ConfigError, match=r"'sites\.source'"):
        load_config(EvalConfig, None, ["out_dir=o", "backbone.path=b", "data.spec=s", "protocols=[robustness_index]"])


def test_dicom_scanners_as_sites_of_a_shard_set(shared_data, tmp_path):
    dicom = shared_data / "dicom" / "single"
    shards = tmp_path / "shards"
    assert main(["shard", str(dicom), "--out", str(shards), "--workers", "1", "--dedup", "none"]) == 0
    from medfm.data_shards.stream import open_shard_set, read_shard, sample_record

    urls, manifest = open_shard_set(str(shards))
    records = {
        raw["__key__"]: sample_record(raw, url)
        for url, e in zip(urls, manifest.shards, strict=True)
        for raw in read_shard(url, e, whole=False)
    }
    keys = [key for key, record in records.items() if "manufacturer" in record]
    makers = sample_sites("meta:manufacturer", f"shards:{shards}", keys)
    assert {"GE MEDICAL SYSTEMS", "Philips", "TOSHIBA_MEC"} <= set(makers)  # CT_small, MR2_UNCR, MR_small
    unlabeled = [key for key, record in records.items() if "manufacturer" not in record]
    if unlabeled:
        with pytest.raises(InputError, match="have no site"):
            sample_sites("meta:manufacturer", f"shards:{shards}", unlabeled)


def planted_sites(brain_mri: Path, root: Path, *, plant: bool, per_class: int = 40) -> Path:
    """Two classes of real brain MRI (glioma, no tumour) at ``root/CLASS/SITE/``: every other image of each class
    goes to site_b. With ``plant``, site_b's images carry a scanner signature: washed out (half the contrast, a
    bright floor), as a differently calibrated scanner gives."""
    for name in ("glioma", "notumor"):
        files = sorted((brain_mri / "train" / name).iterdir())[:per_class]
        for i, file in enumerate(files):
            site = "site_b" if i % 2 else "site_a"
            pixels = np.asarray(Image.open(file).convert("L").resize((64, 64)), dtype=np.float32)
            if plant and site == "site_b":
                pixels = 0.5 * pixels + 110
            (root / name / site).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / site / f"{i:03d}.png")
    return root


def test_a_planted_site_signature_lowers_the_index_through_the_cli(tiny_release, brain_mri, tmp_path, capsys):
    indices = {}
    for plant in (False, True):
        data = planted_sites(brain_mri, tmp_path / f"data_{plant}", plant=plant)
        out = tmp_path / f"eval_{plant}"
        args = ["eval", "--backbone", str(tiny_release), "--data", f"imagefolder:{data}", "--out", str(out),
                "protocols=[linear,robustness_index]", "sites.source=level:1", "sites.k=[5,10]",
                "backbone.inits=[release,random]", "data.val_fraction=0.2", "data.test_fraction=0.3"]  # fmt: skip
        assert main(args) == 0
        assert "| release | 10 |" in capsys.readouterr().out  # the summary table's RI rows
        for init in ("release", "random"):
            folder = out / init / "robustness_index"
            result = json.loads((folder / "results.json").read_text())
            assert result["sites"] == {"site_a": 40, "site_b": 40} and result["n"] == 80
            assert (folder / "sites.png").stat().st_size > 0 and "| 10 |" in (folder / "results.md").read_text()
            indices[plant, init] = result["rows"][-1]
            linear = json.loads((out / init / "linear" / "results.json").read_text())
            assert [row["site"] for row in linear["per_site"]] == ["site_a", "site_b"]
            assert sum(row["n"] for row in linear["per_site"]) == linear["n"]["test"]
        assert "RI" in (out / "summary.md").read_text()
    for init in ("release", "random"):
        clean, planted = indices[False, init], indices[True, init]
        # the signature makes neighbours share a site more than a class: the index falls below 1 and the site is
        # told from the embedding almost always, where without it the site is a coin flip
        assert planted["robustness_index"] < 1 < clean["robustness_index"], init
        assert planted["site_knn_acc"] > 0.9 and clean["site_knn_acc"] < 0.75, init


def test_the_robustness_index_through_import_medfm(tiny_release, brain_mri, tmp_path):
    import medfm

    data = planted_sites(brain_mri, tmp_path / "data", plant=True, per_class=10)
    result = medfm.evaluate(
        tiny_release,
        f"imagefolder:{data}",
        tmp_path / "eval",
        protocols=["robustness_index"],
        sites={"source": "level:1", "k": [3]},
        plots=False,
    )
    index = result.results["release"]["robustness_index"]
    assert index["sites"] == {"site_a": 10, "site_b": 10} and index["rows"][0]["k"] == 3
    assert "| release | 3 |" in result.table
