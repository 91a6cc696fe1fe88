"""Load a backbone by path: a release folder, a pretraining run directory or a weights file. Strict and loud.

- Sources: a release folder (``config.json`` + ``model.safetensors``, as ``medfm export`` writes and timm reads
  from a hub repo), a run directory (its newest checkpoint, through ``pretrain.export.load_run``: the DINO
  teacher, MoCo momentum encoder, MAE encoder), a ``.safetensors`` file, or a ``.pt`` / ``.pth`` / ``.bin``
  state dict (architecture from a ``config.json`` beside it, or given).
- No pickled code runs: safetensors, or ``torch.load(weights_only=True)``; a file that needs more is refused.
- The backbone is rebuilt through ``pretrain.backbones.build_backbone`` and the exact set of keys that did not
  load is checked: anything other than the new classifier's keys (``num_classes > 0``) is an error naming the
  missing, unexpected and mis-shaped keys. A silent partial load is the classic failure of released SSL weights.
- ViT position embeddings are resampled (timm's ``resample_abs_pos_embed``) when ``img_size`` changes; the
  first convolution is adapted (``adapt_channels``) when ``in_chans`` changes.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from pretrain import checkpoint as ckpt
from pretrain.backbones import build_backbone
from pretrain.errors import ReleaseError
from pretrain.export import CONFIG_NAME, WEIGHTS_NAME, ExportError, data_summary, load_run, release_config

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
RUN_CONFIG = "config.yaml"  # what marks a pretraining run directory
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


class LoadError(ReleaseError):
    """Weights that cannot be loaded as asked: unknown source, refused pickle, or keys that do not match."""


@dataclass(frozen=True)
class Release:
    """What a backbone source holds: enough to rebuild the model and check every key."""

    architecture: str
    model_args: dict[str, Any]  # timm kwargs of the weights' shapes (in_chans, img_size, patch_size, ...)
    state_dict: dict[str, Tensor] = field(repr=False)
    pretrained_cfg: dict[str, Any]  # input_size, mean, std, interpolation, first_conv, classifier
    source: Path
    info: dict[str, Any] = field(default_factory=dict)  # config.json's "medfm" section (objective, steps, ...)

    @property
    def in_chans(self) -> int:
        return int(self.model_args.get("in_chans", self.pretrained_cfg.get("input_size", [3])[0]))

    @property
    def img_size(self) -> int:
        size = self.model_args.get("img_size") or self.pretrained_cfg.get("input_size", [0, 224])[1]
        return int(size[0] if isinstance(size, (list, tuple)) else size)


@dataclass(frozen=True)
class LoadReport:
    """Keys of the built model that did not come from the weights (only the new classifier's, or an error)."""

    new_keys: tuple[str, ...]
    resampled: tuple[str, ...] = ()  # keys adapted to the new shape (position embedding, first conv)


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; anything that would run pickled code is refused with a LoadError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None


def _refused(path: Path | None, err: Exception) -> LoadError:
    reason = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
    return LoadError(
        f"{path}: refused: the file holds pickled objects other than tensors and plain values, which could run "
        f"code when loaded ({reason}). medfm loads weights with weights_only=True only; convert trusted "
        "weights to safetensors first."
    )


def _state_dict_of(obj: Any, path: Path) -> dict[str, Tensor]:
    """A plain ``{key: tensor}`` from a loaded object: the dict itself or its state_dict / model entry."""
    for key in _STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise LoadError(f"{path}: not a state dict of tensors (top-level keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")  # fmt: skip
    prefix = "module."  # DistributedDataParallel wrappers
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise LoadError(f"{path}: not a readable safetensors file: {err}") from err
    if path.suffix in PICKLE_SUFFIXES:
        return _state_dict_of(safe_torch_load(path), path)
    raise LoadError(f"{path}: unknown weights format (expected .safetensors or {', '.join(PICKLE_SUFFIXES)})")


def _weights_in(folder: Path) -> Path:
    """timm's order: model.safetensors, then other safetensors, then pickled state dicts."""
    if (folder / WEIGHTS_NAME).is_file():
        return folder / WEIGHTS_NAME
    for pattern in ("*.safetensors", "pytorch_model.bin", *(f"*{s}" for s in PICKLE_SUFFIXES)):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise LoadError(f"{folder}: config.json but no weights file ({WEIGHTS_NAME}, *.safetensors, *.pt, *.bin)")


def _from_config_json(config_path: Path, weights: Path) -> Release:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LoadError(f"{config_path}: cannot read the release config: {err}") from err
    if "architecture" not in config:
        raise LoadError(f"{config_path}: no 'architecture' key (not a timm / medfm release config)")
    return Release(
        architecture=config["architecture"],
        model_args=dict(config.get("model_args", {})),
        state_dict=_read_weights(weights),
        pretrained_cfg=dict(config.get("pretrained_cfg", {})),
        source=weights,
        info=dict(config.get("medfm", {})),
    )


def _from_run(run_dir: Path, checkpoint: Path | None = None) -> Release:
    try:
        run = load_run(run_dir, checkpoint, deepspeed=False)
    except ExportError as err:
        raise LoadError(str(err)) from None
    except pickle.UnpicklingError as err:  # pretrain's load_checkpoint uses weights_only=True too
        raise _refused(checkpoint or ckpt.find_resume(run_dir), err) from None
    config = release_config(run, data_summary(run.config))
    return Release(
        architecture=config["architecture"],
        model_args=config["model_args"],
        state_dict={k: v.detach().clone() for k, v in run.backbone.state_dict().items()},
        pretrained_cfg=config["pretrained_cfg"],
        source=run.checkpoint,
        info=config["medfm"],
    )


def read_release(path: str | Path, architecture: str | None = None, model_args: dict | None = None) -> Release:
    """Read weights and their description from a release folder, a run directory or a weights file.

    ``architecture`` / ``model_args`` describe a bare weights file that has no ``config.json`` beside it.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path} does not exist")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return _from_config_json(path / CONFIG_NAME, _weights_in(path))
        if ckpt.find_resume(path) is not None or (path / RUN_CONFIG).is_file():
            return _from_run(path)
        raise LoadError(
            f"{path}: neither a release folder ({CONFIG_NAME} + {WEIGHTS_NAME}) nor a run directory "
            f"({ckpt.LAST} or step-*.pt)"
        )
    if path.suffix in PICKLE_SUFFIXES:
        obj = safe_torch_load(path)
        if isinstance(obj, dict) and {"model", "config", "version"} <= set(obj):  # a pretraining checkpoint
            return _from_run(path.parent, path)
    if architecture is None:
        if (path.parent / CONFIG_NAME).is_file():
            return _from_config_json(path.parent / CONFIG_NAME, path)
        raise LoadError(f"{path}: a bare weights file needs its architecture (no {CONFIG_NAME} beside it)")
    return Release(
        architecture=architecture,
        model_args=dict(model_args or {}),
        state_dict=_read_weights(path),
        pretrained_cfg={},
        source=path,
    )


def build_model(
    release: Release,
    img_size: int | None = None,
    in_chans: int | None = None,
    *,
    drop_path_rate: float = 0.0,
    dynamic_img_size: bool = False,
    **overrides: Any,
) -> nn.Module:
    """The release's architecture, randomly initialised (``num_classes=0``), through pretrain's builder."""
    args = {k: v for k, v in release.model_args.items() if k not in ("img_size", "in_chans")}
    args.update(overrides)
    return build_backbone(
        release.architecture,
        img_size or release.img_size,
        in_chans or release.in_chans,
        dynamic_img_size=dynamic_img_size,
        drop_path_rate=drop_path_rate,
        **args,
    )


def adapt_state_dict(
    state: dict[str, Tensor], model: nn.Module, first_conv: str | None = None
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Resample what a new input size / channel count changes: ViT ``pos_embed``, the first conv's weight."""
    state, changed = dict(state), []
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if (
        pos is not None
        and isinstance(target, Tensor)
        and pos.shape != target.shape
        and pos.shape[-1] == target.shape[-1]
    ):
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = list(model.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=grid, num_prefix_tokens=prefix, verbose=False)
        changed.append("pos_embed")
    weight_key = f"{first_conv}.weight" if first_conv else None
    if weight_key in state:
        current = model.get_submodule(first_conv).weight
        weight = state[weight_key]
        if weight.ndim == 4 and weight.shape[1] != current.shape[1] and weight.shape[0] == current.shape[0]:
            state[weight_key] = adapt_channels(weight, current.shape[1])
            changed.append(weight_key)
    return state, tuple(changed)


def adapt_channels(weight: Tensor, channels: int) -> Tensor:
    """First-conv weight (O, I, kh, kw) -> (O, channels, kh, kw) that gives the same output on a gray image
    whatever its channel count: the kernel summed over input channels, spread evenly over the new ones."""
    return (weight.sum(dim=1, keepdim=True) / channels).repeat(1, channels, 1, 1)


def check_keys(
    model_state: dict[str, Tensor],
    loaded: dict[str, Tensor],
    source: str | Path,
    allowed_missing: frozenset[str] = frozenset(),
) -> None:
    """Raise a LoadError naming every missing, unexpected and mis-shaped key (beyond ``allowed_missing``)."""
    missing = sorted(set(model_state) - set(loaded) - allowed_missing)
    unexpected = sorted(set(loaded) - set(model_state))
    wrong = sorted(k for k in set(loaded) & set(model_state) if loaded[k].shape != model_state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the weights ({len(missing)}): {_names(missing)}")
        if unexpected:
            parts.append(f"not in the model ({len(unexpected)}): {_names(unexpected)}")
        if wrong:
            shapes = [f"{k} {tuple(loaded[k].shape)} vs model {tuple(model_state[k].shape)}" for k in wrong]
            parts.append(f"shape mismatch ({len(wrong)}): {_names(shapes)}")
        raise LoadError(f"{source}: weights do not match the model; " + "; ".join(parts))


def _names(keys: list[str], limit: int = 40) -> str:
    return ", ".join(keys[:limit]) + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: nn.Module, release: Release) -> LoadReport:
    """Load the release into a model built with ``num_classes=0``: every key, or a LoadError naming them."""
    first_conv = release.pretrained_cfg.get("first_conv") or (model.pretrained_cfg or {}).get("first_conv")
    state, resampled = adapt_state_dict(release.state_dict, model, first_conv)
    check_keys(model.state_dict(), state, release.source)
    model.load_state_dict(state, strict=True)
    return LoadReport(new_keys=(), resampled=resampled)


def set_classifier(model: nn.Module, num_classes: int, report: LoadReport) -> LoadReport:
    """``reset_classifier(num_classes)``; the only keys allowed not to come from the weights are the new ones."""
    if num_classes <= 0:
        return report
    before = set(model.state_dict())
    model.reset_classifier(num_classes)
    new_keys = tuple(sorted(set(model.state_dict()) - before))
    classifier = (model.pretrained_cfg or {}).get("classifier") or ""
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    stray = [k for k in new_keys if not any(k.startswith(f"{n}.") for n in names if n)]
    if stray:
        raise LoadError(f"reset_classifier added keys outside the classifier {names}: {', '.join(stray)}")
    return replace(report, new_keys=tuple(sorted(set(report.new_keys) | set(new_keys))))


def load_backbone(
    path: str | Path | Release,
    num_classes: int = 0,
    img_size: int | None = None,
    *,
    in_chans: int | None = None,
    architecture: str | None = None,
    init: str = "release",
    drop_path_rate: float = 0.0,
    dynamic_img_size: bool = False,
) -> nn.Module:
    """A timm model with the released backbone weights (every key checked) and a new ``num_classes`` head.

    Args:
        path: release folder, run directory, weights file, or a ``Release`` already read.
        num_classes: 0 for the pooled features only; otherwise a randomly initialised linear classifier.
        img_size: input side; ViT position embeddings are resampled from the release's size.
        in_chans: input channels; the first convolution is adapted from the release's channels.
        architecture: for a bare weights file without ``config.json``.
        init: ``"release"`` loads the weights; ``"random"`` builds the same architecture untrained (baseline).
        drop_path_rate, dynamic_img_size: passed to timm (fine-tuning regularisation, variable input sizes).

    Returns:
        the model, with ``pretrained_cfg`` describing its input (input_size, mean, std) and
        ``load_report`` (a ``LoadReport``) naming the keys that did not come from the weights.
    """
    release = path if isinstance(path, Release) else read_release(path, architecture)
    if init not in ("release", "random"):
        raise ValueError(f"init must be 'release' or 'random', got {init!r}")
    model = build_model(release, img_size, in_chans, drop_path_rate=drop_path_rate, dynamic_img_size=dynamic_img_size)
    if init == "release":
        report = load_weights(model, release)
    else:
        report = LoadReport(new_keys=tuple(sorted(model.state_dict())))
    model.pretrained_cfg = input_config(release, model, img_size, in_chans)
    report = set_classifier(model, num_classes, report)
    model.load_report = report
    return model


def input_config(release: Release, model: nn.Module, img_size: int | None, in_chans: int | None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for the loaded model: the release's normalisation at the requested input."""
    cfg = {**(model.pretrained_cfg or {}), **release.pretrained_cfg}
    chans, size = in_chans or release.in_chans, img_size or release.img_size
    mean, std = list(cfg.get("mean", [0.5])), list(cfg.get("std", [0.5]))
    if len(mean) != chans:  # channels changed: one value broadcasts, otherwise the channel mean
        mean = [sum(mean) / len(mean)] * chans
        std = [sum(std) / len(std)] * chans
    return {**cfg, "input_size": [chans, size, size], "mean": mean, "std": std}
