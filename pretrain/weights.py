"""Weights from anywhere, read without running pickled code and loaded strictly: the reading half of the release
contract (``medfm.pretrain.release`` writes releases and reads run directories through it) and warm starts.

Readers: a release or timm hub folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``), a bare
``.safetensors`` file, a ``.pt`` / ``.pth`` / ``.bin`` state dict (``torch.load(weights_only=True)``: a file that
needs pickle is refused). :func:`check_keys` is the one key checker: it names every missing, unexpected and
mis-shaped key, then every tensor whose kind differs (:func:`check_dtypes`: integers where the model has floats).
A folder's ``config.json`` is data, never code (:func:`check_release_config`), for a release read by ``medfm eval``
as for a warm start or a baseline.

Warm starts (``model.init``, :func:`load_init`): any of those sources, a pretraining run directory's
``release/``, or ``hf-hub:ORG/NAME`` resolved from the local Hugging Face cache only (nothing is downloaded), is
fitted to the run's backbone and loaded strictly. Fitting (:func:`fit_state_dict`) maps key names through the
architecture's own timm checkpoint filter (original DINOv2 and MAE checkpoints, ``module.`` prefixes, patch and
position embeddings resampled to the run's patch and image size), drops what only pretraining used (an MAE
decoder, a DINOv2 mask token, a classifier the backbone does not have; each named in the report) and adapts the
first convolution to the run's channels (timm's ``adapt_input_conv``: RGB -> gray sums the kernel).
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv  # exported by timm.models (public) since timm 0.9
from torch import Tensor, nn

from medfm.data_shards.codec import file_sha256
from medfm.pretrain import backbones
from medfm.pretrain.backbones import MODULE_PREFIX
from medfm.pretrain.errors import ReleaseError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_PREFIX = "hf-hub:"
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
# Keys that only pretraining used: an MAE decoder and mask token, DINOv2's mask token.
_PRETRAINING_ONLY = ("decoder", "mask_token")
MAX_IMG_SIZE = 8192  # px per side a release may declare: a ViT's position embedding grows with its square
MAX_IN_CHANS = 512
# timm.create_model arguments that load or describe other weights: never taken from a release's model_args.
_LOADING_ARGS = (
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "cache_dir",
    "num_classes",
    "features_only",
)


class LoadError(ReleaseError):
    """Weights that cannot be loaded as asked: unknown source, refused pickle, or keys that do not match."""


class ReleaseConfigError(LoadError, ValueError):
    """A release's ``config.json`` that is not a plain description of a timm model (the message names the file and
    the key). A ``ValueError`` too, as the builder's errors it replaces were."""


@dataclass(frozen=True)
class Release:
    """What a backbone source holds: enough to rebuild the model and check every key."""

    architecture: str
    model_args: dict[str, Any]  # timm kwargs of the weights' shapes (in_chans, img_size, patch_size, ...)
    state_dict: dict[str, Tensor] = field(repr=False)
    pretrained_cfg: dict[str, Any]  # input_size, mean, std, interpolation, first_conv, classifier
    source: Path
    info: dict[str, Any] = field(default_factory=dict)  # config.json's "medfm" section (objective, steps, ...)

    @classmethod
    def from_config(cls, config: dict[str, Any], state_dict: dict[str, Tensor], source: Path) -> Release:
        """From ``config.json`` content (timm's hub layout, optional ``medfm`` section) and the weights."""
        return cls(
            architecture=config["architecture"],
            model_args=dict(config.get("model_args", {})),
            state_dict=state_dict,
            pretrained_cfg=dict(config.get("pretrained_cfg", {})),
            source=source,
            info=dict(config.get("medfm", {})),
        )

    @property
    def in_chans(self) -> int:
        return int(self.model_args.get("in_chans", self.pretrained_cfg.get("input_size", [3])[0]))

    @property
    def img_size(self) -> int:
        size = self.model_args.get("img_size") or self.pretrained_cfg.get("input_size", [0, 224])[1]
        return int(size[0] if isinstance(size, (list, tuple)) else size)


def check_keys(
    expected: Mapping[str, Tensor],
    loaded: Mapping[str, Tensor],
    source: str | Path,
    *,
    model: str = "the model",
    allowed_missing: Collection[str] = frozenset(),
    error: type[ReleaseError] = LoadError,
) -> None:
    """Raise ``error`` naming every key of ``expected`` that ``loaded`` lacks (beyond ``allowed_missing``), every
    key of ``loaded`` that ``expected`` does not have, and every shape that differs.

    Args:
        expected: the state dict of the model the weights go into (or of the reference they must match).
        loaded: the weights.
        source: the file or folder the weights came from (first in the message).
        model: what ``expected`` is, for the message.
    """
    missing = sorted(set(expected) - set(loaded) - set(allowed_missing))
    unexpected = sorted(set(loaded) - set(expected))
    wrong = sorted(k for k in set(loaded) & set(expected) if loaded[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong):
        check_dtypes(expected, loaded, source, model=model, error=error)  # names and shapes match: now the kinds
        return
    parts = []
    if missing:
        parts.append(f"missing from the weights ({len(missing)}): {_names(missing)}")
    if unexpected:
        parts.append(f"not in the model ({len(unexpected)}): {_names(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong]
        parts.append(f"shape mismatch ({len(wrong)}): {_names(shapes)}")
        if any(loaded[k].numel() == 0 for k in wrong):
            parts.append(
                "empty tensors are ZeRO-3 shards, not weights: save the consolidated state dict "
                "(accelerator.get_state_dict) or convert the checkpoint with zero_to_fp32 first"
            )
    raise error(f"{source}: weights do not match {model}; " + "; ".join(parts))


def _names(keys: list[str], limit: int = 40) -> str:
    return ", ".join(keys[:limit]) + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; anything that would run pickled code is refused with a LoadError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused(path, err) from None


def refused(path: Path | None, err: Exception) -> LoadError:
    reason = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
    return LoadError(
        f"{path}: refused: the file holds pickled objects other than tensors and plain values, which could run "
        f"code when loaded ({reason}). medfm loads weights with weights_only=True only; convert trusted "
        "weights to safetensors first."
    )


def state_dict_of(obj: Any, path: Path) -> dict[str, Tensor]:
    """A plain ``{key: tensor}`` from a loaded object: the dict itself or its state_dict / model entry."""
    for key in _STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise LoadError(
            f"{path}: not a state dict of tensors (top-level keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})"
        )
    prefix = "module."  # DistributedDataParallel wrappers
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise LoadError(f"{path}: not a readable safetensors file: {err}") from err
    if path.suffix in PICKLE_SUFFIXES:
        return state_dict_of(safe_torch_load(path), path)
    raise LoadError(f"{path}: unknown weights format (expected .safetensors or {', '.join(PICKLE_SUFFIXES)})")


def weights_in(folder: Path) -> Path:
    """timm's order: model.safetensors, then other safetensors, then pickled state dicts."""
    if (folder / WEIGHTS_NAME).is_file():
        return folder / WEIGHTS_NAME
    for pattern in ("*.safetensors", "pytorch_model.bin", *(f"*{s}" for s in PICKLE_SUFFIXES)):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise LoadError(f"{folder}: config.json but no weights file ({WEIGHTS_NAME}, *.safetensors, *.pt, *.bin)")


def read_config(config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LoadError(f"{config_path}: cannot read the release config: {err}") from err
    if not isinstance(config, dict) or "architecture" not in config:
        raise LoadError(f"{config_path}: no 'architecture' key (not a timm / medfm release config)")
    return config


def check_dtypes(
    expected: Mapping[str, Tensor],
    loaded: Mapping[str, Tensor],
    source: str | Path,
    *,
    model: str = "the model",
    error: type[ReleaseError] = LoadError,
) -> None:
    """Raise ``error`` naming the tensors of ``loaded`` whose kind differs from the model's: floating-point
    weights where the model has floating-point tensors (any float precision: fp16 / bf16 releases load), integer
    ones where it has integers (BatchNorm's ``num_batches_tracked``). Keys only one side has: :func:`check_keys`."""
    wrong = [
        f"{k} {str(loaded[k].dtype).removeprefix('torch.')} vs model {str(expected[k].dtype).removeprefix('torch.')}"
        for k in sorted(set(loaded) & set(expected))
        if loaded[k].is_floating_point() != expected[k].is_floating_point()
    ]
    if wrong:
        more = f", ... and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise error(
            f"{source}: weights of the wrong dtype for {model} ({len(wrong)}): {', '.join(wrong[:5])}{more}; "
            "released weights are floating point (was the file re-saved or quantized? export it again)"
        )


def check_release_config(config: dict[str, Any], path: str | Path) -> None:
    """Refuse a ``config.json`` that is not a plain description of a timm model (see the module doc), naming the
    file and the key; nothing it names is imported or built here."""

    def refuse(key: str, why: str) -> None:
        raise ReleaseConfigError(f"{path}: key {key!r} {why}")

    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        refuse("architecture", f"must be a timm model name, got {architecture!r}")
    if architecture.startswith(MODULE_PREFIX):
        # A user module is built from the class the user registered in this process, never imported by name.
        if architecture.removeprefix(MODULE_PREFIX) not in backbones._registered:
            refuse(
                "architecture",
                f"is {architecture!r}, a user module that is not registered in this process: "
                "register its class first (medfm.register_module); medfm never imports code a release names",
            )
    elif not timm.is_model(architecture):
        refuse(
            "architecture",
            f"is {architecture!r}, not a timm model (timm.list_models()); medfm never imports code a release names",
        )
    for key in ("model_args", "pretrained_cfg", "medfm"):
        if key in config and not isinstance(config[key], dict):
            refuse(key, f"must be a JSON object, got {type(config[key]).__name__} {str(config[key])[:60]!r}")
    args = config.get("model_args", {})
    loading = sorted(set(args) & set(_LOADING_ARGS))
    if loading:
        refuse(f"model_args.{loading[0]}", "is not a model argument (it loads or describes other weights)")
    if "img_size" in args:
        sizes = args["img_size"] if isinstance(args["img_size"], list) else [args["img_size"]]
        if not sizes or len(sizes) > 2 or not all(_int_in(v, 1, MAX_IMG_SIZE) for v in sizes):
            refuse(
                "model_args.img_size",
                f"must be an image side (or [height, width]) of 1 to {MAX_IMG_SIZE} px, got {args['img_size']!r}",
            )
    if "in_chans" in args and not _int_in(args["in_chans"], 1, MAX_IN_CHANS):
        refuse("model_args.in_chans", f"must be a channel count of 1 to {MAX_IN_CHANS}, got {args['in_chans']!r}")
    input_size = config.get("pretrained_cfg", {}).get("input_size")
    if input_size is not None and not (
        isinstance(input_size, list)
        and len(input_size) == 3
        and _int_in(input_size[0], 1, MAX_IN_CHANS)
        and all(_int_in(v, 1, MAX_IMG_SIZE) for v in input_size[1:])
    ):
        refuse("pretrained_cfg.input_size", f"must be [channels, height, width] within bounds, got {input_size!r}")


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def read_release_folder(config_path: Path, weights: Path) -> Release:
    """A release (or timm hub) folder's ``config.json``, checked (:func:`check_release_config`) before its weights
    are read."""
    config = read_config(config_path)
    check_release_config(config, config_path)
    return Release.from_config(config, read_weights(weights), weights)


# --- warm starts -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitReport:
    """What a warm start loaded: the source as given, the file read and its sha256, what was adapted or dropped."""

    source: str
    path: Path
    sha256: str
    adapted: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file": str(self.path),
            "sha256": self.sha256,
            "adapted": list(self.adapted),
            "dropped": list(self.dropped),
        }


def resolve_source(source: str, key: str = "model.init") -> Path:
    """A path, or ``hf-hub:ORG/NAME[@REVISION]`` resolved to its snapshot in the local Hugging Face cache."""
    if not source.startswith(HF_PREFIX):
        path = Path(source).expanduser()
        if not path.exists():
            raise LoadError(f"{key}: {path} does not exist")
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = source[len(HF_PREFIX) :].partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as err:
        raise LoadError(
            f"{key}: {source} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}; set HF_HOME or "
            f"HF_HUB_CACHE to another cache). medfm never downloads: fetch it on a machine with internet "
            f"(`huggingface-cli download {repo}`) and copy the cache, or pass the snapshot folder. ({err})"
        ) from None


def init_weights_path(source: str) -> Path:
    """The file a warm start reads (for its sha256): the weights file, or the folder's weights."""
    path = resolve_source(source)
    if path.is_file():
        return path
    folder = path if (path / CONFIG_NAME).is_file() else path / "release"
    return weights_in(folder) if (folder / CONFIG_NAME).is_file() else path


def read_init(source: str, architecture: str, key: str = "model.init") -> Release:
    """The weights a warm start names (see the module docstring); ``architecture`` describes a bare weights file;
    ``key``: the config key that named them (for messages)."""
    path = resolve_source(source, key)
    if path.is_dir():
        for folder in (path, path / "release"):  # a release / hub folder, or a run directory's release
            if (folder / CONFIG_NAME).is_file():
                try:
                    config = json.loads((folder / CONFIG_NAME).read_text())
                except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
                    raise LoadError(f"{key}: {folder / CONFIG_NAME}: cannot read the release config: {err}") from None
                if isinstance(config, dict) and "architecture" not in config and "model_type" in config:
                    kind = config["model_type"]
                    raise LoadError(
                        f"{key}: {folder / CONFIG_NAME} is a transformers-format config (model_type {kind!r}), "
                        "not a timm one: use the timm snapshot of the model (e.g. hf-hub:timm/"
                        "vit_base_patch14_dinov2.lvd142m) or its original checkpoint file"
                    )
                return read_release_folder(folder / CONFIG_NAME, weights_in(folder))
        raise LoadError(
            f"{key}: {path} has no {CONFIG_NAME} (a release, a timm hub snapshot, or a run directory with "
            "release/; for a run still training, `medfm export` it first)"
        )
    return Release(
        architecture=architecture, model_args={}, state_dict=read_weights(path), pretrained_cfg={}, source=path
    )


DEFAULT_NORMALIZATION = ([0.5], [0.5])  # medfm's for a random init: [0, 1] images to [-1, 1]


@dataclass(frozen=True)
class Normalization:
    """The mean / std a backbone's inputs are normalised with, and where they were found (for the run's log)."""

    mean: list[float]
    std: list[float]
    origin: str

    def for_channels(self, in_chans: int) -> Normalization:
        """Per-channel values for ``in_chans`` inputs: kept when they fit (or are one for all); otherwise (an RGB
        source on gray images) the channel average, as the first conv's kernel is summed over them."""
        if len(self.mean) in (1, in_chans) and len(self.std) in (1, in_chans):
            return self
        average = lambda values: [sum(values) / len(values)]  # noqa: E731
        return Normalization(average(self.mean), average(self.std), f"{self.origin}, averaged over channels")


def source_normalization(source: str | None, architecture: str, key: str = "model.init") -> Normalization:
    """The normalisation ``source``'s weights were trained with: its ``config.json`` ``pretrained_cfg`` (a medfm
    release, a timm hub snapshot, a run's release), else timm's ``pretrained_cfg`` of ``architecture`` (a bare
    weights file, original DINOv2 / MAE checkpoints), else medfm's 0.5 / 0.5; without a source, medfm's."""
    if source is None:
        return Normalization(*DEFAULT_NORMALIZATION, "medfm's default (no warm start)")
    path = resolve_source(source, key)
    folders = (path, path / "release") if path.is_dir() else ()
    for config_path in (folder / CONFIG_NAME for folder in folders):
        if config_path.is_file():
            found = read_config(config_path).get("pretrained_cfg") or {}
            if found.get("mean") and found.get("std"):
                return Normalization(list(found["mean"]), list(found["std"]), f"{key} {config_path}")
            break
    timm_cfg = timm.models.get_pretrained_cfg(architecture)
    if timm_cfg is not None and timm_cfg.mean and timm_cfg.std:
        tag = f"{architecture}.{timm_cfg.tag}" if timm_cfg.tag and "." not in architecture else architecture
        return Normalization(
            list(timm_cfg.mean), list(timm_cfg.std), f"timm's pretrained_cfg of {tag} ({key} names no config.json)"
        )
    return Normalization(*DEFAULT_NORMALIZATION, f"medfm's default ({key} and timm name none for {architecture})")


def fit_state_dict(
    state: dict[str, Tensor], model: nn.Module, first_conv: str | None = None, *, foreign: bool = True
) -> tuple[dict[str, Tensor], tuple[str, ...], tuple[str, ...]]:
    """``state`` as ``model`` names and shapes it: (state, adapted keys, dropped keys). See the module docstring.

    ``foreign``: weights of another training (a warm start, a baseline): key names mapped by timm's filter, patch
    embeddings resampled, pretraining-only keys dropped. ``foreign=False`` (a release of this architecture): only
    the position embedding and the first conv follow the requested input; any other difference is left to the
    key check, which names it."""
    original, expected = state, model.state_dict()
    module = sys.modules.get(type(model).__module__)
    timm_filter = getattr(module, "checkpoint_filter_fn", None) if foreign else None
    if timm_filter is not None and any(k not in expected or state[k].shape != expected[k].shape for k in state):
        state = timm_filter(dict(state), model)  # key names of the original code, resampled embeddings
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    pretraining_only = (*_PRETRAINING_ONLY, *(f"{h}." for h in heads)) if foreign else ()
    drop = [k for k in state if k not in expected and k.startswith(pretraining_only)] if foreign else []
    state = {k: v for k, v in state.items() if k not in drop}
    drop += [k for k in original if k not in state and k.startswith(_PRETRAINING_ONLY)]  # removed by timm's filter
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if (
        pos is not None
        and isinstance(target, Tensor)
        and pos.shape != target.shape
        and pos.shape[-1] == target.shape[-1]
    ):
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix, verbose=False
        )
    first_conv = first_conv or (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{first_conv}.weight" if first_conv else None
    if key in state and key in expected and state[key].ndim == 4:
        weight, channels = state[key], expected[key].shape[1]
        if weight.shape[1] != channels and weight.shape[0] == expected[key].shape[0]:
            state[key] = adapt_first_conv(weight, channels)
    adapted = [k for k in state if k in original and state[k].shape != original[k].shape]
    return state, tuple(sorted(adapted)), tuple(sorted(set(drop)))


def adapt_first_conv(weight: Tensor, channels: int) -> Tensor:
    """First-conv weight (O, I, kh, kw) -> (O, channels, kh, kw): timm's ``adapt_input_conv`` from RGB (gray:
    the kernel summed, so a gray image gives the RGB model's output on that image repeated); from another count
    (gray -> RGB) the kernel summed and spread evenly, which keeps the output on a gray image."""
    if weight.shape[1] == 3:
        return adapt_input_conv(channels, weight)
    return (weight.sum(dim=1, keepdim=True) / channels).repeat(1, channels, 1, 1)


def load_init(model: nn.Module, source: str, architecture: str) -> InitReport:
    """Warm-start ``model`` (a timm backbone, ``num_classes=0``) from ``source``: every key, or a LoadError."""
    weights = read_init(source, architecture)
    first_conv = weights.pretrained_cfg.get("first_conv")
    state, adapted, dropped = fit_state_dict(weights.state_dict, model, first_conv)
    check_keys(model.state_dict(), state, weights.source, model=f"the run's {architecture}")
    model.load_state_dict(state, strict=True)
    return InitReport(source, weights.source, file_sha256(weights.source), adapted, dropped)
