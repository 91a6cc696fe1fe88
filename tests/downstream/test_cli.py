"""The subcommands: exit codes, clear errors naming files and keys, recipes that load."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from medfm.downstream.cli import add_parser, main
from medfm.downstream.config import EvalConfig, FinetuneConfig, load_config
from medfm.pretrain.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "downstream").glob("*.yaml"))


def test_add_parser_registers_the_three_subcommands():
    parser = argparse.ArgumentParser(prog="medfm")
    add_parser(parser.add_subparsers(dest="command"))
    for command in ("export", "eval", "finetune"):
        assert callable(parser.parse_args([command, "x", "--out", "y"] if command == "export" else [command]).handler)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(recipe: Path):
    schema = EvalConfig if recipe.stem.startswith("eval") else FinetuneConfig
    extra = [] if "data:\n  spec" in recipe.read_text() else ["data.spec=csv:labels.csv"]
    cfg = load_config(schema, recipe, ["backbone.path=release", "out_dir=out", *extra])
    assert cfg.backbone.path == "release"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"'knn\.kk'.*did you mean 'knn\.k'"):
        load_config(EvalConfig, None, ["out_dir=o", "backbone.path=b", "data.spec=s", "knn.kk=3"])
    with pytest.raises(ConfigError, match=r"'train\.layer_decay'"):
        load_config(FinetuneConfig, None, ["out_dir=o", "backbone.path=b", "data.spec=s", "train.layer_decay=1.5"])
    with pytest.raises(ConfigError, match=r"'backbone\.path' is required"):
        load_config(EvalConfig, None, ["out_dir=o", "data.spec=s"])
    with pytest.raises(ConfigError, match=r"'robustness\.corruptions'"):
        load_config(EvalConfig, None, ["out_dir=o", "backbone.path=b", "data.spec=s", "robustness.corruptions=[fog]"])


def test_export_then_eval_through_the_cli(tiny_run, medmnist, tmp_path, capsys):
    release = tmp_path / "release"
    assert main(["export", str(tiny_run), "--out", str(release)]) == 0
    assert (release / "model.safetensors").is_file()
    assert main(["export", str(tiny_run), "--out", str(release)]) == 1  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err
    spec = f"medmnist:{medmnist('breastmnist')}"
    out = tiny_run / "eval" / "breast"  # where `medfm export` looks for results
    assert main(["eval", "--backbone", str(release), "--data", spec, "--out", str(out), "plots=false"]) == 0
    assert "| release | linear |" in capsys.readouterr().out
    assert main(["export", str(tiny_run), "--out", str(release), "--overwrite"]) == 0
    card = (release / "README.md").read_text()
    assert "| eval/breast/release/linear | linear |" in card and "| eval/breast/release/knn | knn |" in card


def test_cli_errors_name_the_file_and_key(tiny_release, medmnist, tmp_path, capsys):
    spec = f"medmnist:{medmnist('breastmnist')}"
    missing = tmp_path / "nope"
    assert main(["eval", "--backbone", str(missing), "--data", spec, "--out", str(tmp_path / "o")]) == 1
    assert str(missing) in capsys.readouterr().err
    assert main(["eval", "--backbone", str(tiny_release), "--data", spec, "--out", str(tmp_path / "o"), "knn.q=1"]) == 2
    assert "'knn.q'" in capsys.readouterr().err
    bad = tmp_path / "weights.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "path": Path("x")}, bad)  # a class instance: not weights_only
    assert main(["finetune", "--backbone", str(bad), "--data", spec, "--out", str(tmp_path / "f"), "backbone.architecture=resnet18"]) == 1  # fmt: skip
    assert "refused" in capsys.readouterr().err


def test_finetune_through_the_cli(tiny_release, medmnist, tmp_path, capsys):
    spec = f"medmnist:{medmnist('breastmnist')}"
    args = ["finetune", "--backbone", str(tiny_release), "--data", spec, "--out", str(tmp_path / "ft")]
    assert main([*args, "train.max_steps=2", "train.batch_size=16", "plots=false"]) == 0
    assert "| release |" in capsys.readouterr().out
    saved = (tmp_path / "ft" / "config.yaml").read_text()
    assert "max_steps: 2" in saved and "layer_decay: 0.75" in saved  # the resolved config is kept
