"""timm backbones by name, native 1-channel input, public interface only."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from medfm.pretrain.backbones import (
    build_backbone,
    feature_function,
    is_vit,
    layer_features,
    pooled_features,
    use_uniform_drop_path,
)
from medfm.pretrain.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "width"),
    [
        ("vit_tiny_patch16_224", {"patch_size": 8, "depth": 2}, 32, 192),
        ("resnet18", {}, 32, 512),
    ],
)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_pooled_features(name, kwargs, size, width, in_chans):
    backbone = build_backbone(name, img_size=size, in_chans=in_chans, **kwargs)
    assert backbone.num_features == width
    out = pooled_features(backbone, torch.rand(2, in_chans, size, size))
    assert out.shape == (2, width)
    out.sum().backward()


def test_one_channel_stem_is_native():
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, in_chans=1, patch_size=8, depth=1)
    assert backbone.patch_embed.proj.in_channels == 1 and is_vit(backbone)
    assert not is_vit(build_backbone("resnet18", img_size=32, in_chans=1))


def test_dynamic_img_size_vit_takes_smaller_crops():
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, dynamic_img_size=True)
    assert pooled_features(backbone, torch.rand(2, 1, 16, 16)).shape == (2, 192)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("vit_does_not_exist", img_size=32)


def test_bad_timm_kwarg_is_not_swallowed():
    with pytest.raises(TypeError, match="not_an_arg"):
        build_backbone("resnet18", img_size=32, not_an_arg=1)


def test_layer_features_concatenate_the_last_blocks_of_a_vit():
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3).eval()
    images = torch.rand(2, 1, 32, 32)
    features = layer_features(backbone, images, layers=2)
    assert features.shape == (2, 3 * 192)  # class token of 2 blocks + mean patch token of the last
    # the last block's class token, normed, is what the head pools
    assert torch.allclose(features[:, 192:384], pooled_features(backbone, images), atol=1e-5)
    assert layer_features(backbone, images, layers=9).shape == (2, 4 * 192)  # capped at the model's depth


def test_layer_features_pool_each_stage_of_a_cnn():
    backbone = build_backbone("resnet18", img_size=32).eval()
    images = torch.rand(2, 1, 32, 32)
    features = layer_features(backbone, images, layers=2)
    assert features.shape == (2, 256 + 512)
    assert torch.allclose(features[:, 256:], pooled_features(backbone, images), atol=1e-5)
    assert feature_function("head") is pooled_features
    with pytest.raises(ValueError, match="pooling"):
        feature_function("max")


def test_uniform_drop_path_gives_every_block_the_rate_and_keeps_the_weights(tiny, tmp_path):
    from medfm.pretrain.config import derive, load_config
    from medfm.pretrain.methods import METHODS

    ramp = build_backbone("vit_tiny_patch16_224", 28, patch_size=7, depth=3, drop_path_rate=0.2)
    assert not isinstance(ramp.blocks[0].drop_path1, DropPath)  # timm: 0 at the first block ...
    assert ramp.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)  # ... rising to the rate at the last
    uniform = use_uniform_drop_path(
        build_backbone("vit_tiny_patch16_224", 28, patch_size=7, depth=3, drop_path_rate=0.2), 0.2
    )
    for block in uniform.blocks:
        assert all(isinstance(m, DropPath) and m.drop_prob == 0.2 for m in (block.drop_path1, block.drop_path2))
    assert uniform.state_dict().keys() == ramp.state_dict().keys()
    # through the config: the DINOv2 student drops uniformly, its EMA teacher not at all
    overrides = tiny("dinov2", tmp_path, **{"model.drop_path_rate": 0.1, "model.drop_path_uniform": True})
    model = METHODS["dinov2"].from_config(derive(load_config(None, overrides), world_size=1, dataset_size=64))
    student, teacher = (getattr(model, name) for name in ("student_backbone", "teacher_backbone"))
    student, teacher = getattr(student, "vit", student), getattr(teacher, "vit", teacher)
    assert [b.drop_path1.drop_prob for b in student.blocks] == pytest.approx([0.1, 0.1])
    assert all(b.drop_path1.drop_prob == 0.0 for b in teacher.blocks)
    with pytest.raises(ConfigError, match=r"'model\.drop_path_uniform': applies to ViTs"):
        use_uniform_drop_path(build_backbone("resnet18", 28), 0.1)
