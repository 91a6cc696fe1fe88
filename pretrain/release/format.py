"""The release contract: one folder that timm loads like a Hugging Face Hub repo, written and read only here.

A release folder holds:

- ``model.safetensors``: the backbone's state dict with timm key names, exactly the keys of
  ``timm.create_model(architecture, num_classes=0, **model_args)`` (checked before and after writing; with
  ``small_image_stem`` popped and applied);
- ``config.json``: timm's hub layout (``architecture``, ``num_classes``, ``num_features``, ``global_pool``,
  ``model_args``, ``pretrained_cfg``) plus a ``medfm`` section (objective, steps, input, data summary, recipe);
- ``README.md``: a model card (intended use, data, recipe, evaluation results when present, limits).

It loads without medfm: ``timm.create_model("local-dir:RELEASE", pretrained=True, num_classes=N)``; except a
ResNet with medfm's small-image stem (``model_args.small_image_stem``, not a timm argument: timm refuses it), which
timm builds with two more lines (``medfm.pretrain.backbones.use_small_image_stem``; the model card shows them).

Writers: a pretraining run at its end (``RUN_DIR/release/``, from the method in memory: :func:`run_backbone`)
and ``medfm export RUN_DIR --out DIR`` (``medfm.pretrain.export``, from the newest checkpoint: ``medfm.pretrain.runs.load_run``), both
through :func:`write_run_release` -> :func:`write_release`. Reader: :func:`read_release`, downstream's only way
in. It reads a release folder, a bare weights file, or a run directory: its ``release/`` when that is as new as
the newest checkpoint, else the newest checkpoint (the method rebuilt from its saved config, the release module
taken). No pickled code runs: safetensors, or ``torch.load(weights_only=True)``. :func:`check_keys` is the one
key checker (the release's weights, a checkpoint's method state, downstream's load): it names every missing,
unexpected and mis-shaped key, and then (``check_dtypes``) refuses integer weights where the model has floating
ones (an int8 re-save has the right names and shapes, and ``load_state_dict`` would cast it silently).
``config.json`` is data, never code (``medfm.pretrain.weights.check_release_config``, for warm starts too): the architecture must be a timm model (or a
``module:NAME`` registered in this process; nothing named in a release is imported), ``model_args`` an object
without timm's loading arguments, sizes and channels within bounds; anything else is a ``LoadError`` naming the
file and the key, before any weight is read.

A release is written whole or not at all (:func:`write_release`): into a temporary sibling folder that then takes
the release folder's place by renames, one writer at a time, with nothing left behind by an error, a full disk
or a stop signal.

Evaluation results in the model card: ``results`` (``results_summary.json``); the card's text: ``card`` and its
template ``card.md``; how the files reach the disk: ``files``; a run rebuilt from its checkpoint:
``medfm.pretrain.runs``.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from medfm.data_shards.outputs import disk_full, interrupting_signals, is_disk_full, lock_folder
from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.backbones import MODULE_PREFIX, SMALL_IMAGE_STEM, build_backbone, is_vit, use_small_image_stem
from medfm.pretrain.config import check_output_path, to_dict
from medfm.pretrain.errors import ExportError
from medfm.pretrain.methods import METHODS
from medfm.pretrain.release.card import model_card, short_source
from medfm.pretrain.release.files import fsync_folder, recover_interrupted_swap, swap_in, write_text
from medfm.pretrain.release.results import find_results
from medfm.pretrain.runs import RELEASE_DIR, RUN_CONFIG, STEP_NAME, RunBackbone, load_run
from medfm.pretrain.weights import (
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    LoadError,
    Release,
    check_keys,
    read_config,
    read_release_folder,
    read_weights,
    refused,
    safe_torch_load,
    weights_in,
)

CARD_NAME = "README.md"

FORMAT = "medfm-release/1"


def check_release_keys(
    architecture: str, model_args: dict[str, Any], state: Mapping[str, Tensor], source: str | Path
) -> None:
    """The released keys and shapes are exactly those of ``timm.create_model(architecture, num_classes=0, ...)``
    (a registered user module: those of ``build_backbone(architecture)``)."""
    if architecture.startswith(MODULE_PREFIX):
        img_size = model_args.get("img_size", 224)
        reference = build_backbone(architecture, img_size, model_args.get("in_chans", 1)).state_dict()
        what = f"the registered module {architecture!r}"
    else:
        args = dict(model_args)
        small_image_stem = args.pop(SMALL_IMAGE_STEM, False)  # medfm's argument, applied after timm builds
        model = timm.create_model(architecture, pretrained=False, num_classes=0, **args)
        reference = (use_small_image_stem(model) if small_image_stem else model).state_dict()
        what = f"timm.create_model({architecture!r}, num_classes=0, **{args})"
        what += " with medfm's small-image stem" if small_image_stem else ""
    check_keys(reference, state, source, model=what, error=ExportError)


# --- config.json: what describes the weights ------------------------------------------------------------

# pretrained_cfg fields copied from the architecture's timm default (where they exist); the rest is ours.
_TIMM_CFG_KEYS = ("first_conv", "classifier", "fixed_input_size")

# Keys of model.backbone_kwargs that change how a model runs, not which weights it has.
_RUNTIME_KWARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "dynamic_img_size")


def model_args(cfg: DictConfig, backbone: nn.Module) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild the released weights' shapes (besides ``num_classes=0``)."""
    kwargs = to_dict(cfg, resolve=True)["model"]["backbone_kwargs"]  # values: they build the model
    extra = {k: v for k, v in kwargs.items() if k not in _RUNTIME_KWARGS}
    if is_vit(backbone):  # ViTs ignore medfm's small-image stem: plain timm would refuse the argument
        extra.pop(SMALL_IMAGE_STEM, None)
    args: dict[str, Any] = {"in_chans": cfg.data.in_chans}
    # Models with a fixed token grid (ViTs) take img_size: it sets the position-embedding shape.
    user_module = cfg.model.backbone.startswith(MODULE_PREFIX)  # rebuilt by medfm at this size, not by timm
    if user_module or "img_size" in inspect.signature(type(backbone).__init__).parameters:
        args["img_size"] = cfg.data.img_size
    return {**args, **extra}


def _per_channel(values: list[float], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)


def release_config(run: RunBackbone, data: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` content: timm's hub layout plus the ``medfm`` section."""
    cfg, backbone = run.config, run.backbone
    args = model_args(cfg, backbone)
    size, chans = cfg.data.img_size, cfg.data.in_chans
    default = dict(getattr(backbone, "pretrained_cfg", None) or {})
    pretrained_cfg: dict[str, Any] = {
        "tag": f"medfm_{cfg.method}",
        "custom_load": False,  # a native timm state dict (timm's defaults for ViTs expect a JAX .npz)
        "input_size": [chans, size, size],
        "interpolation": "bilinear",  # what the pretraining crops used
        "crop_pct": 1.0,  # medical images: resize the whole image, no centre crop
        "crop_mode": "center",
        "mean": _per_channel(list(cfg.augment.mean), chans),
        "std": _per_channel(list(cfg.augment.std), chans),
        "num_classes": 0,
        "pool_size": None,
        **{k: default[k] for k in _TIMM_CFG_KEYS if k in default},
    }
    global_pool = getattr(backbone, "global_pool", None)
    steps, plain = run.step, to_dict(cfg)
    medfm = {
        "format": FORMAT,
        "objective": cfg.method,
        "objective_description": METHODS[cfg.method].description,
        "exported_module": run.module_name,
        "steps": steps,
        "epochs": plain["schedule"]["epochs"],  # the recipe as written (to_dict), like the "recipe" below
        "global_batch": cfg.derived.global_batch,
        "images_seen": steps * (cfg.derived.global_batch or 0),
        "in_chans": chans,
        "img_size": size,
        "patch_size": _patch_size(backbone),
        "num_params": sum(p.numel() for p in backbone.parameters()),
        "data": data,
        "recipe": {
            **{key: plain[key] for key in (cfg.method, "augment", "optim", "schedule", "model")},
            "precision": plain["train"]["precision"],
            "seed": plain["train"]["seed"],
        },
        "checkpoint": run.checkpoint.name if run.checkpoint is not None else None,
        # The warm-start source (model.init) and its weights file's sha256; None: random init.
        "init": None if cfg.model.init is None else {"source": cfg.model.init, "sha256": cfg.derived.init_sha256},
    }
    config: dict[str, Any] = {
        "architecture": cfg.model.backbone,
        "num_classes": 0,
        "num_features": int(backbone.num_features),
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
        "medfm": medfm,
    }
    if isinstance(global_pool, str) and global_pool:
        config["global_pool"] = global_pool
    return config


def _patch_size(backbone: nn.Module) -> int | None:
    patch_embed = getattr(backbone, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    return int(size[0]) if size is not None else None


def data_summary(cfg: DictConfig) -> dict[str, Any]:
    """What the backbone saw: spec kind and file name (not the local path), split, and for ``shards:`` the
    shard manifest's totals (samples, modalities, splits, sources, duplicates removed)."""
    kind, sep, rest = cfg.data.spec.partition(":")
    path = Path(rest if sep else cfg.data.spec)
    summary: dict[str, Any] = {"spec": f"{kind}:{path.name}" if sep else path.name, "split": cfg.data.split}
    summary["samples_per_epoch"] = cfg.derived.samples_per_epoch
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        totals = manifest.get("totals", {})
        sources = [short_source(str(s)) for s in manifest.get("sources", [])]
        summary["manifest"] = {
            "samples": totals.get("samples"),
            "shards": totals.get("shards"),
            "labeled": totals.get("labeled"),
            "by_modality": totals.get("by_modality", {}),
            "by_split": totals.get("by_split", {}),
            "duplicates_removed": (totals.get("duplicates_exact") or 0) + (totals.get("duplicates_near") or 0),
            "sources": sources[:20] + ([f"... ({len(sources)} in all)"] if len(sources) > 20 else []),
            "classes": manifest.get("classes", {}),
        }
    return summary


def release_contents(run: RunBackbone) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What a run releases: ``config.json`` content and the backbone's state dict (detached, on the CPU)."""
    config = release_config(run, data_summary(run.config))
    return config, {k: v.detach().cpu() for k, v in run.backbone.state_dict().items()}


# --- write -----------------------------------------------------------------------------------------------------


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """A release goes into an absent or empty folder, or replaces one with ``overwrite``; a folder medfm creates
    holds no control character (the Python API's ``out_dir`` as the CLI's ``--out``)."""
    check_output_path(out_dir, "the release folder")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a release folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} is not empty (pass overwrite=True / --overwrite to replace the release)")


def write_release(
    out_dir: str | Path,
    config: dict[str, Any],
    state_dict: Mapping[str, Tensor],
    *,
    results: Iterable[tuple[str, dict[str, Any]]] = (),
    overwrite: bool = False,
) -> Path:
    """Write a release folder (weights, config.json, README.md) whole, or leave ``out_dir`` as it was; returns it.

    The files go into a temporary sibling folder ``.NAME.PID.tmp`` (same file system), are read back and synced,
    and that folder takes the place of ``out_dir`` by renames: the old folder to ``.NAME.PID.old``, the new one to
    ``out_dir``, then the old one is removed. A reader sees the old release or the new one, never a mix; between
    the two renames (microseconds) it sees none, and a process killed right there (SIGKILL) leaves the old
    release in ``.NAME.PID.old``, which the next write puts back before it starts. An error, a full disk
    (``DiskFull``) or SIGTERM / SIGHUP removes the temp folder and leaves ``out_dir`` untouched. One writer at a
    time: the lock file ``.NAME.lock`` beside it (``medfm.data_shards.outputs.lock_folder``).

    Args:
        out_dir: the release folder; must be empty or absent unless ``overwrite``.
        config: ``config.json`` content: timm's hub layout plus the ``medfm`` section (:func:`release_config`).
        state_dict: the backbone's weights, any device; checked against timm (names, shapes, dtypes; no NaN or
            infinity) before writing and read back after.
        results: ``(name, results)`` pairs for the card's evaluation table (:func:`find_results`).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    architecture, model_args = config["architecture"], config["model_args"]
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    check_release_keys(architecture, model_args, state, out_dir / WEIGHTS_NAME)
    bad = ckpt.first_nonfinite(state)
    if bad is not None:
        raise ExportError(
            f"{out_dir / WEIGHTS_NAME}: {bad} holds NaN or infinite values: a diverged run is not "
            "released; export an earlier checkpoint (--checkpoint)"
        )
    medfm = config.get("medfm", {})
    metadata = {
        "format": "pt",  # what Hugging Face tooling expects of a PyTorch safetensors file
        "architecture": architecture,
        "model_args": json.dumps(model_args),
        "objective": str(medfm.get("objective")),
        "step": str(medfm.get("steps")),
    }
    target = out_dir.resolve()  # "." has no name to put temp siblings beside
    if target == target.parent:
        raise ExportError(f"{out_dir}: a release folder cannot be the file system root")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    lock_file = target.with_name(f".{target.name}.lock")
    # The signals outermost: the lock is let go (its file removed) before a stop signal ends the process.
    with interrupting_signals(), lock_folder(out_dir, "medfm export", lock_file=lock_file):
        recover_interrupted_swap(target)
        check_out_dir(out_dir, overwrite)  # again, now that no other writer can change it
        try:
            staging.mkdir()
            save_file(state, str(staging / WEIGHTS_NAME), metadata=metadata)
            check_release_keys(architecture, model_args, load_file(str(staging / WEIGHTS_NAME)), out_dir / WEIGHTS_NAME)
            write_text(staging / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
            write_text(staging / CARD_NAME, model_card(config, list(results)))
            fsync_folder(staging)
            swap_in(staging, target)
        except Exception as err:  # safetensors reports a full disk as a SafetensorError
            if not is_disk_full(err):
                raise
            kept = (
                "the release there is intact"
                if out_dir.is_dir() and any(out_dir.iterdir())
                else "nothing was written there"
            )
            raise disk_full(f"the release {out_dir}", kept, "rerun the same command") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def write_run_release(
    run: RunBackbone,
    out_dir: str | Path,
    *,
    run_dir: str | Path,
    results: list[str | Path] = (),
    overwrite: bool = False,
    license: str = "other",
) -> Path:
    """Write the release folder of ``run`` (:func:`write_release`); returns ``out_dir``.

    The card lists the ``results_summary.json`` files under ``run_dir`` and the ``results`` paths
    (:func:`find_results`). ``license``: the weights' license id for the card (``other`` until the data's terms
    are known: the weights inherit them).
    """
    config, state = release_contents(run)
    config["medfm"]["license"] = license
    found = find_results(run_dir, results)
    return write_release(out_dir, config, state, results=found, overwrite=overwrite)


# --- read ------------------------------------------------------------------------------------------------------


def read_release(path: str | Path, architecture: str | None = None, model_args: dict | None = None) -> Release:
    """Read weights and their description from a release folder, a run directory or a weights file.

    A run directory gives its ``release/`` folder when that holds the newest checkpoint's step (a finished run),
    else its newest checkpoint file (a run still training; DeepSpeed ZeRO checkpoints are refused: export them).
    ``architecture`` / ``model_args`` describe a bare weights file that has no ``config.json`` beside it.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path} does not exist")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return read_release_folder(path / CONFIG_NAME, weights_in(path))
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
            return read_release_folder(path.parent / CONFIG_NAME, path)
        raise LoadError(f"{path}: a bare weights file needs its architecture (no {CONFIG_NAME} beside it)")
    return Release(
        architecture=architecture,
        model_args=dict(model_args or {}),
        state_dict=read_weights(path),
        pretrained_cfg={},
        source=path,
    )


def _from_run(run_dir: Path, checkpoint: Path | None = None) -> Release:
    if checkpoint is None and _release_is_current(run_dir):
        folder = run_dir / RELEASE_DIR
        return read_release_folder(folder / CONFIG_NAME, weights_in(folder))
    try:
        run = load_run(run_dir, checkpoint, deepspeed=False)
    except ExportError as err:
        raise LoadError(str(err)) from None
    except pickle.UnpicklingError as err:  # pretrain's load_checkpoint uses weights_only=True too
        raise refused(checkpoint or ckpt.find_resume(run_dir), err) from None
    config, state = release_contents(run)
    return Release.from_config(config, {k: v.clone() for k, v in state.items()}, run.checkpoint)


def _release_is_current(run_dir: Path) -> bool:
    """``RUN_DIR/release/`` exists and its step is that of the newest checkpoint (by the ``step-XXXXXXX`` names):
    a resumed run that is still training has newer weights in its checkpoints."""
    config = run_dir / RELEASE_DIR / CONFIG_NAME
    if not config.is_file():
        return False
    steps = [int(m[1]) for p in run_dir.glob("step-*") if (m := STEP_NAME.fullmatch(p.name))]
    if not steps:  # `last.pt` alone (checkpoint.keep=0) says its step only when read: read it
        return ckpt.find_resume(run_dir) is None
    released = read_config(config).get("medfm", {}).get("steps")
    return isinstance(released, int) and released >= max(steps)
