"""``medfm bench quality`` end to end on tiny synthetic data: pool -> pretrain -> eval -> finetune -> report, the
report's rows and target check, and continuing an interrupted benchmark without redoing finished steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medfm.benchmark import (
    ablation_rows,
    ablation_section,
    build_report,
    check_target,
    load_quality_config,
    plan_steps,
)
from medfm.cli import main as medfm
from medfm.data_shards.manifest import Manifest
from medfm.pretrain.config import to_dict
from medfm.pretrain.errors import ConfigError


def write_config(tmp_path: Path, tiny_overrides, make_npz, finetune: bool = True) -> Path:
    task = make_npz(tmp_path / "task.npz")
    other = make_npz(tmp_path / "other.npz", seed=1)
    recipe = dict(item.split("=", 1) for item in tiny_overrides("mae", "shards:unused", tmp_path / "unused"))
    recipe = {k: yaml.safe_load(v) for k, v in recipe.items() if k not in ("data.spec", "train.run_dir")}
    nested: dict = {}
    for key, value in recipe.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(nested))
    config = {
        "out_dir": str(tmp_path / "bench"),
        "workers": 1,
        "pool": {"sources": [f"medmnist:{task}", f"medmnist:{other}"], "max_side": None},
        "recipes": [{"name": "tiny_mae", "config": str(tmp_path / "recipe.yaml"), "overrides": []}],
        "tasks": [
            {"name": "task", "spec": f"medmnist:{task}",
             "published": {"paper": {"acc": 0.9, "auc": 0.95, "protocol": "supervised"}}},
            {"name": "other", "spec": f"medmnist:{other}", "finetune": False},
        ],
        "frozen": {"fractions": [0.5, 1.0], "seeds": [0, 1], "overrides": ["features.pooling=layers", "linear.weight_decays=[0.01]"]},
        "finetune": {"enabled": finetune, "fractions": [0.5, 1.0], "seeds": [0],
                     "overrides": ["train.max_steps=2", "train.batch_size=8", "plots=false"]},
        "target": {"reference": "paper", "tasks": ["task"], "finetune_fraction": 0.5},
    }  # fmt: skip
    (tmp_path / "quality.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "quality.yaml"


def test_the_benchmark_runs_end_to_end_and_continues_without_redoing_steps(
    tmp_path, capsys, pretrain_overrides, binary_npz
):
    config = write_config(tmp_path, pretrain_overrides, binary_npz)
    assert medfm(["bench", "quality", "--config", str(config)]) == 0
    out = tmp_path / "bench"
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    # every task x init x frozen protocol at both budgets, fine-tuning on the one task that asks for it
    for task in ("task", "other"):
        for init in ("release", "random"):
            for protocol in ("knn", "linear"):
                assert sorted(
                    r["fraction"] for r in rows if (r["task"], r["init"], r["protocol"]) == (task, init, protocol)
                ) == [0.5, 1.0]
    assert {(r["task"], r["init"]) for r in rows if r["protocol"] == "finetune"} == {
        ("task", "release"),
        ("task", "random"),
    }
    half = next(
        r for r in rows if (r["task"], r["init"], r["protocol"], r["fraction"]) == ("task", "release", "linear", 0.5)
    )
    assert set(half["acc"]) == {"mean", "std"} and 0 <= half["acc"]["mean"] <= 1
    # the pool holds train images only (20 + 20 of the two files' 40 + 40 train, no val / test)
    assert report["pool"]["samples"] == 80
    assert report["pretrain"]["tiny_mae"]["objective"] == "mae"
    (check,) = report["target"]
    assert check["task"] == "task" and isinstance(check["beats_reference"], bool) and check["finetune"]
    markdown = (out / "results.md").read_text()
    assert "| published: paper |" in markdown and "## Target" in markdown
    for name in ("task_bars.png", "task_efficiency.png", "other_bars.png", "other_efficiency.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    steps = plan_steps(load_quality_config(config))
    assert len(list((out / "steps").glob("*.json"))) == len(steps)

    # an interrupted benchmark: one finished step forgotten; re-running redoes that step only
    capsys.readouterr()
    evaluation = next(s for s in steps if s.stage == "eval")
    (out / "steps" / f"{evaluation.key}.json").unlink()
    assert medfm(["bench", "quality", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before:") == len(steps) - 1
    assert f"$ medfm {' '.join(evaluation.argv)}" in printed


def test_a_failed_step_stops_with_its_exit_code_and_names_it(tmp_path, capsys, pretrain_overrides, binary_npz):
    config = write_config(tmp_path, pretrain_overrides, binary_npz, finetune=False)
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    recipe["model"]["backbone"] = "no_such_model"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = medfm(["bench", "quality", "--config", str(config)])
    assert code == 2
    assert "step 3 (pretrain tiny_mae) failed with exit code 2" in capsys.readouterr().err


def test_the_config_names_a_bad_key(tmp_path, pretrain_overrides, binary_npz):
    config = write_config(tmp_path, pretrain_overrides, binary_npz, finetune=False)
    with pytest.raises(ConfigError, match=r"target\.tasks"):
        load_quality_config(config, ["target.tasks=[nope]"])
    with pytest.raises(ConfigError, match="recipes"):
        load_quality_config(config, [f"recipes=[{{name: a, config: {tmp_path / 'missing.yaml'}}}]"])


def test_the_target_check_compares_the_best_linear_probe_and_the_label_budgets(tmp_path):
    cfg = load_quality_config(
        None,
        [
            f"out_dir={tmp_path}",
            "pool.sources=[x]",
            "recipes=[{name: r, config: pyproject.toml}]",
            "tasks=[{name: t, spec: x}]",
            "target.reference=ref",
            "target.tasks=[t]",
        ],
    )

    def row(init: str, protocol: str, fraction: float, acc: float, auc: float) -> dict:
        return {
            "task": "t",
            "recipe": "r",
            "init": init,
            "protocol": protocol,
            "fraction": fraction,
            "acc": {"mean": acc, "std": 0.0},
            "auc": {"mean": auc, "std": 0.0},
        }

    published = {"t": {"ref": {"acc": 0.85, "auc": 0.94}}}
    rows = [
        row("release", "linear", 1.0, 0.86, 0.95),
        row("release", "finetune", 0.1, 0.80, 0.90),
        row("random", "finetune", 1.0, 0.79, 0.91),
    ]
    (check,) = check_target(cfg, rows, published)
    assert check["beats_reference"] is True
    assert check["finetune"][0]["matches"] is False  # AUC 0.90 < 0.91
    rows[0] = row("release", "linear", 1.0, 0.86, 0.93)  # ACC beats, AUC does not
    assert check_target(cfg, rows, published)[0]["beats_reference"] is False
    # a recipe with the higher ACC + AUC that misses one metric does not hide another that beats both
    rows += [
        {**row("release", "linear", 1.0, 0.88, 0.939), "recipe": "r2"},
        {**row("release", "linear", 1.0, 0.855, 0.945), "recipe": "r3"},
    ]
    (check,) = check_target(cfg, rows, published)
    assert check["beats_reference"] is True and check["linear_probe"]["recipe"] == "r3"
    assert build_report(cfg)["rows"] == []  # nothing run yet


def test_an_ablation_is_probed_beside_its_recipe_and_left_out_of_fine_tuning_and_the_target(tmp_path):
    recipes = "recipes=[{name: r, config: pyproject.toml}, {name: r_before, config: pyproject.toml, overrides: [augment.blur_prob=0.5], ablation_of: r}]"
    cfg = load_quality_config(None, [f"out_dir={tmp_path}", "pool.sources=[x]", recipes, "tasks=[{name: t, spec: x}]",
                                     "target.reference=ref", "target.tasks=[t]"])  # fmt: skip
    steps = plan_steps(cfg)
    assert [s.label for s in steps if s.stage == "pretrain"] == ["pretrain r", "pretrain r_before"]
    assert any(s.label.startswith("kNN + linear probe: r_before") for s in steps)
    assert [s.label for s in steps if s.stage == "finetune"] == ["fine-tune: r on t"]
    named = load_quality_config(
        None,
        [
            f"out_dir={tmp_path}",
            "pool.sources=[x]",
            recipes,
            "tasks=[{name: t, spec: x}]",
            "finetune.recipes=[r, r_before]",
        ],
    )
    # named in finetune.recipes, an ablation is fine-tuned too (bench/spark.yaml: SparK against SimCLR)
    assert [s.label for s in plan_steps(named) if s.stage == "finetune"] == [
        "fine-tune: r on t",
        "fine-tune: r_before on t",
    ]

    def row(recipe: str, fraction: float, acc: float, auc: float) -> dict:
        return {
            "task": "t",
            "recipe": recipe,
            "init": "release",
            "protocol": "linear",
            "fraction": fraction,
            "n_train": 10,
            "acc": {"mean": acc, "std": 0.0},
            "auc": {"mean": auc, "std": 0.0},
        }

    rows = [
        row("r", 0.1, 0.80, 0.90),
        row("r_before", 0.1, 0.78, 0.93),
        row("r", 1.0, 0.86, 0.95),
        row("r_before", 1.0, 0.90, 0.99),
    ]
    # the ablation's better probe does not count for the target: it is not the recipe
    (check,) = check_target(cfg, rows, {"t": {"ref": {"acc": 0.85, "auc": 0.94}}})
    assert check["linear_probe"]["recipe"] == "r"
    report = {"config": to_dict(cfg), "rows": rows}
    compared = ablation_rows(report)
    assert [(c["fraction"], round(c["delta_acc"], 3), round(c["delta_auc"], 3)) for c in compared] == [
        (0.1, 0.02, -0.03),
        (1.0, -0.04, -0.04),
    ]
    text = "\n".join(ablation_section({**report, "ablation": compared}))
    assert "`r` against `r_before` (augment.blur_prob=0.5)" in text
    assert "| t | linear | 10 % (10) | 0.800 / 0.900 | 0.780 / 0.930 | +0.020 / -0.030 |" in text
    assert "higher AUC in 0 of 2 comparisons" in text
    with pytest.raises(ConfigError, match=r"recipes\[1\]\.ablation_of"):
        load_quality_config(
            None,
            [
                f"out_dir={tmp_path}",
                "pool.sources=[x]",
                recipes.replace("ablation_of: r", "ablation_of: nope"),
                "tasks=[{name: t, spec: x}]",
            ],
        )


def test_a_reduced_pool_recipe_pretrains_on_the_reduction_for_the_same_steps(
    tmp_path, capsys, pretrain_overrides, binary_npz
):
    """A recipe with ``reduce``: ``medfm shard reduce`` of the pool with an earlier recipe's release, then
    pretraining on it with ``data.samples_per_epoch`` = the whole pool's size, so both runs take the same steps."""
    config = write_config(tmp_path, pretrain_overrides, binary_npz, finetune=False)
    data = yaml.safe_load(config.read_text())
    base = data["recipes"][0]
    reduced = {
        **base,
        "name": "tiny_mae_reduced",
        "reduce": {"model": "tiny_mae", "keep": 0.5},
        "ablation_of": "tiny_mae",
    }
    random = {**reduced, "name": "tiny_mae_random", "reduce": {"model": "tiny_mae", "keep": 0.5, "method": "random"}}
    recipe_yaml = yaml.safe_load(Path(base["config"]).read_text())
    recipe_yaml["data"].pop("samples_per_epoch", None)  # an epoch is the pool: the reduced runs get its size
    Path(base["config"]).write_text(yaml.safe_dump(recipe_yaml))
    data["recipes"] += [reduced, random]
    data["tasks"] = data["tasks"][:1]
    config.write_text(yaml.safe_dump(data))
    before = plan_steps(load_quality_config(config))
    assert [s.stage for s in before][:7] == ["shard", "inspect", "pretrain", "reduce", "pretrain", "reduce", "pretrain"]
    assert "data.samples_per_epoch=POOL_SIZE" in before[4].argv  # the pool is not written yet
    assert medfm(["bench", "quality", "--config", str(config)]) == 0
    out = tmp_path / "bench"
    steps = {}
    for name in ("tiny_mae", "tiny_mae_reduced", "tiny_mae_random"):
        saved = yaml.safe_load((out / "pretrain" / name / "config.yaml").read_text())
        steps[name] = saved["derived"]["total_steps"]
        if name != "tiny_mae":
            assert saved["data"]["spec"] == f"shards:{out / 'pool_reduced' / name}"
            assert saved["data"]["samples_per_epoch"] == 80  # the whole pool
            assert Manifest.read(out / "pool_reduced" / name).totals["samples"] == 40
    assert len(set(steps.values())) == 1, steps
    assert {row["ablation"] for row in json.loads((out / "results.json").read_text())["ablation"]} == {
        "tiny_mae_reduced",
        "tiny_mae_random",
    }
