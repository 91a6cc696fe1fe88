"""Each objective: its loss against the reference it wraps, shapes, one backward, EMA / freeze hooks, and a
loss that decreases over a few optimizer steps on a fixed batch of real PneumoniaMNIST images."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, NTXentLoss
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import default_collate

from medfm.data_shards.specs import MedMNISTDataset
from medfm.pretrain.backbones import build_backbone, pooled_features
from medfm.pretrain.config import derive, load_config
from medfm.pretrain.methods import DINO, MAE, METHODS, MoCo, SSLMethod
from medfm.pretrain.methods.moco import MoCoV3Loss


def vit(**kwargs) -> nn.Module:
    return build_backbone("vit_tiny_patch16_224", img_size=28, in_chans=1, patch_size=7, depth=2, **kwargs)


@dataclass
class Tiny:
    """A method as ``from_config`` builds it at its ``tiny_config`` size (100 steps), with its config."""

    model: SSLMethod
    cfg: DictConfig

    @property
    def side(self) -> int:
        return self.cfg.data.img_size

    def views(self, images: torch.Tensor | None = None, batch: int = 8) -> list[torch.Tensor]:
        """A batch of the method's own views (its ``build_transform`` and loader collate, as the engine gets them)
        of ``images`` (N, C, H, W) in [0, 1]; random images by default."""
        if images is None:
            images = torch.rand(batch, 1, self.side, self.side)
        transform = type(self.model).build_transform(self.cfg)
        collate = getattr(transform, "collate", default_collate)
        return collate([{"views": transform(image)} for image in images])["views"]


@pytest.fixture
def tiny(pretrain_overrides, tmp_path):
    """``tiny(method, backbone=None, **overrides) -> Tiny``: no per-method code, only each method's tiny_config."""

    def build(method: str, backbone: dict[str, object] | None = None, **overrides: object) -> Tiny:
        values = {"data.samples_per_epoch": 800, **overrides}  # 100 steps of 8 images
        cfg = load_config(None, pretrain_overrides(method, "medmnist:unused.npz", tmp_path, backbone, **values))
        cfg = derive(cfg, world_size=1, dataset_size=800)
        return Tiny(METHODS[method].from_config(cfg), cfg)

    return build


def test_registry_is_the_seven_methods():
    assert set(METHODS) == {"mae", "dino", "simclr", "moco", "dinov2", "distill", "spark"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forward_backward_and_export(method, tiny):
    torch.manual_seed(0)
    method_at_tiny_size = tiny(method)
    model = method_at_tiny_size.model
    out = model(method_at_tiny_size.views(), step=0)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    exported = model.export_backbone()
    width, side = exported.num_features, method_at_tiny_size.side
    assert out["embeddings"].shape == (8, width) and not out["embeddings"].requires_grad
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable parameters without gradient (DDP would fail): {no_grad}"
    assert pooled_features(exported, torch.randn(2, 1, side, side)).shape == (2, width)


def test_mae_rejects_a_cnn_clearly():
    with pytest.raises(ValueError, match="VisionTransformer"):
        MAE(build_backbone("resnet18", img_size=28))


def test_mae_loss_is_mse_on_normalised_masked_patches(tiny):
    torch.manual_seed(0)
    model = tiny("mae").model
    images = torch.randn(4, 1, 28, 28)
    torch.manual_seed(1)
    loss = model([images], step=0)["loss"]
    torch.manual_seed(1)
    idx_keep, idx_mask = model.random_mask(4, images.device)
    assert idx_keep.shape == (4, 1 + 4) and idx_mask.shape == (4, 12)  # 16 patches, ratio 0.75, + class token
    assert (idx_keep[:, 0] == 0).all()
    prediction, _ = model.reconstruct(images, idx_keep, idx_mask)
    patches = images.unfold(2, 7, 7).unfold(3, 7, 7).reshape(4, 16, 49)  # (B, 4x4 grid, 7*7), C = 1
    target = patches.gather(1, (idx_mask - 1)[..., None].expand(-1, -1, 49))
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(loss, ((prediction - target) ** 2).mean(), atol=1e-6)


def test_mae_figure_grid(tiny):
    grid = tiny("mae").model.figures([torch.randn(3, 1, 28, 28)])["mae_reconstruction"]
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1


def test_dino_loss_matches_lightly(tiny):
    torch.manual_seed(0)
    dino = tiny("dino")
    model = dino.model
    model.teacher_temp_schedule = np.array([0.04, 0.05, 0.06])
    views = dino.views()
    reference = DINOLoss(output_dim=128, student_temp=0.1, center_momentum=0.9)
    reference.center.copy_(torch.randn_like(reference.center))
    model.criterion.center.copy_(reference.center)
    loss = model(views, step=2)["loss"]
    with torch.no_grad():
        teacher = [model.teacher_head(pooled_features(model.teacher_backbone, v)) for v in views[:2]]
    student = [model.student_head(pooled_features(model.student_backbone, v)) for v in views]
    expected = reference(teacher, student, teacher_temp=0.06)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(model.criterion.center, reference.center, atol=1e-6)  # center updated the same way


def test_dino_works_with_a_cnn(tiny):
    dino = tiny("dino", backbone={"model.backbone": "resnet18"})
    out = dino.model(dino.views(), step=0)
    assert out["embeddings"].shape == (8, 512) and torch.isfinite(out["loss"])


def test_dino_teacher_starts_equal_and_follows_the_ema(tiny):
    torch.manual_seed(0)
    model = tiny("dino").model
    model.momentum_schedule = np.array([0.5])
    for s, t in zip(model.student_head.parameters(), model.teacher_head.parameters(), strict=True):
        assert torch.equal(s, t)
    teacher_before = copy.deepcopy(model.teacher_backbone.state_dict())
    with torch.no_grad():
        for p in model.student_backbone.parameters():
            p.add_(1.0)
    model.update_momentum(step=0)
    for name, t in model.teacher_backbone.named_parameters():
        s = dict(model.student_backbone.named_parameters())[name]
        assert torch.allclose(t, 0.5 * teacher_before[name] + 0.5 * s)
    assert not any(p.requires_grad for p in model.teacher_backbone.parameters())


def test_dino_last_layer_is_frozen_for_the_first_steps(tiny):
    views = tiny("dino").views()
    model = DINO(vit(dynamic_img_size=True), [0.99] * 4, [0.04] * 4, 2, 64, 32, 128)
    for step, frozen in [(0, True), (1, True), (2, False)]:
        model.zero_grad()
        model(views, step=step)["loss"].backward()
        model.before_optimizer_step(step)
        assert (model.student_head.last_layer.weight_v.grad is None) == frozen
        assert model.student_head.layers[0].weight.grad is not None


def test_simclr_loss_matches_lightly_ntxent(tiny):
    torch.manual_seed(0)
    simclr = tiny("simclr")
    model, views = simclr.model, simclr.views()
    loss = model(views, step=0)["loss"]
    z0, z1 = model.projection_head(pooled_features(model.backbone, torch.cat(views))).chunk(2)
    assert torch.allclose(loss, NTXentLoss(temperature=0.1)(z0, z1), atol=1e-6)


def test_moco_v3_loss_matches_a_naive_reference():
    torch.manual_seed(0)
    q, k, tau = torch.randn(6, 16), torch.randn(6, 16), 0.2
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    terms = [-torch.log_softmax(torch.stack([qn[i] @ kn[j] / tau for j in range(6)]), 0)[i] for i in range(6)]
    assert torch.allclose(MoCoV3Loss(tau)(q, k), 2 * tau * torch.stack(terms).mean(), atol=1e-6)


def test_moco_is_symmetric_and_momentum_encoder_moves(tiny):
    torch.manual_seed(0)
    moco = tiny("moco")
    model, views = moco.model, moco.views()
    model.momentum_schedule = np.array([0.0])
    loss = model(views, step=0)["loss"]
    swapped = model(views[::-1], step=0)["loss"]
    assert torch.allclose(loss, swapped, atol=1e-5)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.1)
    model.update_momentum(step=0)  # momentum 0: the key encoder becomes the query encoder
    for p, m in zip(model.backbone.parameters(), model.backbone_momentum.parameters(), strict=True):
        assert torch.equal(p, m)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_decreases_on_a_fixed_real_batch(method, pneumonia, tiny):
    """12 AdamW steps on one batch of real images with fixed views (the method's own, drawn once): the loss must go
    down."""
    dataset = MedMNISTDataset(pneumonia)
    torch.manual_seed(0)
    method_at_tiny_size = tiny(method)
    model = method_at_tiny_size.model
    side = method_at_tiny_size.side
    images = F.interpolate(torch.stack([dataset[i]["image"] for i in range(16)]), size=side, mode="bilinear")
    views = method_at_tiny_size.views(images.clamp(0, 1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(0)  # masked modeling: the same mask every step
        random.seed(0)
        loss = model(views, step=step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        model.before_optimizer_step(step)
        optimizer.step()
        model.update_momentum(step)
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


@pytest.mark.parametrize(
    ("method", "teacher_name", "student_name"),
    [("dino", "teacher_backbone", "student_backbone"), ("moco", "backbone_momentum", "backbone")],
)
def test_the_ema_targets_are_deterministic_with_drop_path(method, teacher_name, student_name, tiny):
    """The student keeps its drop path; the teacher / momentum encoder has none (DINO builds its teacher without
    it): two passes of the teacher on one input in training mode give the same targets."""
    model = tiny(method, **{"model.drop_path_rate": 0.5}).model.train()
    teacher, student = getattr(model, teacher_name), getattr(model, student_name)
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(pooled_features(teacher, images), pooled_features(teacher, images))
        assert not torch.equal(pooled_features(student, images), pooled_features(student, images))
    assert teacher.state_dict().keys() == student.state_dict().keys()


def test_moco_heads_follow_the_reference_build_mlp(tiny):
    """moco/builder.py: bias-free linears, a final BatchNorm1d(affine=False) on the projector and, for ViTs only,
    on the predictor (``_build_mlp(..., last_bn=True)``); 3 projector layers for ViTs, 2 for ResNets."""
    vit_moco = tiny("moco").model
    last = list(vit_moco.prediction_head.modules())[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine
    assert isinstance(list(vit_moco.projection_head.modules())[-1], nn.BatchNorm1d)
    assert sum(isinstance(m, nn.Linear) for m in vit_moco.projection_head.modules()) == 3
    assert all(m.bias is None for m in vit_moco.modules() if isinstance(m, nn.Linear) and m.out_features in (32, 64))
    cnn_moco = MoCo(build_backbone("resnet18", 32, 1), [0.99], hidden_dim=64, output_dim=32)
    assert isinstance(list(cnn_moco.prediction_head.modules())[-1], nn.Linear)
    assert sum(isinstance(m, nn.Linear) for m in cnn_moco.projection_head.modules()) == 2
