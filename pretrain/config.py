"""The one pretraining config schema: defaults live here, YAML recipes hold overrides, CLI ``key=value`` on top.

``load_config(path, overrides)`` merges defaults <- YAML <- dotlist and fails before anything is built when a key
is unknown, a value has the wrong type or a required value is missing; the error names the key.
``derive(cfg, world_size, dataset_size)`` fills the ``derived`` section (global batch, scaled lr, step counts):
every number computed from others is computed there and nowhere else.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.errors import ConfigError
from pretrain.methods import METHODS
from pretrain.schedules import derive_steps


class Precision(str, Enum):
    auto = "auto"  # Accelerate's choice (`accelerate config`, `accelerate launch --mixed_precision`), else no
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class Backend(str, Enum):
    auto = "auto"  # deepspeed when `accelerate launch` runs with an Accelerate config that chose it, else ddp
    ddp = "ddp"  # Accelerate's DistributedDataParallel (gloo on CPU, NCCL on GPUs); also a single process
    deepspeed = "deepspeed"  # DeepSpeed ZeRO through Accelerate's DeepSpeed plugin


@dataclass
class DataConfig:
    spec: str = MISSING  # dataset spec: shards:DIR, medmnist:FILE.npz, imagefolder:DIR, csv:FILE
    split: str | None = "train"  # None: every sample (e.g. unlabeled shards without a split)
    in_chans: int = 1  # images are converted to this many channels (gray <-> RGB) before augmentation
    img_size: int = 224  # side of the (global) training crops
    samples_per_epoch: int | None = None  # None: the dataset's size (for streams: the shard set's total)
    num_workers: int = 4
    shuffle_buffer: int = 1000  # streamed shards only


@dataclass
class AugmentConfig:
    """Medical defaults: geometric + intensity augmentations, no colour jitter, solarization or grayscale."""

    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5  # probability; set 0 where laterality matters (e.g. chest X-ray)
    vflip: float = 0.0
    intensity_prob: float = 0.8
    brightness: float = 0.2  # additive shift drawn from [-b, b] (images in [0, 1])
    contrast: float = 0.2  # factor drawn from [1 - c, 1 + c], around the image mean
    gamma: float = 0.2  # exponent drawn log-uniformly from [1 / (1 + g), 1 + g]
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    mean: list[float] = field(default_factory=lambda: [0.5])  # one value per channel, or one for all
    std: list[float] = field(default_factory=lambda: [0.5])


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch16_224"  # any timm model name
    drop_path_rate: float = 0.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs, e.g. {patch_size: 8}
    # Warm start (pretrain.weights): a release / run directory / timm hub folder, a .safetensors or .pt/.pth state
    # dict, original DINOv2 / MAE checkpoints, or hf-hub:ORG/NAME from the local cache; None: random init.
    init: str | None = None


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # for a global batch of 256; scaled linearly (derived.lr)
    min_lr: float = 0.0  # absolute, end of the cosine decay
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value; None: constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: float = 0.0  # max global grad norm; 0: no clipping (the norm is still logged)


@dataclass
class ScheduleConfig:
    epochs: float = 100.0
    warmup_epochs: float = 10.0


@dataclass
class TrainConfig:
    run_dir: str = MISSING
    batch_size: int = 64  # per process and micro-step
    grad_accum: int = 1
    precision: Precision = Precision.auto  # an explicit no / bf16 / fp16 wins over Accelerate's
    seed: int = 0
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    # GPU speed: NHWC memory format (null: on CUDA for convolutional models), cuDNN autotuning (fixed input sizes),
    # torch.compile of the method's forward (in place: checkpoint keys unchanged; not with dist.backend=deepspeed).
    channels_last: bool | None = None
    cudnn_benchmark: bool = True
    compile: bool = False


@dataclass
class DistConfig:
    """How processes train together (``pretrain/distributed.py``); the launcher sets how many there are."""

    backend: Backend = Backend.auto  # deepspeed under an Accelerate config that chose it, else ddp; or explicit
    zero_stage: int | None = None  # deepspeed: 1, 2 or 3; None: the deepspeed_config file's stage, else 2
    deepspeed_config: str | None = None  # deepspeed: a JSON such as configs/deepspeed/zero3.json; None: generated
    # Rendezvous and every collective: a rank that died or never started ends the run with an error after this.
    timeout_s: float = 600.0


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 2  # step-XXXXXXX.pt files kept besides last.pt


@dataclass
class LoggingConfig:
    every_steps: int = 20
    figure_every_steps: int = 1000  # method figures (MAE reconstructions); 0: off
    # experiment trackers through Accelerate (Accelerator(log_with=...)): tensorboard, wandb, mlflow; [] for none.
    # wandb runs offline and mlflow writes RUN_DIR/mlruns unless their own environment variables say otherwise.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress_bar: bool = True


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}  # name -> pip package


def tracker_installed(name: str) -> bool:
    """Accelerate's own availability check of a tracker (imported here only: accelerate is slow to import)."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return bool(
        {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}[name]()
    )


@dataclass
class KNNConfig:
    """Online weighted-kNN accuracy of the exported backbone on a small labeled set (DINO's health signal)."""

    spec: str | None = None  # an indexable labeled dataset, e.g. medmnist:FILE.npz; None: off
    bank_split: str = "train"  # the neighbours
    query_split: str = "val"  # the images classified
    every_steps: int = 0  # 0: off
    max_samples: int = 5000  # per split, evenly spaced
    k: int = 20
    temperature: float = 0.07


@dataclass
class DerivedConfig:
    """Computed by ``derive``; setting any of these in a YAML file or on the command line is an error."""

    world_size: int | None = None
    global_batch: int | None = None
    lr: float | None = None
    samples_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    warmup_steps: int | None = None
    init_sha256: str | None = None  # of the model.init weights file


@dataclass
class _RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    derived: DerivedConfig = field(default_factory=DerivedConfig)


def _schema() -> type:
    """The schema: ``method``, the run sections, then one section per method, declared beside its code
    (``SSLMethod.Config``, named by its ``METHODS`` key): adding a method edits no line here."""
    run = [(f.name, type(f.default_factory()), field(default_factory=f.default_factory)) for f in fields(_RunConfig)]
    methods = [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in METHODS.items()]
    method = ("method", str, field(default="mae"))  # a key of pretrain.methods.METHODS
    sections = [method, *run[:3], *methods, *run[3:]]  # data, augment, model; methods; optim ... derived
    schema = make_dataclass("PretrainConfig", sections)
    schema.__module__ = __name__
    return schema


PretrainConfig = _schema()


def _known_keys(schema: type, dotted: str) -> list[str]:
    """Keys beside ``dotted`` in ``schema`` (for 'did you mean' hints)."""
    parent = dotted.rpartition(".")[0]
    node = OmegaConf.structured(schema)
    node = OmegaConf.select(node, parent) if parent else node
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def config_error(schema: type, source: str, err: OmegaConfBaseException) -> ConfigError:
    """An OmegaConf error as a one-line ConfigError naming the key, with a 'did you mean' hint."""
    key = getattr(err, "full_key", None) or "?"
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    hint = ""
    if "Invalid value 'False'" in message and "no," in message:
        hint = " (YAML reads a bare no as false: write 'no' in quotes, e.g. train.precision=\"'no'\")"
    if "not in" in message:
        close = difflib.get_close_matches(key.split(".")[-1], _known_keys(schema, key), n=1)
        hint = f" (did you mean {'.'.join([*key.split('.')[:-1], close[0]])!r}?)" if close else ""
    return ConfigError(f"{source}: config key {key!r}: {message}{hint}")


def parse_overrides(overrides: list[str], schema: type | None = None) -> DictConfig:
    """``["optim.base_lr=1e-3", ...]`` -> a DictConfig; an item without ``=`` is an error naming it."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: {item!r} is not a key=value override")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise config_error(schema or PretrainConfig, "command line", err) from err


def load_structured(
    schema: type,
    path: str | Path | None = None,
    overrides: list[str] = (),
    computed: tuple[str, ...] = (),
    values: Mapping[str, Any] | None = None,
) -> DictConfig:
    """Schema defaults <- YAML file (overrides only) <- ``values`` <- CLI dotlist, for any dataclass schema.

    ``values``: the Python API's keyword arguments, nested (``{"schedule": {"epochs": 5}}``) or dotted
    (``{"schedule.epochs": 5}``). Unknown keys, wrong types and missing required values raise ``ConfigError``
    naming the key; setting one of the ``computed`` sections is an error too. Shared by the pretraining and
    downstream configs.
    """
    cfg = OmegaConf.structured(schema)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except OmegaConfBaseException as err:
            raise config_error(schema, str(path), err) from err
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot read config: {err}") from err
    if values:
        layers.append(("arguments", nested(values)))
    layers.append(("command line", parse_overrides(list(overrides), schema)))
    for source, layer in layers:
        layer = migrate_legacy_keys(layer)
        for section in computed:
            if section in layer:
                raise ConfigError(
                    f"{source}: config key {section!r} is computed, not set (to resume a run, re-run its original "
                    f"command; to reuse a saved run config.yaml as a recipe, delete its {section} section)"
                )
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise config_error(schema, source, err) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key {missing[0]!r} is required (missing: {', '.join(missing)})")
    return cfg


def nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": {"d": 2}}`` -> ``{"a": {"b": 1}, "c": {"d": 2}}``: OmegaConf's dotted-key update, dicts
    merged at every depth, a later value winning."""
    layer = OmegaConf.create()
    for key, value in values.items():
        OmegaConf.update(layer, str(key), value, merge=True)
    return OmegaConf.to_container(layer)


def migrate_legacy_keys(layer: Any) -> Any:
    """Keys of earlier medfm versions, rewritten in a config layer (a recipe, a run's saved config):
    ``logging.tensorboard: true/false`` became ``logging.trackers: [tensorboard] / []``."""
    logging = layer.get("logging") if isinstance(layer, (dict, DictConfig)) else None
    if isinstance(logging, (dict, DictConfig)) and "tensorboard" in logging:
        enabled = logging.pop("tensorboard")
        if "trackers" not in logging:
            logging["trackers"] = ["tensorboard"] if enabled else []
    return layer


Need = Callable[[bool, str, str], None]  # need(ok, key, what): the checks a schema's types cannot express


def config_need(cfg: DictConfig) -> Need:
    """``need(ok, key, what)`` over ``cfg``: when not ``ok``, a ``ConfigError`` naming the key and its value."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {what} (got {OmegaConf.select(cfg, key)!r})")

    return need


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), values: Mapping[str, Any] | None = None
) -> DictConfig:
    """Schema defaults <- YAML file (overrides only) <- ``values`` (Python API) <- CLI dotlist. Raises
    ``ConfigError`` naming the key."""
    cfg = load_structured(PretrainConfig, path, overrides, computed=("derived",), values=values)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks the schema's types cannot express; each message names the key."""
    need = config_need(cfg)
    need(cfg.method in METHODS, "method", f"must be one of {sorted(METHODS)}")
    for key in ("train.batch_size", "train.grad_accum", "data.img_size", "data.in_chans", "checkpoint.every_steps"):
        need(OmegaConf.select(cfg, key) >= 1, key, "must be >= 1")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.checkpoint.keep >= 0, "checkpoint.keep", "must be >= 0")
    need(cfg.schedule.epochs > 0, "schedule.epochs", "must be > 0")
    need(0 <= cfg.schedule.warmup_epochs <= cfg.schedule.epochs, "schedule.warmup_epochs", "must be in [0, epochs]")
    need(cfg.knn.every_steps == 0 or cfg.knn.spec is not None, "knn.spec", "is needed when knn.every_steps > 0")
    need(cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be > 0")
    need(cfg.dist.zero_stage in (None, 1, 2, 3), "dist.zero_stage", "must be 1, 2 or 3")
    for tracker in cfg.logging.trackers:
        need(tracker in TRACKERS, "logging.trackers", f"{tracker!r} is not one of {list(TRACKERS)}")
        need(tracker_installed(tracker), "logging.trackers", f"{tracker} is not installed (pip install {TRACKERS[tracker]})")  # fmt: skip
    if cfg.dist.backend == Backend.deepspeed:
        # fp16 under DeepSpeed skips overflowing steps through its own loss scaler, which the engine's
        # non-finite-step accounting would count as divergence; bf16 needs no scaler.
        need(cfg.train.precision != Precision.fp16, "train.precision", "must be no or bf16 with dist.backend=deepspeed")
        # DeepSpeed compiles through its own engine (engine.compile), which medfm does not drive yet.
        need(not cfg.train.compile, "train.compile", "is not supported with dist.backend=deepspeed (use ddp)")
    else:
        for key in ("dist.zero_stage", "dist.deepspeed_config"):
            need(OmegaConf.select(cfg, key) is None, key, "is only used with dist.backend=deepspeed")
    for key in (
        "augment.crop_scale",
        "augment.crop_ratio",
        "augment.blur_sigma",
        "optim.betas",
    ):
        value = list(OmegaConf.select(cfg, key))
        need(len(value) == 2 and value[0] <= value[1], key, "must be [low, high]")
    for key in ("augment.mean", "augment.std"):
        need(len(OmegaConf.select(cfg, key)) in (1, cfg.data.in_chans), key, "needs 1 or data.in_chans values")
    for name, method in METHODS.items():
        method.check_config(cfg[name], lambda ok, key, what, name=name: need(ok, f"{name}.{key}", what))


def derive(cfg: DictConfig, world_size: int, dataset_size: int) -> DictConfig:
    """Fill ``cfg.derived``: the only place numbers are computed from other numbers.

    global_batch = batch_size x world_size x grad_accum; lr = base_lr x global_batch / 256 (linear scaling,
    Goyal et al. 2017, as in MAE and DINO); an epoch is ``samples_per_epoch`` samples (default: the dataset
    size) rounded down to whole optimizer steps; every schedule is indexed by the optimizer step.
    """
    derived = derive_steps(
        batch_size=cfg.train.batch_size,
        world_size=world_size,
        grad_accum=cfg.train.grad_accum,
        samples=cfg.data.samples_per_epoch or dataset_size,
        base_lr=cfg.optim.base_lr,
        epochs=cfg.schedule.epochs,
        warmup_epochs=cfg.schedule.warmup_epochs,
    )
    cfg.derived = OmegaConf.merge(cfg.derived, derived)
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain-python copy (enums as strings): what checkpoints store."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config (derived values included) as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
