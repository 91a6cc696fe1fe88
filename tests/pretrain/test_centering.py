"""Sinkhorn-Knopp centering (``dino.centering`` / ``dinov2.centering: sinkhorn_knopp``) against a naive copy of
DINOv2's ``sinkhorn_knopp_teacher`` (``loss/dino_clstoken_loss.py``, ``loss/ibot_patch_loss.py``).

One process: torch.distributed is not initialised, so the all-reduces of the sums are skipped (as in the
reference); the 3-process gloo test (slow) checks that they make each rank's targets those of the full batch.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medfm.pretrain.backbones import build_backbone
from medfm.pretrain.methods import DINO, DINOv2
from medfm.pretrain.methods.dino import Centering, SinkhornKnoppDINOLoss, sinkhorn_knopp_teacher


def reference_sinkhorn_knopp(
    logits: np.ndarray, teacher_temp: float, n_masked_patches: int | None = None, n_iterations: int = 3
) -> np.ndarray:
    """DINOv2's ``sinkhorn_knopp_teacher`` line by line in float64, one process: B is the number of samples
    (``dino_clstoken_loss.py``) or the given number of masked patches (``ibot_patch_loss.py``)."""
    Q = np.exp(logits.astype(np.float64) / teacher_temp).T  # K x B
    B = Q.shape[1] if n_masked_patches is None else n_masked_patches
    K = Q.shape[0]
    Q /= np.sum(Q)
    for _ in range(n_iterations):
        Q /= np.sum(Q, axis=1, keepdims=True)  # total weight per prototype must be 1/K
        Q /= K
        Q /= np.sum(Q, axis=0, keepdims=True)  # total weight per sample must be 1/B
        Q /= B
    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.T


def naive_dino(targets: list[torch.Tensor], student: list[torch.Tensor], s_temp: float) -> torch.Tensor:
    """DINO's cross-entropy over every (teacher global view, student view) pair of different crops."""
    total, pairs = 0.0, 0
    for i, target in enumerate(targets):
        for v, s in enumerate(student):
            if v != i:
                total = total + (-(target * F.log_softmax(s / s_temp, dim=-1)).sum(-1)).mean()
                pairs += 1
    return total / pairs


@pytest.mark.parametrize(("samples", "prototypes", "temp"), [(24, 50, 0.07), (16, 128, 0.04), (7, 5, 0.1)])
def test_sinkhorn_knopp_equals_the_references_three_iterations(samples, prototypes, temp):
    logits = torch.randn(samples, prototypes, generator=torch.Generator().manual_seed(samples))
    targets = sinkhorn_knopp_teacher(logits, temp)
    expected = reference_sinkhorn_knopp(logits.numpy(), temp)
    assert targets.dtype == torch.float32
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-4, atol=1e-8)  # fp32 against float64
    np.testing.assert_allclose(targets.sum(1).numpy(), 1.0, rtol=1e-5)  # each sample's targets: a distribution
    # iBOT's variant divides by the number of masked patches: a uniform factor, the same targets
    np.testing.assert_allclose(reference_sinkhorn_knopp(logits.numpy(), temp, n_masked_patches=samples), expected)


def test_sinkhorn_knopp_is_fp32_and_finite_where_the_references_exp_overflows():
    """bf16 logits are computed on in fp32; logits above 88 x temp (a head whose weight norm grew) overflow the
    reference's fp32 exp, while the per-prototype shift gives the float64 reference's targets."""
    logits = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.3 + 4  # ~100 at 0.04
    naive_fp32 = torch.exp(logits / 0.04)
    assert not torch.isfinite(naive_fp32).all()
    targets = sinkhorn_knopp_teacher(logits.bfloat16(), 0.04)
    expected = reference_sinkhorn_knopp(logits.bfloat16().float().numpy(), 0.04)
    assert targets.dtype == torch.float32 and torch.isfinite(targets).all()
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-4, atol=1e-8)


def test_no_samples_give_no_targets_without_error():
    assert sinkhorn_knopp_teacher(torch.zeros(0, 16), 0.07).shape == (0, 16)


def test_the_dino_loss_with_sinkhorn_knopp_targets_is_lightlys_formula_and_keeps_no_centre():
    torch.manual_seed(0)
    batch, views, k = 6, 4, 32
    teacher, student = list(torch.randn(2 * batch, k).chunk(2)), list(torch.randn(views * batch, k).chunk(views))
    loss = SinkhornKnoppDINOLoss(output_dim=k, student_temp=0.1)
    value = loss(teacher, student, teacher_temp=0.05)
    # the reference normalises the teacher outputs of both global crops together
    targets = torch.from_numpy(reference_sinkhorn_knopp(torch.cat(teacher).numpy(), 0.05)).float().chunk(2)
    assert float(value) == pytest.approx(float(naive_dino(list(targets), student, 0.1)), rel=1e-5)
    assert torch.equal(loss.center, torch.zeros(1, 1, k))


def tiny_vit(**kwargs) -> torch.nn.Module:
    return build_backbone("vit_tiny_patch16_224", img_size=28, in_chans=1, depth=2, patch_size=7, **kwargs)


def test_dinov2s_terms_use_sinkhorn_knopp_targets_in_fp32_under_a_bf16_autocast():
    torch.manual_seed(0)
    batch, views, k = 4, 4, 128
    teacher_cls, student_cls = torch.randn(2 * batch, k), torch.randn(views * batch, k)
    mask = torch.zeros(2 * batch, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = mask[3, 1:, 3] = mask[5, 0, :] = True
    teacher_patches, student_patches = torch.randn(int(mask.sum()), k), torch.randn(int(mask.sum()), k)
    args = (teacher_cls, student_cls, teacher_patches, student_patches, mask, torch.randn(2 * batch, 192))
    model = DINOv2(tiny_vit(dynamic_img_size=True), [0.99] * 10, [0.04] * 10, 0, 64, 32, k, centering="sinkhorn_knopp")
    terms = model.loss_terms(*args, num_views=views, teacher_temp=0.05)
    cls_targets = torch.from_numpy(reference_sinkhorn_knopp(teacher_cls.numpy(), 0.05)).float()
    dino = naive_dino(list(cls_targets.chunk(2)), list(student_cls.chunk(views)), 0.1)
    patch_targets = torch.from_numpy(reference_sinkhorn_knopp(teacher_patches.numpy(), 0.05, len(teacher_patches)))
    per_token = -(patch_targets.float() * F.log_softmax(student_patches / 0.1, -1)).sum(-1)
    image_of = torch.arange(len(mask)).view(-1, 1, 1).expand_as(mask)[mask]
    ibot = sum(per_token[image_of == b].mean() for b in image_of.unique()) / len(mask)
    assert terms["dino_loss"] == pytest.approx(float(dino), rel=1e-5)
    assert terms["ibot_loss"] == pytest.approx(float(ibot), rel=1e-5)
    assert not model.dino_loss.center.any() and not model.ibot_loss.center.value.any()  # no running centre
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.loss_terms(*args, num_views=views, teacher_temp=0.05)
    for name in ("dino_loss", "ibot_loss", "loss"):
        assert under_autocast[name].dtype == torch.float32
        assert float(under_autocast[name]) == pytest.approx(float(terms[name]), rel=1e-6)


def test_dinov2_and_dino_train_with_sinkhorn_knopp_even_without_masked_patches():
    torch.manual_seed(0)
    model = DINOv2(
        tiny_vit(dynamic_img_size=True), [0.99] * 10, [0.04] * 10, 0, 64, 32, 128, centering=Centering.sinkhorn_knopp
    )
    masks = torch.zeros(4, 2, 4, 4, dtype=torch.bool)
    out = model([torch.randn(4, 1, 28, 28)] * 2 + [masks], step=0)
    assert float(out["ibot_loss"]) == 0.0 and torch.isfinite(out["loss"].detach())
    out["loss"].backward()
    dino = DINO(tiny_vit(), [0.99] * 10, [0.04] * 10, 0, 64, 32, 128, centering="sinkhorn_knopp")
    out = dino([torch.randn(4, 1, 28, 28) for _ in range(2)], step=0)
    assert isinstance(dino.criterion, SinkhornKnoppDINOLoss) and torch.isfinite(out["loss"].detach())
    out["loss"].backward()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROWS_PER_RANK = (5, 0, 9)  # one rank without masked patches: it still joins the all-reduces


def gloo_worker(rank: int, port: int, logits: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(ROWS_PER_RANK))
    start = sum(ROWS_PER_RANK[:rank])
    out[rank] = sinkhorn_knopp_teacher(logits[start : start + ROWS_PER_RANK[rank]], 0.1)
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_all_reduced_sums_give_each_rank_the_targets_of_the_full_batch():
    """3 gloo processes with 5, 0 and 9 samples (iBOT's masked patches differ per rank): each rank's targets are
    its rows of the one-process targets over all 14."""
    logits = torch.randn(sum(ROWS_PER_RANK), 32, generator=torch.Generator().manual_seed(0))
    out = mp.Manager().dict()
    mp.spawn(gloo_worker, args=(free_port(), logits, out), nprocs=len(ROWS_PER_RANK), join=True)
    full = reference_sinkhorn_knopp(logits.numpy(), 0.1)
    got = torch.cat([out[rank] for rank in range(len(ROWS_PER_RANK))])
    np.testing.assert_allclose(got.numpy(), full, rtol=1e-4, atol=1e-8)
