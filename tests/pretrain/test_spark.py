"""SparK: the sparse emulation against a reference (a masked 1x1 conv + BatchNorm equals the layers applied to the
visible positions alone, statistics included), dense behaviour without a mask, the loss against a naive loop, the
grid checks, and a release that loads into a plain timm CNN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medfm.pretrain.backbones import build_backbone
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.methods.spark import MaskState, SparK, SparseBatchNorm2d, sparsify


def conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, kernel_size=1), nn.BatchNorm2d(5, momentum=0.5))


def test_a_masked_1x1_conv_and_batchnorm_equal_the_layers_on_the_visible_positions_only():
    dense = conv_bn()
    state = MaskState()
    sparse = sparsify(copy.deepcopy(dense), state)
    assert isinstance(sparse[1], SparseBatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    state.active = torch.tensor([[[[1, 0], [0, 1]]], [[[0, 1], [1, 1]]]], dtype=torch.bool)  # (B, 1, 2, 2) cells
    visible = state.at(8)[:, 0]  # (B, 8, 8)
    out = sparse(x * visible[:, None])
    # the reference: only the visible pixels exist, as a (N, C) table; the conv is a matrix product and the
    # BatchNorm a BatchNorm1d over those N rows
    rows = x.permute(0, 2, 3, 1)[visible]
    conv = dense[0]
    reference_bn = nn.BatchNorm1d(5, momentum=0.5)
    reference_bn.load_state_dict(dense[1].state_dict())
    expected = reference_bn(rows @ conv.weight[:, :, 0, 0].T + conv.bias)
    assert torch.allclose(out.permute(0, 2, 3, 1)[visible], expected, atol=1e-5)
    assert out.permute(0, 2, 3, 1)[~visible].abs().max() == 0  # masked positions stay empty
    # running statistics from the visible positions only
    assert torch.allclose(sparse[1].running_mean, reference_bn.running_mean, atol=1e-6)
    assert torch.allclose(sparse[1].running_var, reference_bn.running_var, atol=1e-5)
    # and they differ from statistics over every position (the zeros would pull them)
    assert not torch.allclose(dense[1](dense[0](x * visible[:, None])), out, atol=1e-3)


def test_without_a_mask_the_sparse_encoder_computes_as_the_dense_one():
    dense = build_backbone("resnet18", img_size=32, in_chans=1, small_image_stem=True).eval()
    sparse = sparsify(copy.deepcopy(dense), MaskState()).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(dense(x), sparse(x))
    assert set(dense.state_dict()) == set(sparse.state_dict())  # same keys: the release is the plain model


def test_the_loss_is_the_mse_on_masked_patches_against_normalised_pixels():
    torch.manual_seed(0)
    model = SparK(build_backbone("resnet18", img_size=32, in_chans=1, small_image_stem=True), 32, decoder_width=32)
    images, reconstruction = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    active = model.random_mask(3, images.device)
    assert active.shape == (3, 1, 4, 4) and int(active[0].sum()) == model.num_keep == round(16 * 0.4)
    total, count = 0.0, 0
    for b in range(3):
        for i in range(4):
            for j in range(4):
                if active[b, 0, i, j]:
                    continue
                patch = images[b, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].flatten()
                target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
                predicted = reconstruction[b, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].permute(1, 2, 0).flatten()
                target = target.view(1, 8, 8).permute(1, 2, 0).flatten()
                total += float(((predicted - target) ** 2).mean())
                count += 1
    assert float(model.loss(images, reconstruction, active)) == pytest.approx(total / count, rel=1e-5)
    assert torch.equal(model.unpatchify(model.patchify(images)), images)


def test_the_input_must_tile_a_power_of_2_grid_and_a_vit_is_refused():
    with pytest.raises(ConfigError, match=r"data\.img_size"):
        SparK(build_backbone("resnet18", img_size=28, in_chans=1, small_image_stem=True), 28)
    with pytest.raises(ConfigError, match="mae"):
        SparK(build_backbone("vit_tiny_patch16_224", img_size=32, in_chans=1, patch_size=8), 32)


def test_convnext_trains_with_layernorm_densify_and_its_unreached_head_norm_frozen():
    torch.manual_seed(0)
    model = SparK(build_backbone("convnext_atto", img_size=64, in_chans=1), 64, decoder_width=32)
    assert model.densify_norm == "ln" and (model.downsample, model.grid, model.levels) == (32, 2, 4)
    out = model([torch.randn(2, 1, 64, 64)], step=0)
    out["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        "encoder.head.norm.weight",
        "encoder.head.norm.bias",
    }


def test_a_spark_release_loads_into_a_plain_timm_cnn(pretrain_overrides, medmnist, tmp_path):
    from medfm.downstream.load import load_backbone
    from medfm.pretrain.main import pretrain

    run = tmp_path / "spark"
    assert pretrain(None, pretrain_overrides("spark", f"medmnist:{medmnist('pneumoniamnist')}", run)) == 0
    model = load_backbone(run / "release")
    assert not any(isinstance(m, SparseBatchNorm2d) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    plain = build_backbone("resnet18", img_size=32, in_chans=1, small_image_stem=True)
    plain.load_state_dict(model.state_dict(), strict=True)
