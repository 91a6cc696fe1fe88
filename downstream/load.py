"""Load a backbone by path for a downstream task: strict and loud.

- Sources: whatever ``pretrain.release.read_release`` reads (downstream reads weights only through it): a
  release folder (``config.json`` + ``model.safetensors``, as ``medfm export`` and the end of a pretraining run
  write), a run directory (its ``release/``, or its newest checkpoint while it is still training), a
  ``.safetensors`` file, or a ``.pt`` / ``.pth`` / ``.bin`` state dict (architecture from a ``config.json``
  beside it, or given). No pickled code runs.
- The backbone is rebuilt through ``pretrain.backbones.build_backbone`` and the exact set of keys that did not
  load is checked (``pretrain.release.check_keys``): anything other than the new classifier's keys
  (``num_classes > 0``) is an error naming the missing, unexpected and mis-shaped keys. A silent partial load is
  the classic failure of released SSL weights.
- ViT position embeddings are resampled (timm's ``resample_abs_pos_embed``) when ``img_size`` changes; the
  first convolution is adapted (``adapt_channels``) when ``in_chans`` changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from pretrain.backbones import build_backbone
from pretrain.release import LoadError, Release, check_keys, read_release


@dataclass(frozen=True)
class LoadReport:
    """Keys of the built model that did not come from the weights (only the new classifier's, or an error)."""

    new_keys: tuple[str, ...]
    resampled: tuple[str, ...] = ()  # keys adapted to the new shape (position embedding, first conv)


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
