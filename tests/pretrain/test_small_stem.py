"""medfm's small-image stem for timm ResNets (SimCLR's CIFAR stem): a 4x4 final map at 28 px, timm's keys, and a
release that medfm's loader (and plain timm with the documented two lines) rebuilds exactly."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from medfm.downstream.load import load_backbone
from medfm.pretrain.backbones import build_backbone, pooled_features
from medfm.pretrain.config import derive, load_config
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.methods import METHODS
from medfm.pretrain.release import write_run_release
from medfm.pretrain.runs import run_backbone


def test_at_28_px_the_stem_keeps_a_4x4_final_map_where_timms_stem_leaves_1x1():
    images = torch.rand(2, 1, 28, 28)
    imagenet_stem = build_backbone("resnet18", 28, 1)
    small_stem = build_backbone("resnet18", 28, 1, small_image_stem=True)
    assert imagenet_stem.forward_features(images).shape == (2, 512, 1, 1)
    assert small_stem.forward_features(images).shape == (2, 512, 4, 4)
    assert pooled_features(small_stem, images).shape == (2, 512)


def test_the_state_dict_keys_are_timms_and_only_conv1_changes_shape():
    imagenet_stem = build_backbone("resnet18", 28, 1).state_dict()
    small_stem = build_backbone("resnet18", 28, 1, small_image_stem=True).state_dict()
    assert list(small_stem) == list(imagenet_stem)
    changed = {k: (imagenet_stem[k].shape, v.shape) for k, v in small_stem.items() if v.shape != imagenet_stem[k].shape}
    assert changed == {"conv1.weight": ((64, 1, 7, 7), (64, 1, 3, 3))}


@pytest.mark.parametrize(("name", "value"), [("resnet18d", True), ("convnext_atto", True), ("resnet18", "yes")])
def test_a_cnn_without_a_plain_resnet_stem_or_a_non_boolean_is_refused(name, value):
    with pytest.raises(ConfigError, match="small_image_stem"):
        build_backbone(name, 32, 1, small_image_stem=value)


def test_a_vit_ignores_the_stem_and_its_release_does_not_record_it(pretrain_overrides, tmp_path):
    """As CNNs ignore img_size: a ResNet recipe run with a ViT (``model.backbone=vit_...``) keeps working."""
    stem = {"model.backbone_kwargs.small_image_stem": True}
    cfg = derive(load_config(None, pretrain_overrides("simclr", "medmnist:x.npz", tmp_path, **stem)), 1, 32)
    torch.manual_seed(0)
    run = run_backbone(METHODS["simclr"].from_config(cfg), cfg, step=0, checkpoint=None)
    release = write_run_release(run, tmp_path / "release", run_dir=tmp_path)
    assert "small_image_stem" not in json.loads((release / "config.json").read_text())["model_args"]


def test_a_release_of_a_stem_run_loads_back_strictly_with_the_same_features(pretrain_overrides, tmp_path):
    backbone = {"model.backbone": "resnet18", "model.backbone_kwargs.small_image_stem": True}
    overrides = pretrain_overrides("simclr", "medmnist:pneumoniamnist.npz", tmp_path, backbone)
    cfg = derive(load_config(None, overrides), 1, 32)
    torch.manual_seed(0)
    run = run_backbone(METHODS["simclr"].from_config(cfg), cfg, step=0, checkpoint=None)
    release = write_run_release(run, tmp_path / "release", run_dir=tmp_path)

    config = json.loads((release / "config.json").read_text())
    assert config["model_args"] == {"in_chans": 1, "small_image_stem": True}
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = pooled_features(run.backbone, images)
        loaded = load_backbone(release)  # strict: every key checked, none new
        assert loaded.load_report.new_keys == () and loaded.conv1.kernel_size == (3, 3)
        torch.testing.assert_close(pooled_features(loaded.eval(), images), expected)

        # plain timm: the two lines that the configs' README and the model card give
        plain = timm.create_model("resnet18", num_classes=0, in_chans=1)
        plain.conv1 = torch.nn.Conv2d(1, plain.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        plain.maxpool = torch.nn.Identity()
        plain.load_state_dict(load_file(release / "model.safetensors"), strict=True)
        torch.testing.assert_close(pooled_features(plain.eval(), images), expected)
    assert "model.maxpool = torch.nn.Identity()" in (release / "README.md").read_text()
