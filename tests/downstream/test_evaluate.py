"""The frozen-feature protocols end to end on real data (and a synthetic multi-label CSV) with a tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medfm.downstream.config import EvalConfig, load_config
from medfm.downstream.data import open_split, plan_unit_splits
from medfm.downstream.evaluate import best_on_val, run_eval
from medfm.pretrain.errors import ConfigError

PLOTS = ("roc.png", "confusion.png", "embedding.png")


def evaluate(release: Path, spec: str, out_dir: Path, *overrides: str) -> dict:
    cfg = load_config(
        EvalConfig, None, [f"out_dir={out_dir}", f"backbone.path={release}", f"data.spec={spec}", *overrides]
    )
    return run_eval(cfg)


def test_pneumoniamnist_knn_linear_label_efficiency_robustness_and_cache(tiny_release, medmnist, tmp_path):
    spec = f"medmnist:{medmnist('pneumoniamnist')}"
    extra = (
        "efficiency.fractions=[0.01,1.0]",
        "efficiency.seeds=[0,1]",
        "robustness.corruptions=[gaussian_noise,jpeg]",
    )
    results = evaluate(tiny_release, spec, tmp_path / "eval", *extra)["release"]
    assert set(results) == {"knn", "linear"}
    for protocol, result in results.items():
        assert result["task"] == {"kind": "binary", "class_names": ["0", "1"]}
        assert result["n"] == {"train": 4708, "val": 524, "test": 624}
        assert result["summary"]["auc"] > 0.75, protocol  # even 4 pretraining steps beat chance clearly
        folder = tmp_path / "eval" / "release" / protocol
        assert all((folder / name).stat().st_size > 0 for name in ("results.json", "results.md", *PLOTS))
        saved = json.loads((folder / "results.json").read_text())
        assert saved["summary"] == pytest.approx(result["summary"])
        one, full = result["label_efficiency"]
        assert (one["budget"], one["n_train"], full["n_train"]) == ("1%", 47, 4708)
        assert one["test"]["auc"]["n"] == 2 and full["test"]["auc"]["std"] == pytest.approx(0, abs=1e-9)
        assert [(r["corruption"], r["severity"]) for r in result["robustness"]] == [("gaussian_noise", 3), ("jpeg", 3)]
        noise = result["robustness"][0]
        assert noise["drop"]["auc"] == pytest.approx(result["summary"]["auc"] - noise["test"]["auc"])
    assert "| release | knn |" in (tmp_path / "eval" / "summary.md").read_text()
    assert json.loads((tmp_path / "eval" / "run.json").read_text())["cache"] == {"hits": 2, "misses": 5}
    again = evaluate(tiny_release, spec, tmp_path / "eval", *extra)["release"]  # every split's features cached
    assert json.loads((tmp_path / "eval" / "run.json").read_text())["cache"] == {"hits": 7, "misses": 0}
    assert again["linear"]["summary"] == results["linear"]["summary"]


def test_breastmnist_64_at_another_size_and_the_random_init_baseline(tiny_release, medmnist, tmp_path):
    spec = f"medmnist:{medmnist('breastmnist_64')}"
    both = evaluate(tiny_release, spec, tmp_path / "eval", "backbone.img_size=56", "backbone.inits=[release,random]")
    pretrained, random = both["release"], both["random"]
    for results in (pretrained, random):
        assert results["linear"]["n"] == {"train": 546, "val": 78, "test": 156}
        assert results["linear"]["backbone"]["input_size"] == [1, 56, 56]
        assert 0.5 < results["linear"]["summary"]["auc"] <= 1
    assert pretrained["knn"]["backbone"]["checksum"] != random["knn"]["backbone"]["checksum"]
    assert random["knn"]["backbone"]["init"] == "random"
    table = (tmp_path / "eval" / "summary.md").read_text()
    assert "| release | linear |" in table and "| random | linear |" in table
    assert (tmp_path / "eval" / "random" / "knn" / "embedding.png").is_file()


def test_each_protocol_keeps_the_input_side_of_its_best_val_metric(tiny_release, medmnist, tmp_path):
    """features.input_scales [1, 2]: every protocol is fitted at 28 and 56 px and keeps the side whose val AUC is
    higher (recorded with both val AUCs); the test metrics, label budgets and plots are those of that side."""
    spec = f"medmnist:{medmnist('breastmnist')}"
    scales = ("features.input_scales=[1.0,2.0]", "efficiency.fractions=[0.1]", "efficiency.seeds=[0]")
    results = evaluate(tiny_release, spec, tmp_path / "both", *scales)["release"]
    for protocol, result in results.items():
        by_side = result["settings"]["val_auc_by_input_side"]
        assert set(by_side) == {28, 56}, protocol
        chosen = result["settings"]["input_side"]
        assert by_side[chosen] == max(by_side.values()) == pytest.approx(result["val"]["auc"])
        assert result["backbone"]["input_size"] == [1, chosen, chosen]
        alone = evaluate(tiny_release, spec, tmp_path / f"alone{chosen}", f"backbone.img_size={chosen}")["release"]
        assert result["summary"] == pytest.approx(alone[protocol]["summary"])  # the same fit as that side alone
        assert result["label_efficiency"][0]["n_train"] == 55
    with pytest.raises(ConfigError, match=r"features\.input_scales"):
        evaluate(tiny_release, spec, tmp_path / "bad", "features.input_scales=[1.0,1.0]")


def test_best_on_val_ranks_an_undefined_metric_last_and_keeps_the_first_of_ties():
    assert best_on_val([0.7, float("nan"), 0.9]) == 2
    assert best_on_val([float("nan"), 0.6]) == 1
    assert best_on_val([0.8, 0.8]) == 0
    assert best_on_val([float("nan")]) == 0


def test_brain_mri_image_folder_with_val_carved_from_train(tiny_release, brain_mri, tmp_path):
    results = evaluate(tiny_release, f"imagefolder:{brain_mri}", tmp_path / "eval", "protocols=[linear]", "plots=false")
    result = results["release"]["linear"]
    assert result["task"] == {"kind": "multiclass", "class_names": ["glioma", "meningioma", "notumor", "pituitary"]}
    assert result["n"] == {"train": 720, "val": 80, "test": 1281}  # val: 10 % of each training class
    assert [row["support"] for row in result["test"]["per_class"]] == [299, 301, 381, 300]
    assert result["summary"]["auc"] > 0.7 and result["summary"]["acc"] > 0.4  # 4 classes: chance is 0.25
    assert len(result["test"]["confusion"]) == 4


def test_synthetic_multilabel_csv_with_a_split_column(tiny_release, shapes_csv, tmp_path):
    csv = shapes_csv(tmp_path / "shapes")
    plan = plan_unit_splits(f"csv:{csv}")
    assert {k: len(v) for k, v in plan.indices.items()} == {"train": 80, "val": 15, "test": 25}
    assert plan.units[0].source == "images/000.png"
    sample = open_split(f"csv:{csv}", "test")[0]
    assert sample["label"].tolist() in ([0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1])  # fmt: skip
    results = evaluate(tiny_release, f"csv:{csv}", tmp_path / "eval", "knn.k=5", "linear.class_weights=true")["release"]
    for result in results.values():
        assert result["task"] == {"kind": "multilabel", "class_names": ["square", "bar", "dot"]}
        aucs = [row["auc"] for row in result["test"]["per_class"]]
        assert len(aucs) == 3 and result["summary"]["auc"] == pytest.approx(np.nanmean(aucs))
        assert "exact_match" in result["test"]
    assert results["linear"]["summary"]["auc"] > 0.8  # bright shapes are easy even for near-random features
    assert (tmp_path / "eval" / "release" / "linear" / "roc.png").is_file()
    assert not (
        tmp_path / "eval" / "release" / "linear" / "confusion.png"
    ).exists()  # no confusion matrix for multi-label


def test_csv_without_split_column_is_split_by_fractions(shapes_csv, tmp_path):
    csv = shapes_csv(tmp_path / "shapes", n=60)
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    plan = plan_unit_splits(f"csv:{csv}", val_fraction=0.1, test_fraction=0.2, seed=0)
    sizes = {k: len(v) for k, v in plan.indices.items()}
    assert sum(sizes.values()) == 60 and sizes["test"] >= 10 and sizes["val"] >= 5
    assert plan.origin.startswith("stratified")
    again = plan_unit_splits(f"csv:{csv}", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert all(np.array_equal(plan.indices[k], again.indices[k]) for k in sizes)


def test_a_labeled_shard_set_through_shards_spec(tiny_release, medmnist, tmp_path):
    from medfm.cli import main as medfm

    shards = tmp_path / "shards"
    args = ["shard", f"medmnist:{medmnist('breastmnist')}", "--out", str(shards), "--workers", "1", "--dedup", "none"]
    assert medfm(args) == 0
    results = evaluate(tiny_release, f"shards:{shards}", tmp_path / "eval", "protocols=[knn]", "plots=false")
    direct = evaluate(
        tiny_release, f"medmnist:{medmnist('breastmnist')}", tmp_path / "direct", "protocols=[knn]", "plots=false"
    )
    result = results["release"]["knn"]
    assert result["n"] == {"train": 546, "val": 78, "test": 156} and result["task"]["kind"] == "binary"
    # the same images in another storage: the same kNN result (sample order does not matter to kNN)
    assert result["summary"] == pytest.approx(direct["release"]["knn"]["summary"])


def test_a_general_purpose_baseline_beside_the_release_and_random_init(
    tiny_release, medmnist, general_snapshot, tmp_path
):
    """``backbone.inits=[release,random,baseline]``: a general model (here a seeded RGB ViT at 224 px, patch 16,
    as a timm hub snapshot folder) is evaluated at the release's input (1 channel, 28 px) by the same protocol."""
    snapshot = general_snapshot
    spec = f"medmnist:{medmnist('breastmnist')}"
    results = evaluate(
        tiny_release,
        spec,
        tmp_path / "eval",
        "backbone.inits=[release,random,baseline]",
        f"backbone.baseline={snapshot}",
        "protocols=[knn]",
        "plots=false",
    )
    assert list(results) == ["release", "random", "baseline"]
    baseline = results["baseline"]["knn"]
    assert baseline["backbone"]["source"] == str(snapshot) and baseline["backbone"]["init"] == "baseline"
    assert baseline["backbone"]["input_size"] == results["release"]["knn"]["backbone"]["input_size"]  # same images
    assert results["baseline"]["knn"]["n"] == results["release"]["knn"]["n"]
    table = (tmp_path / "eval" / "summary.md").read_text()
    assert all(f"| {init} | knn |" in table for init in ("release", "random", "baseline"))
    with pytest.raises(ConfigError, match=r"backbone\.baseline"):
        evaluate(tiny_release, spec, tmp_path / "bad", "backbone.inits=[baseline]")


def test_the_weights_checksum_covers_0_dim_buffers_of_batchnorm_models():
    import torch

    from medfm.downstream.features import state_checksum
    from medfm.pretrain.backbones import build_backbone

    model = build_backbone("resnet18", img_size=28)
    before = state_checksum(model.state_dict())
    model.bn1.num_batches_tracked += 1  # a 0-dim int64 buffer
    assert state_checksum(model.state_dict()) != before
    assert state_checksum({"x": torch.tensor(3)}) != state_checksum({"x": torch.tensor(4)})
