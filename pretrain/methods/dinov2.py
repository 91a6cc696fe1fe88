"""DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", 2023).

Student / EMA teacher ViTs (lightly's ``MaskedVisionTransformerTIMM`` around a timm ViT, mask token included):
the teacher sees the two global crops unmasked; the student sees them with random block masks (``BlockMasks``:
half the global crops masked at 10-50 % of their patches by ``lightly.models.utils.random_block_mask_image``,
drawn per sample in the data pipeline as the reference draws them in its collate function) plus the local crops.
Loss = DINO loss on the class tokens (``DINOLoss``, every teacher global x student view pair of different crops)
+ iBOT loss on the masked patch tokens (``IBOTPatchLoss``'s centre and formula, fed precomputed per-token weights)
+ KoLeo on the student's global class tokens (``KoLeoLoss``), with ``DINOv2ProjectionHead`` heads (shared by both
losses unless ``ibot_separate_head``). As in the reference's collate, the loader's collate makes the masked
patches' indices on the host (``WithBlockMasks.collate``): the step picks the masked tokens with ``index_select``
and has no host sync (boolean-mask indexing would make the host wait for the GPU to count them). Teacher outputs
are centred by a running mean (lightly's losses) or, with ``centering: sinkhorn_knopp``, turned into targets by
Sinkhorn-Knopp as the reference's large-data recipes (``sinkhorn_knopp_teacher``, on lightly's CAPI helper:
lightly's DINO / iBOT losses have only the running mean); the teacher temperature warms up linearly; the teacher
follows the student by a cosine EMA schedule; the head's last layer is frozen for the first epoch. The student's
lr multipliers are the reference's (``dinov2_lr_scale``: layer-wise decay with the last block at ``layer_decay``,
the patch embedding x ``patch_embed_lr_mult``); drop path applies to the student only, by timm's linear rule
(the reference's ``drop_path_uniform`` would need per-block rates, which timm's ViT does not take).

Reference: facebookresearch/dinov2 ``train/ssl_meta_arch.py``; lightly's ``examples/pytorch/dinov2.py``.
Deviation: no solarization or colour jitter in the views (gray-level medical images).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from lightly.loss import IBOTPatchLoss, KoLeoLoss
from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
from lightly.models.utils import deactivate_requires_grad, random_block_mask_image, update_momentum
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from medfm.pretrain.backbones import is_vit
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.methods.auto_settings import check_auto_numbers, resolve_teacher_auto
from medfm.pretrain.methods.base import (
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
from medfm.pretrain.methods.dino import (
    NUM_GLOBAL_CROPS,
    Centering,
    TeacherStudentConfig,
    dino_loss,
    sinkhorn_knopp_teacher,
    teacher_student_tiny_config,
)
from medfm.pretrain.schedules import SQRT_1024
from medfm.pretrain.transforms import MultiView


@dataclass
class DINOv2Config(TeacherStudentConfig):
    """The ``dinov2:`` config section (defaults of the reference ViT-S/14 / ViT-B/14 recipes)."""

    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    local_crop_size: int = 98  # a multiple of the patch size (reference: 96 at patch 16 -> 98 at patch 14)
    ibot_separate_head: bool = False
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    mask_sample_probability: float = 0.5  # fraction of the global crops that get a block mask
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    layer_decay: float = 0.9  # layer-wise lr decay of the student ViT, the last block x 0.9 as DINOv2 (1.0: off)
    patch_embed_lr_mult: float = 0.2  # the patch embedding's lr, on top of its layer decay (reference: 0.2)


class DINOv2(SSLMethod):
    """DINOv2 student / teacher on a timm ViT (see the module docstring).

    Args:
        vit: a timm ``VisionTransformer`` without classifier, ``dynamic_img_size=True`` when local crops are used.
        momentum_schedule / teacher_temp_schedule: per optimizer step.
        freeze_last_layer_steps: the heads' last layers get no update for this many first steps.
        layer_decay / patch_embed_lr_mult: the student's lr multipliers (``dinov2_lr_scale``; heads: 1).
        centering: the teacher targets of both losses: softmax around running centres (``mean``) or Sinkhorn-Knopp.
    """

    Config = DINOv2Config
    lr_scaling = SQRT_1024  # DINOv2's sqrt_wrt_1024: base_lr is the lr at batch 1024 (0.004 in the reference)
    description = (
        "DINOv2 self-distillation with iBOT masked-patch and KoLeo terms (Oquab et al. 2023); "
        "released: the EMA teacher ViT"
    )
    momentum_modules = ("teacher_backbone", "teacher_head")
    tiny_config: ClassVar[dict[str, Any]] = {
        **teacher_student_tiny_config("dinov2"),
        "dinov2.warmup_teacher_temp_epochs": 0,
    }

    @staticmethod
    def check_config(section, need) -> None:
        scale = list(section.local_crop_scale)
        need(len(scale) == 2 and scale[0] <= scale[1], "local_crop_scale", "must be [low, high]")
        need(
            0.0 <= section.mask_ratio_min <= section.mask_ratio_max < 1.0, "mask_ratio_min", "needs 0 <= min <= max < 1"
        )
        need(0.0 <= section.mask_sample_probability <= 1.0, "mask_sample_probability", "must be in [0, 1]")
        need(0.0 < section.layer_decay <= 1.0, "layer_decay", "must be in (0, 1]")
        need(section.patch_embed_lr_mult > 0.0, "patch_embed_lr_mult", "must be above 0")
        check_auto_numbers(section, need)

    @staticmethod
    def resolve_auto(cfg: DictConfig, dataset_size: int) -> list[str]:
        return resolve_teacher_auto(cfg, "dinov2", dataset_size)

    def __init__(
        self,
        vit: nn.Module,
        momentum_schedule: Sequence[float] | np.ndarray,
        teacher_temp_schedule: Sequence[float] | np.ndarray,
        freeze_last_layer_steps: int = 0,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_output_dim: int = 65536,
        ibot_separate_head: bool = False,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        loss_weights: tuple[float, float, float] = (1.0, 1.0, 0.1),
        mask_sample_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        layer_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        centering: Centering | str = Centering.mean,
    ):
        super().__init__()
        # Keep timm's initialisation (and any warm-start weights): lightly would re-initialise both otherwise.
        self.student_backbone = MaskedVisionTransformerTIMM(
            vit=vit, weight_initialization="skip", pos_embed_initialization="skip", antialias=False
        )
        self.teacher_backbone = deterministic_copy(self.student_backbone)  # no drop path on the teacher
        sizes = (vit.embed_dim, head_hidden_dim, head_bottleneck_dim, head_output_dim, ibot_separate_head)
        self.student_head = self._heads(*sizes)
        # A new module loaded with the student's state: weight-normed heads cannot be deep-copied.
        self.teacher_head = self._heads(*sizes)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.centering = Centering(centering)
        self.dino_loss = dino_loss(self.centering, head_output_dim, student_temp, center_momentum)
        self.ibot_loss = IBOTPatchLoss(
            output_dim=head_output_dim, student_temp=student_temp, center_momentum=center_momentum
        )
        self.koleo_loss = KoLeoLoss()
        self.loss_weights = loss_weights
        self.mask_sample_probability, self.mask_ratio = mask_sample_probability, mask_ratio
        self.layer_decay, self.patch_embed_lr_mult = layer_decay, patch_embed_lr_mult
        self.momentum_schedule = np.asarray(momentum_schedule, dtype=np.float64)
        self.teacher_temp_schedule = np.asarray(teacher_temp_schedule, dtype=np.float64)
        last_layers = [p for head in self.student_head.values() for p in head.last_layer.parameters()]
        self.last_layer = LastLayerFreeze(last_layers, freeze_last_layer_steps)

    @staticmethod
    def _heads(embed_dim: int, hidden: int, bottleneck: int, output: int, separate_ibot: bool) -> nn.ModuleDict:
        heads = {"dino_head": DINOv2ProjectionHead(embed_dim, hidden, bottleneck, output)}
        if separate_ibot:
            heads["ibot_head"] = DINOv2ProjectionHead(embed_dim, hidden, bottleneck, output)
        return nn.ModuleDict(heads)

    def _ibot_head(self, heads: nn.ModuleDict) -> nn.Module:
        return heads["ibot_head"] if "ibot_head" in heads else heads["dino_head"]

    def block_masks(self, batch: int, height: int, width: int) -> Tensor:
        """(batch, height, width) bool masks drawn here (from the global streams), for views without masks."""
        draw = BlockMasks((height, width), 1, self.mask_sample_probability, self.mask_ratio)
        return torch.cat([draw() for _ in range(batch)])

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        """views: 2 global (B, C, H, W), N local (B, C, h, w), then (optional) the block masks of the global crops
        (B, 2, H / patch, W / patch) bool as ``DINOv2.build_transform`` draws them, then (optional) their
        ``mask_indices`` (M,) int64 as the loader's collate (``WithBlockMasks.collate``) adds them -> weighted
        DINO + iBOT + KoLeo loss; embeddings: the teacher's class tokens of the first global view (B, D).

        No host sync: the masked patch tokens are picked with ``index_select`` on the indices made on the host,
        whose length M the host knows (boolean-mask indexing would wait for the GPU to count them). Masks without
        indices cost one sync (``nonzero`` on the device); views without masks draw them here, on the host."""
        views, masks, mask_index = split_views(views)
        batch_size = views[0].shape[0]
        self.last_layer.set_step(step)
        global_views = torch.cat(views[:NUM_GLOBAL_CROPS])
        vit = self.student_backbone.vit
        patch_h, patch_w = vit.patch_embed.patch_size
        grid = (global_views.shape[-2] // patch_h, global_views.shape[-1] // patch_w)
        if masks is None:  # drawn on the host, indexed there, then copied without waiting
            block_mask = self.block_masks(global_views.shape[0], *grid)
            mask_index = block_mask.flatten().nonzero().flatten().to(global_views.device, non_blocking=True)
            block_mask = block_mask.to(global_views.device, non_blocking=True)
        else:  # (B, 2, h, w) -> (2B, h, w) in the order of global_views
            block_mask = masks.transpose(0, 1).flatten(0, 1)
            if mask_index is None:
                mask_index = block_mask.flatten().nonzero().flatten()  # one host sync: the collate avoids it
        prefix, num_patches = vit.num_prefix_tokens, grid[0] * grid[1]
        token_mask = torch.zeros(block_mask.shape[0], prefix + num_patches, dtype=torch.bool, device=block_mask.device)
        token_mask[:, prefix:] = block_mask.flatten(1)  # class / register tokens never masked
        # the masked patch tokens' rows in the (2B * (prefix + num_patches), D) tokens: a view, no copy of the rest
        token_rows = mask_index + (torch.div(mask_index, num_patches, rounding_mode="floor") + 1) * prefix

        def masked_patches(tokens: Tensor) -> Tensor:  # (2B, prefix + num_patches, D) -> (M, D)
            return tokens.flatten(0, 1).index_select(0, token_rows)

        with torch.no_grad():
            teacher_tokens = self.teacher_backbone.encode(global_views)
            teacher_cls = self.teacher_head["dino_head"](teacher_tokens[:, 0])
            teacher_patches = self._ibot_head(self.teacher_head)(masked_patches(teacher_tokens))
        student_tokens = self.student_backbone.encode(global_views, mask=token_mask)
        student_cls_tokens = student_tokens[:, 0]
        student_cls = [self.student_head["dino_head"](student_cls_tokens)]
        if len(views) > NUM_GLOBAL_CROPS:
            local_tokens = self.student_backbone.encode(torch.cat(views[NUM_GLOBAL_CROPS:]))
            student_cls.append(self.student_head["dino_head"](local_tokens[:, 0]))
        student_patches = self._ibot_head(self.student_head)(masked_patches(student_tokens))
        terms = self.loss_terms(
            teacher_cls,
            torch.cat(student_cls),
            teacher_patches,
            student_patches,
            block_mask,
            student_cls_tokens,
            num_views=len(views),
            teacher_temp=at_step(self.teacher_temp_schedule, step),
            mask_index=mask_index,
        )
        return {**terms, "embeddings": teacher_tokens[:batch_size, 0].detach()}

    def loss_terms(
        self,
        teacher_cls: Tensor,
        student_cls: Tensor,
        teacher_patches: Tensor,
        student_patches: Tensor,
        block_mask: Tensor,
        student_cls_tokens: Tensor,
        *,
        num_views: int,
        teacher_temp: float,
        mask_index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The three terms and their weighted sum.

        teacher_cls (2B, K): head outputs of the global crops; student_cls (V*B, K): of every view, globals first;
        teacher_patches / student_patches (M, K): of the M masked patch tokens; block_mask (2B, h, w);
        student_cls_tokens (2B, D): the student's global class tokens before the head (KoLeo); mask_index (M,):
        the masked patches' positions in ``block_mask.flatten()`` (None: found with ``nonzero``, a host sync).
        Computed in fp32 whatever the step's autocast (the centres, KoLeo's nearest neighbours), as DINOv2.
        """
        with outside_autocast(teacher_cls.device):
            teacher_cls, student_cls = teacher_cls.float(), student_cls.float()
            teacher_patches, student_patches = teacher_patches.float(), student_patches.float()
            student_cls_tokens = student_cls_tokens.float()
            dino = self.dino_loss(
                list(teacher_cls.chunk(NUM_GLOBAL_CROPS)), list(student_cls.chunk(num_views)), teacher_temp=teacher_temp
            )
            if teacher_patches.shape[0]:
                if mask_index is None:
                    mask_index = block_mask.flatten().nonzero().flatten()
                weights, crops = mask_weights(block_mask, mask_index), len(block_mask)
                ibot = ibot_patch_loss(
                    self.ibot_loss, teacher_patches, student_patches, weights, crops, teacher_temp, self.centering
                )
            else:  # no crop of this process's batch is masked (small batches): the mean of nothing would be NaN
                # the teacher's targets still join the centre's all-reduces of the other processes
                ibot_teacher_targets(self.ibot_loss, teacher_patches, teacher_temp, self.centering)
                ibot = student_patches.sum() * 0.0
            koleo = sum(self.koleo_loss(tokens) for tokens in student_cls_tokens.chunk(NUM_GLOBAL_CROPS))
            w_dino, w_ibot, w_koleo = self.loss_weights
            return {
                "loss": w_dino * dino + w_ibot * ibot + w_koleo * koleo,
                "dino_loss": dino.detach(),
                "ibot_loss": ibot.detach(),
                "koleo_loss": koleo.detach(),
                "teacher_temp": torch.tensor(teacher_temp),
            }

    def param_groups(self) -> list[dict]:
        """The student's parameters grouped by (``lr_scale``, ``wd_scale``), as the reference's
        ``get_params_groups`` (``train/ssl_meta_arch.py``): ViT parameters at ``dinov2_lr_scale`` (the patch
        embedding also x ``patch_embed_lr_mult``), the heads at 1. No weight decay on 1-D parameters (biases,
        norms, LayerScale: the reference's ``bias`` / ``norm`` / ``gamma`` names), and, unlike the reference, on
        timm's ``no_weight_decay`` tokens (position embedding, class / register tokens) and the mask token."""
        vit = self.student_backbone.vit
        depth = len(vit.blocks)
        undecayed = {"mask_token", *(vit.no_weight_decay() if hasattr(vit, "no_weight_decay") else ())}
        scales: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, param in self.student_backbone.named_parameters():
            if not param.requires_grad:
                continue
            name = name.removeprefix("vit.")
            lr_scale = dinov2_lr_scale(name, depth, self.layer_decay)
            if "patch_embed" in name:
                lr_scale *= self.patch_embed_lr_mult
            wd_scale = 0.0 if param.ndim <= 1 or name in undecayed else 1.0
            scales.setdefault((lr_scale, wd_scale), []).append(param)
        for param in self.student_head.parameters():
            if param.requires_grad:
                scales.setdefault((1.0, 0.0 if param.ndim <= 1 else 1.0), []).append(param)
        return [{"params": params, "lr_scale": lr, "wd_scale": wd} for (lr, wd), params in scales.items()]

    def before_optimizer_step(self, step: int) -> None:
        self.last_layer.before_optimizer_step(step)

    @torch.no_grad()
    def update_momentum(self, step: int) -> None:
        momentum = at_step(self.momentum_schedule, step)
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)

    def export_backbone(self) -> nn.Module:
        return self.teacher_backbone.vit

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DINOv2:
        d = cfg.dinov2
        vit = backbone_from_config(cfg, dynamic_img_size=d.num_local_crops > 0)
        if not is_vit(vit):
            raise ConfigError(
                f"config key 'model.backbone': DINOv2 masks patch tokens and needs a timm ViT, got {cfg.model.backbone!r}"
            )
        check_local_crops(vit, cfg, "dinov2")
        return cls(
            vit,
            **teacher_schedules(cfg, "dinov2"),
            head_hidden_dim=d.head_hidden_dim,
            head_bottleneck_dim=d.head_bottleneck_dim,
            head_output_dim=d.head_output_dim,
            ibot_separate_head=d.ibot_separate_head,
            student_temp=d.student_temp,
            center_momentum=d.center_momentum,
            loss_weights=(d.dino_loss_weight, d.ibot_loss_weight, d.koleo_loss_weight),
            mask_sample_probability=d.mask_sample_probability,
            mask_ratio=(d.mask_ratio_min, d.mask_ratio_max),
            layer_decay=d.layer_decay,
            patch_embed_lr_mult=d.patch_embed_lr_mult,
            centering=d.centering,
        )

    @staticmethod
    def build_transform(cfg: DictConfig) -> WithBlockMasks:
        d = cfg.dinov2
        with torch.device("meta"):  # only the patch size is needed: no memory, no initialisation
            patch = backbone_from_config(cfg).patch_embed.patch_size
        grid = (cfg.data.img_size // patch[0], cfg.data.img_size // patch[1])
        masks = BlockMasks(grid, NUM_GLOBAL_CROPS, d.mask_sample_probability, (d.mask_ratio_min, d.mask_ratio_max))
        return WithBlockMasks(multi_crop_from_config(cfg, "dinov2", NUM_GLOBAL_CROPS), masks)


class BlockMasks:
    """``draw() -> (num_masks, h, w)`` bool: each mask, with probability ``probability``, covers a fraction of the
    ``grid`` drawn uniformly from ``ratio`` with random rectangular blocks of at least 4 patches (fewer on grids too
    small for that) by lightly's ``random_block_mask_image``; otherwise nothing.

    The reference (``dinov2/data/collate.py``) masks a fixed share of each batch at ratios spread evenly over the
    range; here each sample draws its own, from torch's generator, which the loader seeds per sample: the masks of
    a sample do not depend on the batch size, the number of processes or where a run resumed (same distribution).
    """

    def __init__(self, grid: tuple[int, int], num_masks: int, probability: float, ratio: tuple[float, float]):
        self.grid, self.num_masks, self.probability, self.ratio = grid, num_masks, probability, ratio

    def __call__(self) -> Tensor:
        height, width = self.grid
        masks = torch.zeros(self.num_masks, height, width, dtype=torch.bool)
        seed = int(torch.randint(0, 2**62, ()))
        state = random.getstate()  # lightly draws blocks from python's generator: seed it, then put it back
        random.seed(seed)
        try:
            for index in range(self.num_masks):
                if random.random() >= self.probability:
                    continue
                count = max(1, int(height * width * random.uniform(*self.ratio)))
                masks[index] = random_block_mask_image((height, width), count, min_num_masks_per_block=min(4, count))
        finally:
            random.setstate(state)
        return masks


class WithBlockMasks(MultiView):
    """DINOv2's views: the multi-crop views, then the global crops' block masks (``BlockMasks``); its ``collate``
    (the loader's batch function) adds the masked patches' indices, made on the host."""

    def __init__(self, views: MultiView, masks: BlockMasks):
        super().__init__(views.transforms)
        self.masks = masks

    def forward(self, image: Tensor) -> list[Tensor]:
        """(C, H, W) -> [global, global, local ..., masks (2, h, w) bool]."""
        return [*super().forward(image), self.masks()]

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """Samples -> a batch as torch's default collate makes it, with ``mask_indices`` of the stacked masks
        (B, 2, h, w) appended to the views, as the reference's collate (``dinov2/data/collate.py``) makes
        ``mask_indices_list``: computed here, on the host, the step needs no host sync to know their number."""
        batch = default_collate(samples)
        batch["views"].append(mask_indices(batch["views"][-1]))
        return batch


def mask_indices(masks: Tensor) -> Tensor:
    """(B, 2, h, w) bool block masks -> (M,) int64 positions of the masked patches in the (2B * h * w) patches of
    the concatenated global views (view 1 of every sample, then view 2), in ascending order: the order of
    boolean-mask indexing."""
    return masks.transpose(0, 1).flatten().nonzero().flatten()


def split_views(views: list[Tensor]) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    """DINOv2's views -> (images, block masks (B, 2, h, w) bool or None, mask indices (M,) int64 or None)."""
    masks = mask_index = None
    if views[-1].dtype == torch.int64 and views[-2].dtype == torch.bool:
        views, mask_index = views[:-1], views[-1]
    if views[-1].dtype == torch.bool:
        views, masks = views[:-1], views[-1]
    if mask_index is not None and masks is None:
        raise ValueError("DINOv2: mask indices without the block masks they index")
    return views, masks, mask_index


def mask_weights(block_mask: Tensor, mask_index: Tensor) -> Tensor:
    """(2B, h, w) masks, (M,) indices -> (M,) weight of each masked patch: 1 / (masked patches of its crop), as
    iBOT weights them (the reference's ``masks_weight``), computed on the device without a host sync."""
    per_crop = 1.0 / block_mask.flatten(1).sum(1).clamp(min=1.0)
    return per_crop.index_select(0, torch.div(mask_index, block_mask[0].numel(), rounding_mode="floor"))


def dinov2_lr_scale(name: str, depth: int, layer_decay: float) -> float:
    """The lr multiplier of a student ViT parameter (``name`` in the timm ViT, or ``mask_token``), as the
    reference's ``get_vit_lr_decay_rate`` (``utils/param_groups.py``): layer 0 for the embeddings (patch and
    position embedding, class and mask tokens), i + 1 for block i, depth + 1 for the rest (the final norm; register
    tokens too, which the reference's name rules leave there) -> ``layer_decay ** (depth + 1 - layer)``: the last
    block gets ``layer_decay`` (timm's ``param_groups_layer_decay`` gives it 1), the embeddings its depth + 1 power."""
    if any(embedding in name for embedding in ("pos_embed", "patch_embed", "mask_token", "cls_token")):
        layer = 0
    elif "blocks." in name:
        layer = int(name[name.find("blocks.") :].split(".")[1]) + 1
    else:
        layer = depth + 1
    return layer_decay ** (depth + 1 - layer)


def ibot_teacher_targets(loss: IBOTPatchLoss, teacher: Tensor, teacher_temp: float, centering: Centering) -> Tensor:
    """(M, K) teacher head outputs of the masked patches -> (M, K) targets: Sinkhorn-Knopp (the reference's iBOT
    ``sinkhorn_knopp_teacher``; the centre is not used), or a softmax around lightly's running centre, which then
    follows these outputs (M = 0: it joins the centre's all-reduce with its own value, as the mean of nothing
    would be NaN)."""
    if centering is Centering.sinkhorn_knopp:
        return sinkhorn_knopp_teacher(teacher, teacher_temp)
    targets = F.softmax((teacher - loss.center.value) / teacher_temp, dim=-1)
    loss.center.update(teacher if len(teacher) else loss.center.value)
    return targets


def ibot_patch_loss(
    loss: IBOTPatchLoss,
    teacher: Tensor,
    student: Tensor,
    weights: Tensor,
    num_crops: int,
    teacher_temp: float,
    centering: Centering = Centering.mean,
) -> Tensor:
    """lightly's ``IBOTPatchLoss.forward`` (its centre, temperatures and formula) with the per-token weights given
    instead of derived from the mask: lightly computes them as ``(1 / count).expand_as(mask)[mask]``, a
    boolean-mask index whose size the host must read from the GPU, and it cannot be fed a mask that avoids it.
    teacher / student (M, K): head outputs of the masked patches; weights (M,) from :func:`mask_weights`;
    num_crops: the crops of the batch (lightly's ``mask.shape[0]``, crops without masked patches included) ->
    the weighted cross-entropy summed, over ``num_crops``; targets from :func:`ibot_teacher_targets`."""
    teacher_targets = ibot_teacher_targets(loss, teacher, teacher_temp, centering)
    student_log_softmax = F.log_softmax(student / loss.student_temp, dim=-1)
    per_token = -torch.sum(teacher_targets * student_log_softmax, dim=-1)
    return (per_token * weights).sum() / num_crops
