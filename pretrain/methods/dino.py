"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", 2021), after facebookresearch/dino and lightly's example.

Student and teacher share the architecture; the teacher is an EMA of the student with a cosine momentum
schedule to 1.0 and sees only the global crops; the student sees all crops. lightly's ``DINOProjectionHead``
and ``DINOLoss`` (centering, teacher temperature given per step). Works with any timm backbone: ViTs are built
with ``dynamic_img_size`` so the local crops reuse the interpolated position embedding.
``centering: sinkhorn_knopp`` replaces the running centre by DINOv2's Sinkhorn-Knopp targets
(``SinkhornKnoppDINOLoss``; DINOv2 imports it from here for both of its losses).
Deviation: no solarization in the views (meaningless on gray-level images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import torch
from lightly.loss import DINOLoss
from lightly.loss.capi_loss import sinkhorn_knopp as capi_sinkhorn_knopp
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F

from medfm.pretrain.backbones import pooled_features
from medfm.pretrain.methods.auto_settings import AUTO, check_auto_numbers, resolve_teacher_auto
from medfm.pretrain.methods.base import (
    TINY_VIT,
    LastLayerFreeze,
    SSLMethod,
    at_step,
    backbone_from_config,
    check_local_crops,
    deterministic_copy,
    multi_crop_from_config,
    outside_autocast,
    teacher_schedules,
)
from medfm.pretrain.transforms import MultiView

NUM_GLOBAL_CROPS = 2


class Centering(str, Enum):
    """How the teacher's outputs become its targets (DINOv2's ``train.centering``)."""

    mean = "mean"  # softmax around a running mean of the teacher outputs (DINO; lightly's losses)
    sinkhorn_knopp = "sinkhorn_knopp"  # 3 Sinkhorn-Knopp iterations per batch, no centre (DINOv2's large-data recipes)


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_logits: Tensor, teacher_temp: float, iterations: int = 3) -> Tensor:
    """(N, K) teacher logits of this process -> (N, K) fp32 targets, each row a distribution over the K prototypes,
    the prototypes used equally over the samples of all processes: DINOv2's ``sinkhorn_knopp_teacher``
    (``loss/dino_clstoken_loss.py``, ``loss/ibot_patch_loss.py``), 3 iterations in fp32, the per-prototype sums
    all-reduced across processes when torch.distributed is initialised (one process: no all-reduce).

    The iterations are lightly's CAPI ``sinkhorn_knopp`` at one position: the reference's algorithm without its
    total, K and sample-count factors, which are uniform and cancel in the next normalisation, with each
    prototype's logits shifted by their maximum over all processes (a factor per prototype that the prototype
    normalisation cancels; the reference's ``exp(logits / temp)`` overflows fp32 above 88 x temp, 3.5 at 0.04) and
    a 1e-8 guard in the divisions. Not lightly's SwaV / MSN ``sinkhorn``: they divide by this process's count x
    the world size, which is wrong when processes have different numbers of masked patches (iBOT; the reference
    all-reduces that count). Every process must call it, with N = 0 too: it joins the all-reduces."""
    logits = teacher_logits.float() / teacher_temp
    if len(logits):
        return capi_sinkhorn_knopp(logits.unsqueeze(1), iterations=iterations, gather_distributed=True).squeeze(1)
    # CAPI takes the maximum over this process's samples: one -inf row adds nothing to the sums; it is dropped
    nothing = torch.full((1, 1, logits.shape[1]), float("-inf"), device=logits.device)
    return capi_sinkhorn_knopp(nothing, iterations=iterations, gather_distributed=True)[:0, 0]


class SinkhornKnoppDINOLoss(DINOLoss):
    """lightly's ``DINOLoss`` (same arguments, call and cross-entropy) with the targets of
    :func:`sinkhorn_knopp_teacher` over the teacher outputs of all global crops together, as DINOv2 with
    ``train.centering: sinkhorn_knopp``, instead of a softmax around the running centre. No centre is kept: the
    inherited ``center`` buffer stays zero, so checkpoints of both modes have the same keys."""

    def forward(
        self,
        teacher_out: list[Tensor],
        student_out: list[Tensor],
        teacher_temp: float | None = None,
        epoch: int | None = None,  # lightly's signature; the temperature comes per step
    ) -> Tensor:
        """teacher_out: T x (B, K) logits, student_out: S x (B, K) logits -> the cross-entropy averaged over the
        (teacher view, student view) pairs of different indices and the batch, as lightly's ``DINOLoss``."""
        temperature = self.teacher_temp if teacher_temp is None else teacher_temp
        targets = sinkhorn_knopp_teacher(torch.cat(teacher_out), temperature).unflatten(0, (len(teacher_out), -1))
        log_probs = F.log_softmax(torch.stack(student_out) / self.student_temp, dim=-1)
        loss = -torch.einsum("tbk,sbk->ts", targets, log_probs)
        loss.fill_diagonal_(0)  # a view is not its own target
        pairs = loss.numel() - loss.diagonal().numel()
        return loss.sum() / (pairs * targets.shape[1])


def dino_loss(centering: Centering | str, output_dim: int, student_temp: float, center_momentum: float) -> DINOLoss:
    """DINO's class-token loss with the teacher targets ``centering`` asks for."""
    loss_class = SinkhornKnoppDINOLoss if Centering(centering) is Centering.sinkhorn_knopp else DINOLoss
    return loss_class(output_dim=output_dim, student_temp=student_temp, center_momentum=center_momentum)


def teacher_student_tiny_config(section: str) -> dict[str, Any]:
    """A DINO-family method's ``tiny_config``: the tiny ViT, small heads, 2 local crops of 14 px, no frozen last
    layer."""
    heads = {"head_hidden_dim": 64, "head_bottleneck_dim": 32, "head_output_dim": 128}
    crops = {"num_local_crops": 2, "local_crop_size": 14, "freeze_last_layer_epochs": 0}
    return {**TINY_VIT, **{f"{section}.{key}": value for key, value in {**heads, **crops}.items()}}


@dataclass
class TeacherStudentConfig:
    """The keys DINO and DINOv2 share: projection heads, multi-crop, temperatures, the teacher's momentum and
    centering (defaults: DINO's; ``DINOv2Config`` changes the local crops)."""

    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    # "auto" (medfm.pretrain.methods.auto_settings): from the image count, global batch and run length, as LightlyTrain;
    # the references' ImageNet values: 65536 prototypes, temperature 0.04 -> 0.07 over 30 epochs, momentum 0.996
    # (DINO ViT-S/16) / 0.992 (DINOv2)
    head_output_dim: int | str = AUTO
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_crop_size: int = 96  # ViTs: a multiple of the patch size; global crops use augment.crop_scale
    num_local_crops: int = 8
    student_temp: float = 0.1
    teacher_temp: int | float | str = AUTO  # reached after the warm-up
    warmup_teacher_temp: int | float | str = AUTO
    warmup_teacher_temp_epochs: int | float | str = AUTO
    center_momentum: float = 0.9  # running centre(s) (centering: mean)
    # mean (the references' default) or sinkhorn_knopp (DINOv2's large-data recipes; no running centre)
    centering: Centering = Centering.mean
    momentum_teacher: int | float | str = AUTO  # cosine schedule from this to 1.0 over training
    freeze_last_layer_epochs: float = 1.0


@dataclass
class DINOConfig(TeacherStudentConfig):
    """The ``dino:`` config section."""

    head_batch_norm: bool = False
    norm_last_layer: bool = True


class DINO(SSLMethod):
    """DINO student/teacher.

    Args:
        backbone: any timm model without classifier (``num_features`` wide pooled output).
        momentum_schedule: teacher EMA momentum per optimizer step.
        teacher_temp_schedule: teacher softmax temperature per optimizer step.
        freeze_last_layer_steps: the head's last layer gets no update for this many first steps.
        head_*: ``DINOProjectionHead`` sizes; ``head_batch_norm`` is an option for CNNs.
        centering: the teacher targets: softmax around a running centre (``mean``) or Sinkhorn-Knopp.
    """

    Config = DINOConfig
    description = "DINO self-distillation (Caron et al. 2021); released: the EMA teacher backbone"
    tiny_config: ClassVar[dict[str, Any]] = teacher_student_tiny_config("dino")

    @staticmethod
    def check_config(section, need) -> None:
        scale = list(section.local_crop_scale)
        need(len(scale) == 2 and scale[0] <= scale[1], "local_crop_scale", "must be [low, high]")
        check_auto_numbers(section, need)

    @staticmethod
    def resolve_auto(cfg: DictConfig, dataset_size: int) -> list[str]:
        return resolve_teacher_auto(cfg, "dino", dataset_size)

    momentum_modules = ("teacher_backbone", "teacher_head")

    def __init__(
        self,
        backbone: nn.Module,
        momentum_schedule: Sequence[float] | np.ndarray,
        teacher_temp_schedule: Sequence[float] | np.ndarray,
        freeze_last_layer_steps: int = 0,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_output_dim: int = 65536,
        head_batch_norm: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: Centering | str = Centering.mean,
    ):
        super().__init__()
        head_args = (backbone.num_features, head_hidden_dim, head_bottleneck_dim, head_output_dim, head_batch_norm)
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(*head_args, norm_last_layer=norm_last_layer)
        # The teacher starts as an exact copy of the student (DINO main_dino.py: load_state_dict), without drop
        # path: a stochastic teacher would give noisy targets.
        self.teacher_backbone = deterministic_copy(backbone)
        self.teacher_head = DINOProjectionHead(*head_args, norm_last_layer=norm_last_layer)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = dino_loss(centering, head_output_dim, student_temp, center_momentum)
        self.momentum_schedule = np.asarray(momentum_schedule, dtype=np.float64)
        self.teacher_temp_schedule = np.asarray(teacher_temp_schedule, dtype=np.float64)
        self.last_layer = LastLayerFreeze(list(self.student_head.last_layer.parameters()), freeze_last_layer_steps)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        """views: 2 global (B, C, H, W) then N local (B, C, h, w) -> loss over all (teacher, student) pairs
        of different views (lightly's ``DINOLoss``), embeddings: teacher features of the first global view."""
        batch_size = views[0].shape[0]
        self.last_layer.set_step(step)
        global_views = torch.cat(views[:NUM_GLOBAL_CROPS])
        with torch.no_grad():
            teacher_features = pooled_features(self.teacher_backbone, global_views)
            teacher_out = self.teacher_head(teacher_features).chunk(NUM_GLOBAL_CROPS)
        features = [pooled_features(self.student_backbone, global_views)]
        if len(views) > NUM_GLOBAL_CROPS:
            features.append(pooled_features(self.student_backbone, torch.cat(views[NUM_GLOBAL_CROPS:])))
        student_out = self.student_head(torch.cat(features)).chunk(len(views))
        teacher_temp = at_step(self.teacher_temp_schedule, step)
        with outside_autocast(global_views.device):  # the centre is averaged and all-reduced in fp32
            teacher_fp32, student_fp32 = [t.float() for t in teacher_out], [s.float() for s in student_out]
            loss = self.criterion(teacher_fp32, student_fp32, teacher_temp=teacher_temp)
        return {
            "loss": loss,
            "embeddings": teacher_features[:batch_size].detach(),
            "teacher_temp": torch.tensor(teacher_temp),
        }

    def before_optimizer_step(self, step: int) -> None:
        self.last_layer.before_optimizer_step(step)

    @torch.no_grad()
    def update_momentum(self, step: int) -> None:
        momentum = at_step(self.momentum_schedule, step)
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)

    def export_backbone(self) -> nn.Module:
        return self.teacher_backbone

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DINO:
        d = cfg.dino
        backbone = backbone_from_config(cfg, dynamic_img_size=d.num_local_crops > 0)
        check_local_crops(backbone, cfg, "dino")
        return cls(
            backbone,
            **teacher_schedules(cfg, "dino"),
            head_hidden_dim=d.head_hidden_dim,
            head_bottleneck_dim=d.head_bottleneck_dim,
            head_output_dim=d.head_output_dim,
            head_batch_norm=d.head_batch_norm,
            norm_last_layer=d.norm_last_layer,
            student_temp=d.student_temp,
            center_momentum=d.center_momentum,
            centering=d.centering,
        )

    @staticmethod
    def build_transform(cfg: DictConfig) -> MultiView:
        return multi_crop_from_config(cfg, "dino", NUM_GLOBAL_CROPS)
