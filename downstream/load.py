"""Load a backbone by path for a downstream task: strict and loud.

- Sources: whatever ``medfm.pretrain.release.read_release`` reads (downstream reads weights only through it): a
  release folder (``config.json`` + ``model.safetensors``, as ``medfm export`` and the end of a pretraining run
  write), a run directory (its ``release/``, or its newest checkpoint while it is still training), a
  ``.safetensors`` file, or a ``.pt`` / ``.pth`` / ``.bin`` state dict (architecture from a ``config.json``
  beside it, or given). No pickled code runs.
- The backbone is rebuilt through ``medfm.pretrain.backbones.build_backbone`` and the exact set of keys that did not
  load is checked (``medfm.pretrain.release.check_keys``): anything other than the new classifier's keys
  (``num_classes > 0``) is an error naming the missing, unexpected and mis-shaped keys. A silent partial load is
  the classic failure of released SSL weights. So is a silent cast: integer weights where the model has
  floating-point ones (an int8 re-save) are refused too (``check_keys`` checks the dtypes' kinds).
- A release's ``config.json`` is checked before anything is built (``medfm.pretrain.weights.check_release_config``);
  ``model_args`` that timm rejects are a ``LoadError`` naming the weights, not a traceback.
- ViT position embeddings are resampled (timm's ``resample_abs_pos_embed``) when ``img_size`` changes; the
  first convolution is adapted (``adapt_channels``) when ``in_chans`` changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from medfm.pretrain.backbones import build_backbone
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.release import LoadError, Release, check_keys, read_release
from medfm.pretrain.weights import fit_state_dict, read_init


@dataclass(frozen=True)
class LoadReport:
    """Keys of the built model that did not come from the weights (only the new classifier's, or an error)."""

    new_keys: tuple[str, ...]
    resampled: tuple[str, ...] = ()  # keys adapted to the new shape (position embedding, first conv)
    dropped: tuple[str, ...] = ()  # keys of the weights that only pretraining used (a classifier, a decoder)


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
    try:
        return build_backbone(
            release.architecture,
            img_size or release.img_size,
            in_chans or release.in_chans,
            dynamic_img_size=dynamic_img_size,
            drop_path_rate=drop_path_rate,
            **args,
        )
    except (ConfigError, TypeError, ValueError) as err:  # timm's answer to arguments its model does not take
        raise LoadError(
            f"{release.source}: its architecture {release.architecture!r} with model_args {release.model_args} "
            f"does not build: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def load_weights(model: nn.Module, release: Release, foreign: bool = False) -> LoadReport:
    """Load the release into a model built with ``num_classes=0``: every key, or a LoadError naming them.
    ``foreign``: a general-purpose model's weights (a baseline), fitted as a warm start is."""
    first_conv = release.pretrained_cfg.get("first_conv") or (model.pretrained_cfg or {}).get("first_conv")
    # pretrain's one fitter: timm's key mapping (original DINOv2 / MAE checkpoints), resampled embeddings, the
    # first conv adapted to the channels, pretraining-only keys (a classifier, a decoder) dropped by name.
    state, resampled, dropped = fit_state_dict(release.state_dict, model, first_conv, foreign=foreign)
    check_keys(model.state_dict(), state, release.source)
    model.load_state_dict(state, strict=True)
    return LoadReport(new_keys=(), resampled=resampled, dropped=dropped)


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
        init: ``"release"`` loads the weights; ``"random"`` builds the same architecture untrained; ``"baseline"``
            loads a general-purpose model's weights (``path`` is then the baseline), fitted as a warm start.
        drop_path_rate, dynamic_img_size: passed to timm (fine-tuning regularisation, variable input sizes).

    Returns:
        the model, with ``pretrained_cfg`` describing its input (input_size, mean, std) and
        ``load_report`` (a ``LoadReport``) naming the keys that did not come from the weights.
    """
    release = path if isinstance(path, Release) else read_release(path, architecture)
    if init not in ("release", "random", "baseline"):
        raise ConfigError(f"config key 'backbone.inits': an init is 'release', 'random' or 'baseline', got {init!r}")
    model = build_model(release, img_size, in_chans, drop_path_rate=drop_path_rate, dynamic_img_size=dynamic_img_size)
    if init != "random":  # baseline: general-purpose weights, fitted as a warm start (heads dropped, keys mapped)
        report = load_weights(model, release, foreign=init == "baseline")
    else:
        report = LoadReport(new_keys=tuple(sorted(model.state_dict())))
    model.pretrained_cfg = input_config(release, model, img_size, in_chans)
    report = set_classifier(model, num_classes, report)
    model.load_report = report
    return model


def read_baseline(backbone: Any, release: Release) -> Release | None:
    """The general-purpose model to compare with (``backbone.baseline``: anything ``model.init`` takes), or None."""
    if backbone.baseline is None:
        return None
    return read_init(backbone.baseline, backbone.baseline_architecture or release.architecture)


def load_for_init(
    release: Release, init: str, baseline: Release | None, *, img_size: int | None, in_chans: int | None, **kwargs: Any
) -> tuple[nn.Module, Release]:
    """The model an init evaluates, and the weights it came from: the release (``release``), its architecture
    untrained (``random``), or the baseline (``baseline``) at the release's input size and channels, so that
    every init sees the same images under the same protocol."""
    if init != "baseline":
        return load_backbone(release, img_size=img_size, in_chans=in_chans, init=init, **kwargs), release
    if baseline is None:
        raise ConfigError("config key 'backbone.baseline': init 'baseline' needs it")
    size, chans = img_size or release.img_size, in_chans or release.in_chans
    return load_backbone(baseline, img_size=size, in_chans=chans, init="baseline", **kwargs), baseline


def input_config(release: Release, model: nn.Module, img_size: int | None, in_chans: int | None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for the loaded model: the release's normalisation at the requested input."""
    cfg = {**(model.pretrained_cfg or {}), **release.pretrained_cfg}
    chans, size = in_chans or release.in_chans, img_size or release.img_size
    mean, std = list(cfg.get("mean", [0.5])), list(cfg.get("std", [0.5]))
    if len(mean) != chans:  # channels changed: one value broadcasts, otherwise the channel mean
        mean = [sum(mean) / len(mean)] * chans
        std = [sum(std) / len(std)] * chans
    return {**cfg, "input_size": [chans, size, size], "mean": mean, "std": std}
