"""The config contract: one schema, YAML overrides, CLI on top, errors that name the key, derived values."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medfm.pretrain.config import ConfigError, derive, load_config, save_config
from medfm.pretrain.methods import METHODS

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["data.spec=medmnist:x.npz", "train.run_dir=runs/x"]


def error_of(path: Path | None, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_plus_required_values_load():
    cfg = load_config(None, REQUIRED)
    assert cfg.method == "mae" and cfg.mae.mask_ratio == 0.75 and cfg.train.precision.value == "auto"


def test_unknown_yaml_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  base_lr: 1.0e-3\n  warmup: 3\n")
    message = error_of(recipe, REQUIRED)
    assert str(recipe) in message and "'optim.warmup'" in message


def test_unknown_cli_key_is_named_with_a_suggestion():
    message = error_of(None, [*REQUIRED, "optim.baselr=1e-3"])
    assert "command line" in message and "'optim.baselr'" in message and "'optim.base_lr'" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=2.5", "train.batch_size"),
        ("train.precision=fp8", "train.precision"),
        ("augment.crop_scale=0.5", "augment.crop_scale"),
        ("mae.norm_pix_loss=maybe", "mae.norm_pix_loss"),
    ],
)
def test_wrong_type_is_named(override, key):
    assert f"'{key}'" in error_of(None, [*REQUIRED, override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method=byol", "method"),
        ("mae.mask_ratio=1.0", "mae.mask_ratio"),
        ("augment.crop_scale=[0.9,0.2]", "augment.crop_scale"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("augment.mean=[0.5,0.5]", "augment.mean"),
        ("knn.every_steps=100", "knn.spec"),
    ],
)
def test_invalid_value_is_named(override, key):
    assert f"'{key}'" in error_of(None, [*REQUIRED, override])


def test_missing_required_value_is_named():
    assert "'data.spec'" in error_of(None, ["train.run_dir=x"])


def test_override_without_equals_sign():
    assert "'optim.base_lr'" in error_of(None, [*REQUIRED, "optim.base_lr"])


def test_derived_values_cannot_be_set():
    assert "derived" in error_of(None, [*REQUIRED, "derived.lr=1.0"])


def test_cli_overrides_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  base_lr: 1.0e-3\ntrain:\n  batch_size: 16\n")
    cfg = load_config(recipe, [*REQUIRED, "train.batch_size=4", "model.backbone_kwargs.patch_size=8"])
    assert cfg.optim.base_lr == 1e-3 and cfg.train.batch_size == 4 and cfg.model.backbone_kwargs.patch_size == 8


def test_derive_global_batch_lr_and_steps(tmp_path):
    overrides = [
        "train.batch_size=32",
        "train.grad_accum=4",
        "optim.base_lr=1e-4",
        "schedule.epochs=2.5",
        "schedule.warmup_epochs=0.5",
    ]
    cfg = derive(load_config(None, REQUIRED + overrides), world_size=2, dataset_size=1000)
    d = cfg.derived
    assert d.global_batch == 256 and d.lr == pytest.approx(1e-4)
    assert d.steps_per_epoch == 3 and d.total_steps == 8 and d.warmup_steps == 2
    save_config(cfg, tmp_path / "config.yaml")
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.derived.total_steps == 8 and saved.train.precision == "auto"


def test_derive_rejects_a_batch_larger_than_an_epoch():
    cfg = load_config(None, [*REQUIRED, "train.batch_size=64"])
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        derive(cfg, world_size=2, dataset_size=100)


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads_and_builds(recipe):
    cfg = load_config(recipe, ["data.spec=medmnist:x.npz"])
    derive(cfg, world_size=1, dataset_size=100_000)
    d = cfg.derived
    assert d.global_batch == cfg.train.batch_size * cfg.train.grad_accum and 0 <= d.warmup_steps < d.total_steps
    method = METHODS[cfg.method]
    size, channels = cfg.data.img_size, cfg.data.in_chans
    views = method.build_transform(cfg)(torch.rand(channels, size + 16, size + 16))
    assert views and views[0].shape == (channels, size, size)  # the first (global) view at the recipe's size
    crops = [v for v in views if v.is_floating_point() and v.ndim == 3]  # DINOv2 adds its iBOT masks
    assert all(v.shape[0] == channels and v.shape[-1] <= size and torch.isfinite(v).all() for v in crops)
    if size <= 64:  # the CPU recipes: build the model too (the 224 px ones: below)
        assert_builds(method.from_config(cfg), cfg)


def assert_builds(built, cfg) -> None:
    """A method with trainable parameters whose exported backbone is the recipe's timm architecture."""
    assert any(p.requires_grad for p in built.parameters())
    backbone = built.export_backbone()
    assert backbone.default_cfg["architecture"] == cfg.model.backbone.removeprefix("timm/")


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "pretrain").glob("*_224.yaml")), ids=lambda p: p.stem)
def test_every_224_recipe_builds(recipe):
    cfg = derive(load_config(recipe, ["data.spec=medmnist:x.npz"]), world_size=1, dataset_size=100_000)
    assert cfg.data.img_size == 224
    assert_builds(METHODS[cfg.method].from_config(cfg), cfg)


def test_subcommand_parser():
    from medfm.cli import resolve_handler
    from medfm.pretrain.cli import add_parser
    from medfm.pretrain.main import run

    parser = argparse.ArgumentParser(prog="medfm")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "--config", "r.yaml", "optim.base_lr=1e-4", "train.seed=3"])
    assert (
        resolve_handler(args.handler) is run
        and args.config == "r.yaml"
        and args.overrides == ["optim.base_lr=1e-4", "train.seed=3"]
    )
