"""Distillation of a frozen, large general model into a deployable backbone on unlabeled in-domain images, as
LightlyTrain's ``distillation`` method (cf. Hinton et al. 2015; "Knowledge distillation: A good teacher is patient
and consistent", Beyer et al. 2022).

The teacher (``distill.teacher``: anything ``model.init`` takes, e.g. a DINOv2 ViT-B/14 hub snapshot or a medfm
release) runs frozen, in eval mode, without gradients, at its own input size and normalisation (under bf16
autocast on GPUs, as the engine's forward). The student, any timm architecture (ViT, ResNet, ConvNeXt), is mapped
to the teacher's width by a linear map of its pooled features and a 1 x 1 convolution of its feature map, resized
to the teacher's patch grid (bilinear). Losses (``distill.loss``):

- ``queue_kl`` (the default; LightlyTrain's current default, its ``distillationv3``): every batch is mixed with a
  shuffled copy of itself (mixup, one weight ~ U(0, 1) per batch); all features L2-normalised; a queue of the last
  ``queue_size`` teacher pooled features (per process, the current batch first) serves as pseudo-class weights, and
  the student's softmax over its similarities to the queue matches the teacher's (KL, temperature
  ``temperature_global``); within each image, each patch's softmax over its similarities to the image's patches
  matches the teacher's (KL, ``temperature_local``). LightlyTrain clips gradients at 1.0, uses AdamW at 5e-4 for a
  batch of 1536 scaled by the square root (this method's ``lr_scaling``) and weight decay 1e-6 for BatchNorm CNN
  students, 0.04 otherwise: the recipes set those.
- ``cosine`` / ``mse`` (medfm's earlier variant): per vector ``1 - cosine`` or the MSE of layer-normalised
  pooled and patch features (set ``mixup: false`` for it as it was).

Pooled and patch terms are weighted by ``pooled_weight`` / ``patch_weight``. The teacher is held outside the module
tree: it is neither trained, checkpointed, synchronised nor sharded, and it is read from ``distill.teacher`` at the
first forward (exporting a run never needs it). Released: the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from medfm.pretrain.backbones import build_backbone
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.methods.base import TINY_VIT, SSLMethod, augment_from_config, backbone_from_config, outside_autocast
from medfm.pretrain.schedules import LrScaling
from medfm.pretrain.transforms import MultiView
from medfm.pretrain.weights import (
    CONFIG_NAME,
    check_keys,
    fit_state_dict,
    read_config,
    read_init,
    resolve_source,
    source_normalization,
)

LOSSES = ("queue_kl", "cosine", "mse")
AUTO = "auto"
# (image count below which, queue size): LightlyTrain's distillationv3 buckets (about 25-50 % of the images)
QUEUE_BUCKETS = ((50, 16), (100, 32), (250, 64), (500, 128), (1_000, 256), (2_000, 512), (4_000, 1024),
                 (10_000, 2048), (20_000, 4096))  # fmt: skip
MAX_QUEUE = 8192
# LightlyTrain's distillation lr rule: AdamW 5e-4 at a batch of 1536, scaled by the square root
SQRT_1536 = LrScaling("sqrt x (batch / 1536)", 1536, 0.5)


@dataclass
class DistillConfig:
    """The ``distill:`` config section."""

    teacher: str | None = None  # required: anything model.init takes (hub snapshot, hf-hub:ORG/NAME, release, file)
    teacher_architecture: str | None = None  # timm name, only for a bare teacher weights file
    teacher_img_size: int | None = None  # the teacher's input side (None: data.img_size)
    teacher_dim: int | None = None  # the teacher's feature width; None: read from it (then recorded in the run)
    loss: str = "queue_kl"  # queue_kl (LightlyTrain's distillationv3) | cosine | mse (medfm's earlier variant)
    pooled_weight: float = 1.0
    patch_weight: float = 1.0
    mixup: bool = True  # mix each batch with a shuffled copy of itself (LightlyTrain; false: the earlier variant)
    # queue_kl: teacher pooled features kept as pseudo-classes; auto: from the image count (16 ... 8192)
    queue_size: int | str = AUTO
    temperature_global: float = 0.07  # queue_kl: softmax over the queue
    temperature_local: float = 0.07  # queue_kl: softmax over an image's patches


def feature_map(backbone: nn.Module, features: Tensor) -> Tensor:
    """timm ``forward_features`` output -> (B, C, h, w): a ViT's patch tokens on their grid, a CNN's map as is."""
    if features.ndim == 4:
        return features
    tokens = features[:, getattr(backbone, "num_prefix_tokens", 0) :]
    height, width = _grid(backbone, tokens)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def _grid(backbone: nn.Module, tokens: Tensor) -> tuple[int, int]:
    grid = tuple(backbone.patch_embed.grid_size)
    if grid[0] * grid[1] == tokens.shape[1]:
        return grid
    side = int(tokens.shape[1] ** 0.5)  # another input size (dynamic_img_size): square inputs
    return side, side


class FrozenTeacher:
    """The teacher: a timm backbone loaded strictly from ``source`` on first use, frozen, in eval mode."""

    def __init__(self, source: str, architecture: str | None, img_size: int, in_chans: int, student_mean, student_std):
        self.source, self.architecture, self.img_size, self.in_chans = source, architecture, img_size, in_chans
        self.student_norm = (student_mean, student_std)
        self.model: nn.Module | None = None

    def _load(self, device: torch.device) -> None:
        spec = TeacherSpec.of_source(self.source, self.architecture)
        weights = read_init(self.source, spec.architecture, "distill.teacher")
        model = spec.build(self.img_size, self.in_chans)
        state, _, _ = fit_state_dict(weights.state_dict, model, weights.pretrained_cfg.get("first_conv"))
        check_keys(model.state_dict(), state, weights.source, model=f"the teacher {spec.architecture}")
        model.load_state_dict(state, strict=True)
        # The teacher's own input normalisation (an RGB teacher on gray images: the channel average)
        norm = source_normalization(self.source, spec.architecture, "distill.teacher").for_channels(self.in_chans)
        mean, std = norm.mean, norm.std
        as_map = lambda values: torch.tensor(values, device=device, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        self.mean, self.std = as_map(mean), as_map(std)
        self.student_mean, self.student_std = (as_map(v) for v in self.student_norm)
        self.model = model.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Student-normalised images (B, C, H, W) -> teacher pooled (B, D) and patch features (B, D, h, w)."""
        if self.model is None:
            self._load(images.device)
        pixels = images * self.student_std + self.student_mean  # back to [0, 1], then the teacher's normalisation
        if pixels.shape[-2:] != (self.img_size, self.img_size):
            pixels = F.interpolate(pixels, size=(self.img_size, self.img_size), mode="bilinear", antialias=True)
        features = self.model.forward_features((pixels - self.mean) / self.std)
        pooled = self.model.forward_head(features, pre_logits=True)
        return pooled.float(), feature_map(self.model, features).float()


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher's timm architecture and shape arguments, read from its ``config.json`` (nothing loaded)."""

    architecture: str
    model_args: dict[str, Any]

    @classmethod
    def of(cls, section: DictConfig) -> TeacherSpec:
        return cls.of_source(section.teacher, section.teacher_architecture)

    @classmethod
    def of_source(cls, source: str, architecture: str | None) -> TeacherSpec:
        path = resolve_source(source, "distill.teacher")
        for folder in (path, path / "release"):
            if path.is_dir() and (folder / CONFIG_NAME).is_file():
                config = read_config(folder / CONFIG_NAME)
                return cls(config["architecture"], dict(config.get("model_args", {})))
        if architecture is None:
            raise ConfigError(
                f"config key 'distill.teacher_architecture': the teacher {source} has no {CONFIG_NAME}; "
                "name its timm architecture"
            )
        return cls(architecture, {})

    def build(self, img_size: int, in_chans: int) -> nn.Module:
        args = {k: v for k, v in self.model_args.items() if k not in ("img_size", "in_chans")}
        return build_backbone(self.architecture, img_size, in_chans, **args)


def mix_batch(images: Tensor) -> Tensor:
    """Mixup without labels (LightlyTrain's distillation): ``w * images + (1 - w) * images[perm]``, one weight
    w ~ U(0, 1) and one permutation per batch, drawn on the images' device (no host sync)."""
    weight = torch.rand((), device=images.device, dtype=images.dtype)
    return weight * images + (1 - weight) * images[torch.randperm(images.shape[0], device=images.device)]


class Distill(SSLMethod):
    """Feature distillation of a frozen teacher into ``student`` (see the module docstring).

    Args:
        student: any timm backbone without classifier.
        teacher: a ``FrozenTeacher`` (or any callable images -> (pooled (B, D), patches (B, D, h, w))).
        teacher_dim: D.
        loss: ``cosine`` or ``mse``; pooled_weight / patch_weight: the two terms' weights.
    """

    Config = DistillConfig
    description = "feature distillation of a frozen general-purpose teacher (pooled and patch features)"
    # distill.teacher has no tiny default: a test supplies the general-purpose model (tests/conftest.py)
    tiny_config: ClassVar[dict[str, Any]] = {**TINY_VIT, "distill.teacher_img_size": 32}

    lr_scaling = SQRT_1536

    @staticmethod
    def check_config(section, need) -> None:
        need(section.loss in LOSSES, "loss", f"must be one of {LOSSES}")
        need(section.pooled_weight >= 0 and section.patch_weight >= 0, "pooled_weight", "weights must be >= 0")
        for key in ("temperature_global", "temperature_local"):
            need(section[key] > 0, key, "must be above 0")
        size = section.queue_size
        need(
            size == AUTO or (isinstance(size, int) and not isinstance(size, bool) and size > 0),
            "queue_size",
            "must be 'auto' or a positive whole number",
        )

    @staticmethod
    def resolve_auto(cfg: DictConfig, dataset_size: int) -> list[str]:
        d = cfg.distill
        if d.queue_size != AUTO:
            if d.loss == "queue_kl" and d.queue_size >= dataset_size:
                raise ConfigError(
                    f"config key 'distill.queue_size': {d.queue_size} is not below the {dataset_size} images (LightlyTrain's rule: 'auto' keeps it to 25-50 %)"
                )
            return []
        d.queue_size = next((size for bound, size in QUEUE_BUCKETS if dataset_size < bound), MAX_QUEUE)
        return [f"distill.queue_size={d.queue_size}"]

    def __init__(self, student: nn.Module, teacher: Any, teacher_dim: int, loss: str = "queue_kl",
                 pooled_weight: float = 1.0, patch_weight: float = 1.0, *, mixup: bool = True, queue_size: int = 8192,
                 temperature_global: float = 0.07, temperature_local: float = 0.07):  # fmt: skip
        super().__init__()
        self.student = student
        self.__dict__["teacher"] = teacher  # outside the module tree: not trained, saved, synchronised or sharded
        self.pooled_projection = nn.Linear(student.num_features, teacher_dim)
        self.patch_projection = nn.Conv2d(student.num_features, teacher_dim, kernel_size=1)
        self.loss, self.pooled_weight, self.patch_weight = loss, pooled_weight, patch_weight
        self.mixup, self.temperature_global, self.temperature_local = mixup, temperature_global, temperature_local
        if loss == "queue_kl":
            for projection in (self.pooled_projection, self.patch_projection):  # LightlyTrain's initialisation
                nn.init.trunc_normal_(projection.weight, std=0.02)
            # Per process (as LightlyTrain's), checkpointed with the run so that a resumed run continues it.
            self.register_buffer("feature_queue", torch.zeros(queue_size, teacher_dim))

    def distance(self, student: Tensor, teacher: Tensor) -> Tensor:
        """(N, D) x (N, D) -> scalar: mean ``1 - cosine`` or MSE of layer-normalised vectors."""
        if self.loss == "cosine":
            return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        return F.mse_loss(F.layer_norm(student, student.shape[-1:]), F.layer_norm(teacher, teacher.shape[-1:]))

    @torch.no_grad()
    def update_queue(self, teacher_pooled: Tensor) -> None:
        """The batch's L2-normalised teacher features (B, D) first, the oldest dropped (LightlyTrain's order)."""
        queue, batch = self.feature_queue, teacher_pooled.to(self.feature_queue.dtype)
        if batch.shape[0] >= queue.shape[0]:
            queue.copy_(batch[: queue.shape[0]])
        else:
            queue.copy_(torch.cat([batch, queue[: queue.shape[0] - batch.shape[0]]]))

    def queue_kl(
        self, student_pooled: Tensor, teacher_pooled: Tensor, student_patches: Tensor, teacher_patches: Tensor
    ) -> tuple[Tensor, Tensor]:
        """LightlyTrain's distillationv3 loss on L2-normalised features (pooled (B, D), patches (B, N, D)): KL of
        the softmax over the queue (inter-image) and of each patch's softmax over its image's patches (intra-image),
        both averaged over their rows."""
        with outside_autocast(student_pooled.device):
            queue = self.feature_queue
            inter = F.kl_div(
                F.log_softmax(student_pooled @ queue.T / self.temperature_global, dim=-1),
                F.softmax(teacher_pooled @ queue.T / self.temperature_global, dim=-1),
                reduction="batchmean",
            )
            student_self = (student_patches @ student_patches.transpose(1, 2)).flatten(0, 1)
            teacher_self = (teacher_patches @ teacher_patches.transpose(1, 2)).flatten(0, 1)
            intra = F.kl_div(
                F.log_softmax(student_self / self.temperature_local, dim=-1),
                F.softmax(teacher_self / self.temperature_local, dim=-1),
                reduction="batchmean",
            )
        return inter, intra

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        """views: one (B, C, H, W) batch -> loss; embeddings: the student's pooled features (B, D_student)."""
        images = mix_batch(views[0]) if self.mixup else views[0]
        target_pooled, target_patches = self.teacher(images)
        features = self.student.forward_features(images)
        pooled = self.student.forward_head(features, pre_logits=True)
        patches = self.patch_projection(feature_map(self.student, features))
        patches = F.interpolate(patches, size=target_patches.shape[-2:], mode="bilinear", align_corners=False)
        student_pooled, student_patches = (
            self.pooled_projection(pooled).float(),
            patches.flatten(2).transpose(1, 2).float(),
        )
        target_patches = target_patches.flatten(2).transpose(1, 2)
        if self.loss == "queue_kl":
            normalise = lambda x: F.normalize(x, dim=-1)  # noqa: E731
            target_pooled, target_patches = normalise(target_pooled), normalise(target_patches)
            self.update_queue(target_pooled)
            pooled_loss, patch_loss = self.queue_kl(
                normalise(student_pooled), target_pooled, normalise(student_patches), target_patches
            )
        else:
            pooled_loss = self.distance(student_pooled, target_pooled)
            patch_loss = self.distance(student_patches, target_patches)
        loss = self.pooled_weight * pooled_loss + self.patch_weight * patch_loss
        return {
            "loss": loss,
            "pooled_loss": pooled_loss.detach(),
            "patch_loss": patch_loss.detach(),
            "embeddings": pooled.detach(),
        }

    def export_backbone(self) -> nn.Module:
        return self.student

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Distill:
        d = cfg.distill
        if d.teacher is None:
            raise ConfigError("config key 'distill.teacher' is required with method=distill (the model to distil)")
        size = d.teacher_img_size or cfg.data.img_size
        if d.teacher_dim is None:
            with torch.device("meta"):  # the teacher's width only: nothing read or allocated
                # Recorded in the run's config: rebuilding the student (export, resume) never needs the teacher.
                d.teacher_dim = int(TeacherSpec.of(d).build(size, cfg.data.in_chans).num_features)
        teacher = FrozenTeacher(
            d.teacher, d.teacher_architecture, size, cfg.data.in_chans, list(cfg.augment.mean), list(cfg.augment.std)
        )
        queue_size = d.queue_size if d.queue_size != AUTO else MAX_QUEUE  # a config not derived (derive sets it)
        return cls(backbone_from_config(cfg), teacher, d.teacher_dim, d.loss, d.pooled_weight, d.patch_weight,
                   mixup=d.mixup, queue_size=queue_size, temperature_global=d.temperature_global,
                   temperature_local=d.temperature_local)  # fmt: skip

    @staticmethod
    def build_transform(cfg: DictConfig) -> MultiView:
        return MultiView([augment_from_config(cfg)])
