"""The one pretraining config schema: defaults live here, YAML recipes hold overrides, CLI ``key=value`` on top.

``load_config(path, overrides)`` merges defaults <- YAML <- dotlist and fails before anything is built when a key
is unknown, a value has the wrong type or a required value is missing; the error names the key. What every schema
(pretraining, downstream, benchmark) gets from ``load_structured``:

- YAML aliases may expand to at most ``MAX_YAML_NODES`` values (a 450-byte alias bomb would otherwise build a
  config of billions of nodes); a file that is not valid YAML is a ``ConfigError`` naming it.
- ``${...}`` interpolations: other keys, and environment variables through ``${oc.env:VAR}`` or
  ``${oc.env:VAR,default}`` (e.g. ``train.run_dir: ${oc.env:SCRATCH}/runs/x``); any other resolver is refused.
  Whatever medfm writes (``to_dict``: ``config.yaml``, checkpoints, trackers' hyperparameters, the release's
  recipe) keeps the interpolation text, never its value: a secret in the environment is not copied into the run.
- Every number is finite, each field with ``metadata=within("(0, 1]")`` (or ``PROBABILITY``, ``POSITIVE``, ...)
  lies in its interval, and each field with ``metadata=OUTPUT_PATH`` (a folder medfm creates) holds no control
  character: one pass over the schema's field metadata (``check_values``) checks these for every schema.

``derive(cfg, world_size, dataset_size)`` fills the ``derived`` section (global batch, scaled lr, step counts):
every number computed from others is computed there and nowhere else.
"""

from __future__ import annotations

import difflib
import io
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationValidationError, OmegaConfBaseException

from medfm.pretrain.errors import ConfigError
from medfm.pretrain.methods import METHODS
from medfm.pretrain.schedules import derive_steps
from medfm.pretrain.weights import source_normalization


@dataclass(frozen=True)
class Interval:
    """The values a number may take, written as in mathematics: ``"(0, 1]"``, ``"[0, inf)"``."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        match = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", text)
        if match is None:
            raise ValueError(f"not an interval: {text!r}")  # a schema bug, found when the module is imported
        return cls(float(match[2]), float(match[3]), match[1] == "(", match[4] == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low = f"{self.low:g}"
        if self.high == math.inf:
            return f"must be > {low}" if self.low_open else f"must be >= {low}"
        return f"must be in {'(' if self.low_open else '['}{low}, {self.high:g}{')' if self.high_open else ']'}"


def within(interval: str) -> dict[str, Interval]:
    """Field metadata: the field's number, or each number of its list, lies in ``interval`` (``"[0, 1]"`` for a
    probability), e.g. ``hflip: float = field(default=0.5, metadata=within("[0, 1]"))``; checked by
    ``check_values`` for every schema. ``None`` (an optional field unset) passes."""
    return {"interval": Interval.parse(interval)}


PROBABILITY, POSITIVE, NON_NEGATIVE = within("[0, 1]"), within("(0, inf)"), within("[0, inf)")
AT_LEAST_ONE = within("[1, inf)")

# Field metadata: the field names a folder medfm creates. A control character (a newline, an escape) is refused
# (``check_values``): the folder made would not be the one the user reads back.
OUTPUT_PATH = {"output_path": True}


def control_characters(text: str) -> list[str]:
    """The control characters of ``text`` (C0/C1 controls, DEL, Unicode line and paragraph separators)."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


def check_output_path(path: str | Path, what: str) -> None:
    """A ``ConfigError`` naming ``what`` (``"config key 'train.run_dir'"``, ``"--out"``) when ``path``, a folder
    medfm is about to create, holds a control character."""
    found = control_characters(str(path))
    if found:
        raise ConfigError(
            f"{what}: a path medfm creates must not contain control characters "
            f"(found {''.join(found)!r} in {str(path)!r})"
        )


class Precision(str, Enum):
    auto = "auto"  # Accelerate's choice (`accelerate config`, `accelerate launch --mixed_precision`), else fp32
    fp32 = "fp32"  # no mixed precision; `no` (Accelerate's word, or YAML's false) is read as fp32
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
    # images are converted to this many channels (gray <-> RGB) before augmentation
    in_chans: int = field(default=1, metadata=AT_LEAST_ONE)
    img_size: int = field(default=224, metadata=AT_LEAST_ONE)  # side of the (global) training crops
    # None: the dataset's size (for streams: the shard set's total)
    samples_per_epoch: int | None = field(default=None, metadata=AT_LEAST_ONE)
    num_workers: int = field(default=4, metadata=NON_NEGATIVE)
    shuffle_buffer: int = field(default=1000, metadata=AT_LEAST_ONE)  # streamed shards only


@dataclass
class AugmentConfig:
    """Medical defaults: geometric + intensity augmentations, no colour jitter, solarization or grayscale."""

    # [low, high] fraction of the image area
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0], metadata=within("(0, 1]"))
    # [low, high] aspect ratio
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3], metadata=POSITIVE)
    # probability; set 0 where laterality matters (e.g. chest X-ray)
    hflip: float = field(default=0.5, metadata=PROBABILITY)
    vflip: float = field(default=0.0, metadata=PROBABILITY)
    intensity_prob: float = field(default=0.8, metadata=PROBABILITY)
    # additive shift drawn from [-b, b] (images in [0, 1])
    brightness: float = field(default=0.2, metadata=NON_NEGATIVE)
    # factor drawn from [1 - c, 1 + c], around the image mean
    contrast: float = field(default=0.2, metadata=PROBABILITY)
    gamma: float = field(default=0.2, metadata=NON_NEGATIVE)  # exponent drawn log-uniformly from [1 / (1 + g), 1 + g]
    # gaussian blur probability per view; DINO / DINOv2 / MoCo v3 with asymmetric_blur: DINO's local crops' only
    blur_prob: float = field(default=0.5, metadata=PROBABILITY)
    # [low, high] blur sigma in pixels of a 224-px image, scaled by data.img_size / 224 for every view (local crops
    # too): 0.1-2 px at 224 as SimCLR / DINO, 0.0125-0.25 px at 28. Until issue 22: pixels at any image size
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0], metadata=POSITIVE)
    # DINO / DINOv2 (2 global crops) and MoCo v3 (2 views): blur the first always, the second with probability 0.1,
    # as their reference code (without its solarization); SimCLR (symmetric, as its reference) and MAE ignore it
    asymmetric_blur: bool = True
    # Input normalisation: one value per channel, or one for all; images in [0, 1] are shifted by mean and divided by
    # std. None (both): the warm-start source's own (model.init: its config.json pretrained_cfg, else timm's
    # pretrained_cfg of model.backbone), 0.5 / 0.5 without model.init; what was chosen is in derived.normalization
    mean: list[float] | None = None
    std: list[float] | None = field(default=None, metadata=POSITIVE)


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch16_224"  # any timm model name
    drop_path_rate: float = field(default=0.0, metadata=within("[0, 1)"))
    # ViTs: every block at drop_path_rate (DINOv2's drop_path_uniform) instead of timm's ramp from 0 to it
    drop_path_uniform: bool = False
    # extra timm kwargs, e.g. {patch_size: 8}; and medfm's {small_image_stem: true}: SimCLR's CIFAR stem for a
    # ResNet at <= 32 px (3x3 stride-1 conv1, no max-pool; ViTs ignore it; medfm.pretrain.backbones.use_small_image_stem)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # Warm start (medfm.pretrain.weights): a release / run directory / timm hub folder, a .safetensors or .pt/.pth state
    # dict, original DINOv2 / MAE checkpoints, or hf-hub:ORG/NAME from the local cache; None: random init.
    init: str | None = None


class OptimizerName(str, Enum):
    adamw = "adamw"  # decoupled weight decay (MAE, DINO, DINOv2, MoCo v3)
    # SGD + momentum 0.9 with layer-wise trust ratio 0.001 and coupled L2 decay (SimCLR); biases and norms (the
    # groups without weight decay) get neither adaptation nor decay
    lars = "lars"


@dataclass
class OptimConfig:
    # adamw, or lars (SimCLR's: momentum 0.9, trust coefficient 0.001, needs weight_decay > 0); betas: adamw only
    name: OptimizerName = OptimizerName.adamw
    # lr at the objective's reference batch, scaled by its rule to derived.lr: linear from 256 (MAE, DINO, MoCo,
    # SimCLR), square root from 1024 (DINOv2, whose reference base_lr is 0.004)
    base_lr: float = field(default=1.5e-4, metadata=POSITIVE)
    min_lr: float = field(default=0.0, metadata=NON_NEGATIVE)  # absolute, end of the cosine decay
    weight_decay: float = field(default=0.05, metadata=NON_NEGATIVE)
    # cosine weight-decay schedule to this value; None: constant
    weight_decay_end: float | None = field(default=None, metadata=NON_NEGATIVE)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=within("[0, 1)"))
    # max global grad norm; 0: no clipping (the norm is still logged)
    clip_grad: float = field(default=0.0, metadata=NON_NEGATIVE)


@dataclass
class ScheduleConfig:
    epochs: float = field(default=100.0, metadata=POSITIVE)
    warmup_epochs: float = field(default=10.0, metadata=NON_NEGATIVE)  # at most epochs


@dataclass
class TrainConfig:
    run_dir: str = field(default=MISSING, metadata=OUTPUT_PATH)
    batch_size: int = field(default=64, metadata=AT_LEAST_ONE)  # per process and micro-step
    grad_accum: int = field(default=1, metadata=AT_LEAST_ONE)
    precision: Precision = Precision.auto  # an explicit no / bf16 / fp16 wins over Accelerate's
    seed: int = 0
    # this many non-finite losses in a row stop the run
    max_nonfinite_steps: int = field(default=5, metadata=AT_LEAST_ONE)
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
    timeout_s: float = field(default=600.0, metadata=POSITIVE)


@dataclass
class CheckpointConfig:
    every_steps: int = field(default=1000, metadata=AT_LEAST_ONE)
    keep: int = field(default=2, metadata=NON_NEGATIVE)  # step-XXXXXXX.pt files kept besides last.pt


@dataclass
class LoggingConfig:
    every_steps: int = field(default=20, metadata=AT_LEAST_ONE)
    figure_every_steps: int = field(default=1000, metadata=NON_NEGATIVE)  # method figures (MAE reconstructions); 0: off
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
    every_steps: int = field(default=0, metadata=NON_NEGATIVE)  # 0: off
    max_samples: int = field(default=5000, metadata=AT_LEAST_ONE)  # per split, evenly spaced
    k: int = field(default=20, metadata=AT_LEAST_ONE)
    temperature: float = field(default=0.07, metadata=POSITIVE)


@dataclass
class DerivedConfig:
    """Computed by ``derive``; setting any of these in a YAML file or on the command line is an error."""

    world_size: int | None = None
    global_batch: int | None = None
    lr: float | None = None
    lr_scaling: str | None = None  # the objective's rule (medfm.pretrain.schedules.LrScaling): how lr follows the batch
    samples_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    warmup_steps: int | None = None
    init_sha256: str | None = None  # of the model.init weights file
    auto: str | None = None  # the method's values its config left "auto", and the image count they follow
    normalization: str | None = None  # where augment.mean / std came from (the config, a warm-start source, default)


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
    method = ("method", str, field(default="mae"))  # a key of medfm.pretrain.methods.METHODS
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
    if "not in" in message:
        close = difflib.get_close_matches(key.split(".")[-1], _known_keys(schema, key), n=1)
        hint = f" (did you mean {'.'.join([*key.split('.')[:-1], close[0]])!r}?)" if close else ""
    return ConfigError(f"{source}: config key {key!r}: {message}{hint}")


def parse_overrides(overrides: list[str], schema: type | None = None) -> DictConfig:
    """``["optim.base_lr=1e-3", ...]`` -> a DictConfig; an item without ``=`` is an error naming it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: {item!r} is not a key=value override")
        if control_characters(value):  # YAML would fold a newline into a space: another value than the one typed
            raise ConfigError(f"command line: config key {key!r}: control characters are not allowed (got {value!r})")
        check_yaml_size(value, f"command line: {key}")  # each value is parsed as YAML
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
        layers.append((str(path), read_yaml(path, schema)))
    if values:
        layers.append(("arguments", nested(values)))
    layers.append(("command line", parse_overrides(list(overrides), schema)))
    for source, layer in layers:
        check_interpolations(layer, source)
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
    try:
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves, to a value of its key's type
    except InterpolationValidationError as err:  # OmegaConf's message quotes the value: maybe a secret
        written = re.search(r"interpolation '(.*?)'", str(err))
        raise ConfigError(
            f"config key {err.full_key!r}: {written[1] if written else 'its interpolation'} does not resolve to a "
            "value of the key's type"
        ) from None
    except OmegaConfBaseException as err:
        raise config_error(schema, "config", err) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key {missing[0]!r} is required (missing: {', '.join(missing)})")
    check_values(cfg)
    return cfg


# A YAML file may use anchors and aliases, but they may not expand past this many values: 9 nested levels of 10
# aliases in 450 bytes are 10^9 values, which OmegaConf would build one by one. The largest shipped config has 177.
MAX_YAML_NODES = 10_000


def check_yaml_size(text: str, source: str) -> None:
    """A ``ConfigError`` naming ``source`` when the YAML ``text``, aliases expanded, holds more than
    ``MAX_YAML_NODES`` values (counted on PyYAML's node graph, where an alias is the node it names: linear time)."""
    if "*" not in text:  # no alias: nothing can expand
        return
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    sizes: dict[int, int] = {}  # id(node) -> values it expands to
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError(f"{source}: a YAML alias refers to a node that contains it (an endless value)")
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1 + sum(size(child) for child in children)
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: YAML aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?): "
                "write the values out or use fewer nested aliases"
            )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    if root is not None:
        try:
            size(root)
        except RecursionError:
            raise ConfigError(f"{source}: YAML nested too deeply") from None


def read_yaml(path: str | Path, schema: type) -> DictConfig:
    """A YAML config file as a DictConfig, after ``check_yaml_size``; every failure is a ``ConfigError`` naming
    the file."""
    try:
        text = Path(path).read_text()
    except (OSError, ValueError) as err:  # ValueError: not UTF-8
        raise ConfigError(f"{path}: cannot read config: {err}") from err
    check_yaml_size(text, str(path))
    try:
        layer = OmegaConf.load(io.StringIO(text))
    except OmegaConfBaseException as err:
        raise config_error(schema, str(path), err) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except (RecursionError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: a config file holds keys (a YAML mapping), not a {type(layer).__name__}")
    return layer


# ${NAME:...} where NAME is a resolver (a key interpolation, ${a.b}, has no colon); \${ is literal text.
_RESOLVER = re.compile(r"(?<!\\)\$\{\s*([A-Za-z_][\w.\-]*)\s*:")
ALLOWED_RESOLVERS = ("oc.env",)


def check_interpolations(layer: Any, source: str) -> None:
    """Interpolations may name other keys or environment variables (``${oc.env:VAR}``); any other resolver
    (``oc.decode``, ``oc.create``, a custom one) is a ``ConfigError`` naming the key and ``source``."""

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{key}[{i}]")
        elif isinstance(value, str):
            for name in _RESOLVER.findall(value):
                if name not in ALLOWED_RESOLVERS:
                    raise ConfigError(
                        f"{source}: config key {key!r}: the resolver {name!r} is not allowed "
                        f"(interpolations may name keys, ${{a.b}}, or environment variables, ${{oc.env:VAR}})"
                    )

    container = layer if isinstance(layer, dict) else OmegaConf.to_container(layer, resolve=False)
    walk(container, "")


def check_values(cfg: DictConfig) -> None:
    """One pass over every value of a loaded config (interpolations resolved): numbers are finite, a field with
    ``within`` metadata lies in its interval, an ``OUTPUT_PATH`` field holds no control character. ``ConfigError`` names
    the key."""

    def fail(key: str, what: str, value: Any) -> None:
        raise ConfigError(f"config key {key!r}: {what} (got {value!r})")

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        rules = {f.name: f.metadata for f in fields(schema)} if is_dataclass(schema) else {}
        for name in node:
            key, value = f"{prefix}{name}", node[name]
            if isinstance(value, DictConfig):
                walk(value, f"{key}.")
                continue
            items = list(value) if isinstance(value, ListConfig) else [value]
            for i, item in enumerate(items):
                if isinstance(item, DictConfig):
                    walk(item, f"{key}[{i}].")
            numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if not all(math.isfinite(v) for v in numbers):
                fail(key, "must be a finite number", _plain(value))
            interval = rules.get(name, {}).get("interval")
            if interval is not None and not all(v in interval for v in numbers):
                fail(key, str(interval), _plain(value))
            if rules.get(name, {}).get("output_path") and isinstance(value, str):
                check_output_path(value, f"config key {key!r}")

    walk(cfg, "")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


def nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": {"d": 2}}`` -> ``{"a": {"b": 1}, "c": {"d": 2}}``: OmegaConf's dotted-key update, dicts
    merged at every depth, a later value winning."""
    layer = OmegaConf.create()
    for key, value in values.items():
        OmegaConf.update(layer, str(key), value, merge=True)
    return OmegaConf.to_container(layer)


def precision_name(value: Any) -> Any:
    """``train.precision`` as medfm spells it: Accelerate's ``no`` and YAML's reading of a bare ``no`` (false) are
    ``fp32``; anything else unchanged (the schema checks it)."""
    return "fp32" if value is False or (isinstance(value, str) and value.lower() == "no") else value


def migrate_legacy_keys(layer: Any) -> Any:
    """Keys of earlier medfm versions, rewritten in a config layer (a recipe, a run's saved config):
    ``logging.tensorboard: true/false`` became ``logging.trackers: [tensorboard] / []``; ``train.precision: no``
    became ``fp32`` (``no`` is still read as such)."""
    train = layer.get("train") if isinstance(layer, (dict, DictConfig)) else None
    if isinstance(train, (dict, DictConfig)) and "precision" in train:
        train["precision"] = precision_name(train["precision"])
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
    """Checks the schema's types and field metadata (``check_values``) cannot express; each message names the key."""
    need = config_need(cfg)
    need(cfg.method in METHODS, "method", f"must be one of {sorted(METHODS)}")
    need(cfg.schedule.warmup_epochs <= cfg.schedule.epochs, "schedule.warmup_epochs", "must be in [0, epochs]")
    need(cfg.knn.every_steps == 0 or cfg.knn.spec is not None, "knn.spec", "is needed when knn.every_steps > 0")
    need(cfg.dist.zero_stage in (None, 1, 2, 3), "dist.zero_stage", "must be 1, 2 or 3")
    for tracker in cfg.logging.trackers:
        need(tracker in TRACKERS, "logging.trackers", f"{tracker!r} is not one of {list(TRACKERS)}")
        need(
            tracker_installed(tracker),
            "logging.trackers",
            f"{tracker} is not installed (pip install {TRACKERS[tracker]})",
        )
    if cfg.dist.backend == Backend.deepspeed:
        # fp16 under DeepSpeed skips overflowing steps through its own loss scaler, which the engine's
        # non-finite-step accounting would count as divergence; bf16 needs no scaler.
        need(
            cfg.train.precision != Precision.fp16, "train.precision", "must be fp32 or bf16 with dist.backend=deepspeed"
        )
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
    mean, std = cfg.augment.mean, cfg.augment.std
    alone, other = ("augment.std", "augment.mean") if mean is None else ("augment.mean", "augment.std")
    need((mean is None) == (std is None), alone, f"is set without {other}: set both, or neither (the source's own)")
    for key in ("augment.mean", "augment.std"):
        values = OmegaConf.select(cfg, key)
        need(values is None or len(values) in (1, cfg.data.in_chans), key, "needs 1 or data.in_chans values")
    for name, method in METHODS.items():
        method.check_config(cfg[name], lambda ok, key, what, name=name: need(ok, f"{name}.{key}", what))


def derive(cfg: DictConfig, world_size: int, dataset_size: int) -> DictConfig:
    """Fill ``cfg.derived``: the only place numbers are computed from other numbers.

    global_batch = batch_size x world_size x grad_accum; lr = base_lr scaled by the objective's rule
    (``SSLMethod.lr_scaling``: linear from 256, Goyal et al. 2017, as MAE and DINO; square root from 1024 for
    DINOv2); an epoch is ``samples_per_epoch`` samples (default: the dataset size) rounded down to whole
    optimizer steps; every schedule is indexed by the optimizer step. The objective's ``auto`` values follow
    the image count (``SSLMethod.resolve_auto``); the input normalisation left out of the config is the
    warm-start source's (``resolve_normalization``).
    """
    derived = derive_steps(
        batch_size=cfg.train.batch_size,
        world_size=world_size,
        grad_accum=cfg.train.grad_accum,
        samples=cfg.data.samples_per_epoch or dataset_size,
        base_lr=cfg.optim.base_lr,
        epochs=cfg.schedule.epochs,
        warmup_epochs=cfg.schedule.warmup_epochs,
        lr_scaling=METHODS[cfg.method].lr_scaling,
    )
    cfg.derived = OmegaConf.merge(cfg.derived, derived)
    chosen = METHODS[cfg.method].resolve_auto(cfg, dataset_size)
    if chosen:
        cfg.derived.auto = f"{', '.join(chosen)} ({dataset_size} images)"
    resolve_normalization(cfg)
    return cfg


def to_dict(cfg: DictConfig, resolve: bool = False) -> dict[str, Any]:
    """Plain-python copy (enums as strings): what checkpoints, trackers and releases store. Interpolations stay as
    written (``${oc.env:SCRATCH}/runs``), never their values: what the environment holds (a token, a key) is not
    copied into a run; loading the copy resolves them again. ``resolve=True``: the values, for building things."""
    return OmegaConf.to_container(cfg, resolve=resolve, enum_to_str=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the config (derived values included, interpolations as written: ``to_dict``) as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))


def resolve_normalization(cfg: DictConfig) -> None:
    """``augment.mean`` / ``std`` left out: the warm-start source's own (``medfm.pretrain.weights.source_normalization``),
    fitted to ``data.in_chans``; set ones are kept. Either way ``derived.normalization`` says where they came from
    (a resumed run has adopted its saved values before: ``medfm.pretrain.main.settle_from_run_dir``)."""
    if cfg.augment.mean is not None:
        if cfg.derived.normalization is None:
            cfg.derived.normalization = "the config (augment.mean / std)"
        return
    found = source_normalization(cfg.model.init, cfg.model.backbone).for_channels(cfg.data.in_chans)
    cfg.augment.mean, cfg.augment.std, cfg.derived.normalization = found.mean, found.std, found.origin
