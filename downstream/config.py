"""Typed configs of the downstream runs (``medfm eval``, ``medfm finetune``): defaults live here, YAML files in
``configs/downstream/`` hold overrides, CLI ``key=value`` on top. Unknown keys, wrong types and missing values fail
with a message naming the key; the resolved config is saved in the output directory (``config.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from medfm.pretrain.backbones import POOLINGS
from medfm.pretrain.config import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    OUTPUT_PATH,
    POSITIVE,
    PROBABILITY,
    Need,
    config_need,
    load_structured,
    within,
)

PROTOCOLS = ("knn", "linear", "robustness_index")
INITS = ("release", "random", "baseline")
METRICS = ("auc", "acc", "balanced_acc", "f1")


@dataclass
class BackboneConfig:
    path: str = MISSING  # release folder, pretraining run directory, or weights file
    architecture: str | None = None  # timm name, only for a bare weights file without config.json
    # release: the pretrained weights; random: the same architecture untrained; baseline: the general-purpose
    # model of backbone.baseline, at the release's input. Each init is evaluated and written to OUT_DIR/<init>/.
    inits: list[str] = field(default_factory=lambda: ["release"])
    img_size: int | None = None  # None: the release's size (ViT position embeddings are resampled otherwise)
    in_chans: int | None = None  # None: the release's channels
    # The model to compare with (init "baseline"): anything model.init takes (a timm / HF hub snapshot folder,
    # hf-hub:ORG/NAME from the local cache, a release, a .safetensors / .pt file, an original DINOv2 checkpoint).
    baseline: str | None = None
    baseline_architecture: str | None = None  # timm name, only for a bare baseline weights file


@dataclass
class DataConfig:
    spec: str = MISSING  # medmnist:FILE.npz, imagefolder:DIR, csv:FILE, shards:DIR
    # carved from train (stratified) where the source has no val split
    val_fraction: float = field(default=0.1, metadata=within("[0, 1)"))
    test_fraction: float = field(default=0.2, metadata=within("[0, 1)"))  # sources without any split
    split_seed: int = 0
    batch_size: int = field(default=256, metadata=AT_LEAST_ONE)  # feature extraction and evaluation batches
    num_workers: int = field(default=0, metadata=NON_NEGATIVE)


@dataclass
class FeatureConfig:
    """How frozen features are pooled (one choice for kNN and the linear probe, recorded in the results)."""

    # head: timm's pre-logits features (ViT class token or its global_pool, CNN global average pool);
    # layers: the last `layers` blocks / stages concatenated (ViT: their class tokens + the last mean patch token,
    # DINO's linear evaluation; CNN: each stage average-pooled), usually better on small medical images.
    pooling: str = "head"
    layers: int = field(default=4, metadata=AT_LEAST_ONE)
    # Input sides as multiples of the backbone's (backbone.img_size, else the release's). With several, each protocol
    # is fitted at each side and the side with the best val selection_metric is kept (label budgets and corruptions
    # then use it): a backbone pretrained on random-resized crops sees objects larger than whole images show them,
    # and often evaluates better above its training side (FixRes, Touvron et al. 2019).
    input_scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class KNNConfig:
    k: int = field(default=20, metadata=AT_LEAST_ONE)  # DINO: 20
    temperature: float = field(default=0.07, metadata=POSITIVE)  # DINO: 0.07


@dataclass
class LinearConfig:
    """The linear probe (medfm.downstream.linear): its regularisation is chosen on val from a grid."""

    # []: DINOv2's range of scikit-learn's C, logspace(-6, 5, 12) (one per decade; DINOv2: 45), as weight decays ~1 / (C n) that scale with the
    # n training labels of each label budget; else fixed weight decays on the mean loss, the same at every budget
    weight_decays: list[float] = field(default_factory=list, metadata=NON_NEGATIVE)
    class_weights: bool = False
    max_iter: int = field(default=1000, metadata=AT_LEAST_ONE)  # L-BFGS iterations per grid value (DINOv2: 1000)


@dataclass
class EfficiencyConfig:
    """Label budgets for the training split; empty lists: train on all labels only."""

    fractions: list[float] = field(default_factory=list, metadata=within("(0, 1]"))  # e.g. [0.01, 0.1, 1.0]
    per_class: list[int] = field(default_factory=list, metadata=AT_LEAST_ONE)  # e.g. [5, 25]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class RobustnessConfig:
    corruptions: list[str] = field(default_factory=list)  # gaussian_noise, gaussian_blur, contrast, jpeg
    severities: list[int] = field(default_factory=lambda: [3])


@dataclass
class SitesConfig:
    """Where each sample comes from (centre, scanner): protocol robustness_index, and a per-site breakdown of the
    knn / linear test metrics (medfm.downstream.sites)."""

    # None: no sites; csv (the site column of a csv: spec), level:N (the N-th folder of each sample's path, e.g.
    # level:2 for train/benign/hospital_a/x.png), meta:FIELD (shard metadata, e.g. meta:manufacturer), or
    # file:SITES.csv (columns key, site)
    source: str | None = None
    k: list[int] = field(default_factory=lambda: [5, 20, 50], metadata=AT_LEAST_ONE)  # neighbours (clipped to N - 1)


@dataclass
class EvalConfig:
    out_dir: str = field(default=MISSING, metadata=OUTPUT_PATH)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    features: FeatureConfig = field(default_factory=FeatureConfig)
    selection_metric: str = "auc"  # val metric choosing the linear probe's weight decay
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    sites: SitesConfig = field(default_factory=SitesConfig)
    # frozen-feature cache; None: OUT_DIR/feature_cache
    cache_dir: str | None = field(default=None, metadata=OUTPUT_PATH)
    plots: bool = True
    seed: int = 0  # random-init baselines are reproducible

    @staticmethod
    def check_config(cfg: DictConfig, need: Need) -> None:
        """Checks the types cannot express: ``need(ok, key, what)``."""
        check_shared(cfg, need)
        need(
            len(cfg.protocols) > 0 and all(p in PROTOCOLS for p in cfg.protocols),
            "protocols",
            f"must be a non-empty subset of {PROTOCOLS}",
        )
        need(cfg.features.pooling in POOLINGS, "features.pooling", f"must be one of {POOLINGS}")
        scales = list(cfg.features.input_scales)
        distinct = len(scales) > 0 and len(set(scales)) == len(scales)
        need(
            distinct and all(0 < s <= 8 for s in scales),
            "features.input_scales",
            "must be distinct multiples in (0, 8]",
        )
        need(
            "robustness_index" not in cfg.protocols or cfg.sites.source is not None,
            "sites.source",
            "must say where each sample's site comes from for protocol robustness_index (csv, level:N, meta:FIELD or file:SITES.csv)",
        )


@dataclass
class FinetuneAugmentConfig:
    """Fine-tuning augmentation (medfm.pretrain.transforms.MedicalAugment): the geometric and intensity keys of
    pretraining's ``AugmentConfig`` with mild defaults (no view pairs, no normalisation: the release's own)."""

    crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0], metadata=within("(0, 1]"))  # [low, high]
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3], metadata=POSITIVE)
    hflip: float = field(default=0.0, metadata=PROBABILITY)  # set > 0 only where laterality does not matter
    vflip: float = field(default=0.0, metadata=PROBABILITY)
    intensity_prob: float = field(default=0.5, metadata=PROBABILITY)
    brightness: float = field(default=0.1, metadata=NON_NEGATIVE)
    contrast: float = field(default=0.1, metadata=PROBABILITY)
    gamma: float = field(default=0.1, metadata=NON_NEGATIVE)
    blur_prob: float = field(default=0.0, metadata=PROBABILITY)
    # [low, high] in pixels of a 224-px image, scaled to the input size as pretraining's (0.0125-0.25 px at 28)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0], metadata=POSITIVE)


@dataclass
class TrainConfig:
    epochs: float = field(default=20.0, metadata=POSITIVE)
    batch_size: int = field(default=64, metadata=AT_LEAST_ONE)
    # peak, for a batch of 256 (scaled linearly, as in MAE's fine-tuning)
    lr: float = field(default=5e-4, metadata=POSITIVE)
    min_lr: float = field(default=1e-6, metadata=NON_NEGATIVE)
    warmup_epochs: float = field(default=1.0, metadata=NON_NEGATIVE)  # at most epochs
    weight_decay: float = field(default=0.05, metadata=NON_NEGATIVE)
    # layer-wise lr decay (1.0: off); MAE on chest X-ray: 0.55
    layer_decay: float = field(default=0.75, metadata=within("(0, 1]"))
    drop_path: float = field(default=0.1, metadata=within("[0, 1)"))
    label_smoothing: float = field(default=0.0, metadata=within("[0, 1)"))
    class_weights: bool = False
    freeze_blocks: int = 0  # freeze the stem + the first K blocks / stages; -1: everything but the head
    # new: a new head (timm's init); linear_probe: the head starts as the linear probe fitted on the frozen features
    # of the training labels (weight decay chosen on val), then everything is fine-tuned (LP-FT, Kumar et al. 2022:
    # the features are not torn up by a random head's gradients, which matters most with few labels). Pretrained
    # inits only: random init keeps timm's head init
    head_init: str = "new"
    clip_grad: float = field(default=0.0, metadata=NON_NEGATIVE)  # max global grad norm; 0: no clipping
    eval_every_epochs: float = field(default=1.0, metadata=POSITIVE)
    precision: str = "auto"  # auto (Accelerate's choice, else fp32), fp32 (or no), bf16 or fp16; an explicit value wins
    seed: int = 0
    max_steps: int | None = field(default=None, metadata=AT_LEAST_ONE)  # cap on optimizer steps (smoke tests)


@dataclass
class FinetuneConfig:
    out_dir: str = field(default=MISSING, metadata=OUTPUT_PATH)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=256))
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    selection_metric: str = "auc"  # val metric choosing the best checkpoint
    efficiency: EfficiencyConfig = field(default_factory=lambda: EfficiencyConfig(seeds=[0]))
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    plots: bool = True

    @staticmethod
    def check_config(cfg: DictConfig, need: Need) -> None:
        """Checks the types cannot express: ``need(ok, key, what)``."""
        check_shared(cfg, need)
        t = cfg.train
        need(t.warmup_epochs <= t.epochs, "train.warmup_epochs", "must be in [0, epochs]")
        need(t.freeze_blocks >= -1, "train.freeze_blocks", "must be >= -1")
        need(t.head_init in ("new", "linear_probe"), "train.head_init", "must be new or linear_probe")
        need(
            t.precision in ("auto", "fp32", "bf16", "fp16"),
            "train.precision",
            "must be auto, fp32 (or no), bf16 or fp16",
        )
        for key in ("augment.crop_scale", "augment.crop_ratio", "augment.blur_sigma"):
            value = list(OmegaConf.select(cfg, key))
            need(len(value) == 2 and value[0] <= value[1], key, "must be [low, high]")


def load_config(
    schema: type, path: str | Path | None = None, overrides: list[str] = (), values: Mapping[str, Any] | None = None
) -> DictConfig:
    """Schema defaults <- YAML overrides <- ``values`` (Python API) <- CLI dotlist; raises ``ConfigError``
    naming the key.

    ``schema`` is ``EvalConfig`` or ``FinetuneConfig``; its ``check_config`` holds the checks its types cannot
    express.
    """
    cfg = load_structured(schema, path, overrides, values=values)
    schema.check_config(cfg, config_need(cfg))
    return cfg


def check_shared(cfg: DictConfig, need: Need) -> None:
    """Checks of the sections every downstream schema has (backbone, data, efficiency, robustness)."""
    from medfm.downstream.robustness import CORRUPTIONS, SEVERITIES

    inits = list(cfg.backbone.inits)
    need(
        len(inits) > 0 and len(set(inits)) == len(inits) and set(inits) <= set(INITS),
        "backbone.inits",
        f"must be distinct values of {INITS}",
    )
    need(
        "baseline" not in inits or cfg.backbone.baseline is not None,
        "backbone.baseline",
        "is needed for init 'baseline'",
    )
    need(cfg.selection_metric in METRICS, "selection_metric", f"must be one of {METRICS}")
    need(
        cfg.data.test_fraction < 1 - cfg.data.val_fraction,
        "data.test_fraction",
        "must be in [0, 1 - val_fraction)",
    )
    need(len(cfg.efficiency.seeds) >= 1, "efficiency.seeds", "needs at least one seed")
    need(
        all(c in CORRUPTIONS for c in cfg.robustness.corruptions),
        "robustness.corruptions",
        f"must be in {sorted(CORRUPTIONS)}",
    )
    need(all(s in SEVERITIES for s in cfg.robustness.severities), "robustness.severities", f"must be in {SEVERITIES}")
