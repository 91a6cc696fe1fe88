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
and ``medfm export RUN_DIR --out DIR`` (``medfm.pretrain.export``, from the newest checkpoint: :func:`load_run`), both
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

Evaluation results in the model card come from results files that downstream writes beside each result,
``results_summary.json`` (:data:`RESULTS_NAME`, :func:`write_results_summary`)::

    {"format": "medfm-results/1", "protocol": "linear", "dataset": "medmnist:breastmnist.npz",
     "init": "release", "backbone": "runs/dino/release",
     "summary": {"acc": 0.81, "balanced_acc": 0.77, "auc": 0.9, "f1": null}}

``summary`` holds the test-split headline metrics (:data:`SUMMARY_KEYS`; null where undefined). The card lists
every such file under the run directory (any depth, named by its folder relative to the run directory), plus
the extra paths given to :func:`find_results` (``medfm export --results``): a JSON file with ``protocol``,
``dataset`` and ``summary`` (named by its folder; downstream's full ``results.json`` qualifies), or a folder
searched for ``results_summary.json``. Nothing here knows downstream's folder layout.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import EvalResult, ModelCardData
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from medfm.data_shards.outputs import disk_full, interrupting_signals, is_disk_full, lock_folder
from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.backbones import MODULE_PREFIX, SMALL_IMAGE_STEM, build_backbone, is_vit, use_small_image_stem
from medfm.pretrain.backends import zero_checkpoint
from medfm.pretrain.config import PretrainConfig, check_output_path, migrate_legacy_keys, to_dict
from medfm.pretrain.errors import ConfigError, ReleaseError
from medfm.pretrain.methods import METHODS
from medfm.pretrain.weights import (
    CONFIG_NAME,
    HF_PREFIX,
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
RELEASE_DIR = "release"  # what a finished pretraining run writes in its run directory
FORMAT = "medfm-release/1"
RESULTS_NAME = "results_summary.json"
RESULTS_FORMAT = "medfm-results/1"
SUMMARY_KEYS = ("acc", "balanced_acc", "auc", "f1")  # the headline metrics: results files, tables, the card
RUN_CONFIG = "config.yaml"  # what marks a pretraining run directory
_STEP_NAME = re.compile(r"step-(\d+)(\.pt)?")  # step-XXXXXXX.pt files, DeepSpeed step-XXXXXXX/ folders


class ExportError(ReleaseError):
    """A run that cannot be released: no checkpoint, a checkpoint that does not match its config, bad keys."""


# --- keys ------------------------------------------------------------------------------------------------------


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


# --- a run's release: the method rebuilt from a checkpoint, or in memory at the end of a run ---------------

# pretrained_cfg fields copied from the architecture's timm default (where they exist); the rest is ours.
_TIMM_CFG_KEYS = ("first_conv", "classifier", "fixed_input_size")
# Keys of model.backbone_kwargs that change how a model runs, not which weights it has.
_RUNTIME_KWARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "dynamic_img_size")


@dataclass(frozen=True)
class RunBackbone:
    """The backbone to release from a run, with what describes it."""

    backbone: nn.Module  # in eval mode (on the CPU when read from a checkpoint)
    module_name: str  # attribute path inside the method, e.g. "teacher_backbone" or "encoder.vit"
    config: DictConfig  # the run's resolved config (derived values included)
    step: int
    checkpoint: Path | None  # the checkpoint it was read from (at the end of a run: the newest one)


def run_backbone(method: nn.Module, cfg: DictConfig, step: int, checkpoint: Path | None) -> RunBackbone:
    """The release backbone of a method (``SSLMethod.export_backbone()``), in eval mode."""
    backbone = method.export_backbone().eval()
    name = next(n for n, m in method.named_modules() if m is backbone)
    return RunBackbone(backbone=backbone, module_name=name, config=cfg, step=step, checkpoint=checkpoint)


def run_config(saved: dict[str, Any], source: str | Path) -> DictConfig:
    """A checkpoint's plain-dict config merged onto the schema: an unknown or mistyped key is an error."""
    try:
        return OmegaConf.merge(OmegaConf.structured(PretrainConfig), migrate_legacy_keys(copy.deepcopy(saved)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"{source}: saved config key {key!r} does not fit this code's schema ({str(err).splitlines()[0]}); "
            "export with the medfm version that trained the run"
        ) from err


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, *, deepspeed: bool = True) -> RunBackbone:
    """Rebuild the method of a run from its newest checkpoint (or ``checkpoint``) and take its release backbone.

    The checkpoint is read with ``weights_only=True`` (no pickled code runs) and loaded strictly: a key that the
    rebuilt method does not have, or lacks, is an error naming it. DeepSpeed ZeRO runs save checkpoint
    directories; with ``deepspeed=True`` they are consolidated (``medfm.pretrain.backends.zero_checkpoint.consolidate_deepspeed``,
    fp32 full weights) to the same contract, reading DeepSpeed's own files with ``weights_only=True`` too (a file
    that needs pickled code is refused, naming it); downstream loading passes ``deepspeed=False`` and asks for an
    export.
    """
    state, path = _checkpoint_state(Path(run_dir), checkpoint, deepspeed)
    cfg = run_config(state["config"], path)
    if cfg.method not in METHODS:
        raise ExportError(f"{path}: method {cfg.method!r} is not one of {sorted(METHODS)}")
    # The checkpoint holds every weight: the warm-start source (model.init) is neither read again nor needed.
    method = METHODS[cfg.method].from_config(OmegaConf.merge(cfg, {"model": {"init": None}}))
    _load_method_state(method, state["model"], path)
    return run_backbone(method, cfg, int(state["step"]), path)


def _checkpoint_state(run_dir: Path, checkpoint: str | Path | None, deepspeed: bool) -> tuple[dict[str, Any], Path]:
    path = Path(checkpoint) if checkpoint is not None else ckpt.find_resume(run_dir)
    if path is not None and path.is_file():
        return ckpt.load_checkpoint(path), path

    found = path if path is not None and path.is_dir() else zero_checkpoint.find_deepspeed_resume(run_dir)
    if found is None:
        raise ExportError(
            f"{run_dir}: no checkpoint to export (expected {ckpt.LAST}, step-*.pt or a DeepSpeed step-*/)"
        )
    if not deepspeed:
        raise ExportError(
            f"{found}: a DeepSpeed ZeRO checkpoint (its shard files are full pickles) and no {RELEASE_DIR}/ "
            f"of that step: release it first with `medfm export {run_dir} --out RELEASE_DIR`, then load the release"
        )
    return zero_checkpoint.consolidate_deepspeed(found), found


def _load_method_state(method: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    what = f"the {type(method).__name__} rebuilt from the checkpoint's config"
    check_keys(method.state_dict(), state, path, model=what, error=ExportError)
    method.load_state_dict(state)


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
        raise ExportError(f"{out_dir / WEIGHTS_NAME}: {bad} holds NaN or infinite values: a diverged run is not "
                          "released; export an earlier checkpoint (--checkpoint)")  # fmt: skip
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
        _recover_interrupted_swap(target)
        check_out_dir(out_dir, overwrite)  # again, now that no other writer can change it
        try:
            staging.mkdir()
            save_file(state, str(staging / WEIGHTS_NAME), metadata=metadata)
            check_release_keys(architecture, model_args, load_file(str(staging / WEIGHTS_NAME)), out_dir / WEIGHTS_NAME)
            _write_text(staging / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
            _write_text(staging / CARD_NAME, model_card(config, list(results)))
            _fsync_folder(staging)
            _swap_in(staging, target)
        except Exception as err:  # safetensors reports a full disk as a SafetensorError
            if not is_disk_full(err):
                raise
            kept = "the release there is intact" if out_dir.is_dir() and any(out_dir.iterdir()) else "nothing was written there"  # fmt: skip
            raise disk_full(f"the release {out_dir}", kept, "rerun the same command") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _swap_in(new: Path, out_dir: Path) -> None:
    """``new`` takes the place of ``out_dir`` (see :func:`write_release`)."""
    if not out_dir.exists():
        os.rename(new, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except BaseException:  # a signal or an error between the renames: the old release goes back
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted_swap(out_dir: Path) -> None:
    """What a writer killed (SIGKILL) in the middle of :func:`write_release` left beside ``out_dir``: its temp folder
    (removed) and, killed between the renames, the old release (put back when ``out_dir`` is missing)."""
    for stale in sorted(out_dir.parent.glob(f".{out_dir.name}.*.tmp")):
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(out_dir.parent.glob(f".{out_dir.name}.*.old"), key=lambda p: p.stat().st_mtime):
        if not out_dir.exists():
            os.rename(old, out_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Each file's bytes on disk before the rename publishes them (a power cut must not publish empty files)."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


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


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    steps = [int(m[1]) for p in run_dir.glob("step-*") if (m := _STEP_NAME.fullmatch(p.name))]
    if not steps:  # `last.pt` alone (checkpoint.keep=0) says its step only when read: read it
        return ckpt.find_resume(run_dir) is None
    released = read_config(config).get("medfm", {}).get("steps")
    return isinstance(released, int) and released >= max(steps)


# --- evaluation results --------------------------------------------------------------------------------------


def write_results_summary(
    folder: str | Path,
    *,
    protocol: str,
    dataset: str,
    init: str,
    summary: Mapping[str, float | None],
    backbone: str | None = None,
) -> Path:
    """``FOLDER/results_summary.json`` (the format in the module doc); returns its path.

    ``summary``: test-split metrics; the :data:`SUMMARY_KEYS` are kept, a missing or non-finite one is null.
    """
    record = {
        "format": RESULTS_FORMAT,
        "protocol": protocol,
        "dataset": dataset,
        "init": init,
        "backbone": backbone,
        "summary": {k: _finite(summary.get(k)) for k in SUMMARY_KEYS},
    }
    path = Path(folder) / RESULTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def read_results(path: str | Path) -> dict[str, Any]:
    """A results file: a JSON object with ``protocol``, ``dataset`` and a ``summary`` dict of metrics."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: cannot read evaluation results: {err}") from err
    if not isinstance(data, dict):
        raise ExportError(f"{path}: evaluation results must be a JSON object, not {type(data).__name__}")
    missing = [k for k in ("protocol", "dataset", "summary") if k not in data]
    if missing or not isinstance(data["summary"], dict):
        raise ExportError(
            f"{path}: not an evaluation results file: needs 'protocol', 'dataset' and a 'summary' dict of "
            f"{list(SUMMARY_KEYS)} (missing {missing or ['a dict summary']})"
        )
    return data


def find_results(run_dir: str | Path, extra: Iterable[str | Path] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The results for a run's model card, as ``(name, results)``: every ``results_summary.json`` under
    ``run_dir`` (named by its folder relative to ``run_dir``), then each of ``extra``: a results file (named by
    its folder) or a folder searched for ``results_summary.json`` (named from that folder on)."""
    run_dir = Path(run_dir)
    named = [(_label(run_dir, p), p) for p in sorted(run_dir.rglob(RESULTS_NAME))]
    for item in map(Path, extra):
        if item.is_dir():
            named += [(_label(item.parent, p), p) for p in sorted(item.rglob(RESULTS_NAME))]
        else:
            named.append((item.parent.name, item))
    seen, results = set(), []
    for name, path in named:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            results.append((name, read_results(path)))
    return results


def _label(root: Path, path: Path) -> str:
    return path.parent.relative_to(root).as_posix() if path.parent != root else root.name


# --- model card ----------------------------------------------------------------------------------------------


def short_source(source: str) -> str:
    """A source or spec without local folders: ``medmnist:../data/x.npz`` -> ``medmnist:x.npz``; a plain path
    keeps its relative form unless it is absolute or leaves its root (``..``)."""
    kind, sep, rest = source.partition(":")
    if sep and kind.isalpha() and len(kind) > 1:  # a spec (a Windows drive letter is one letter)
        return f"{kind}:{Path(rest).name}" if rest else source
    path = Path(source)
    return path.name if path.is_absolute() or ".." in path.parts else source


def _init_text(init: dict[str, Any] | None) -> str:
    if not init:
        return "random (trained from scratch)"
    return f"warm start from `{short_source(init['source'])}` (weights sha256 `{init.get('sha256')}`)"


# model-index metric types (the Hub's names) of the SUMMARY_KEYS
_HUB_METRICS = {"acc": "accuracy", "balanced_acc": "balanced_accuracy", "auc": "roc_auc", "f1": "f1"}


def hub_base_model(init: dict[str, Any] | None) -> str | None:
    """The Hub id of a warm start: ``hf-hub:ORG/NAME[@REV]``, or a Hugging Face cache snapshot
    (``.../models--ORG--NAME/snapshots/...``); None for random init or a local file with no Hub origin."""
    if not init:
        return None
    source = str(init["source"])
    if source.startswith(HF_PREFIX):
        return source.removeprefix(HF_PREFIX).split("@")[0]
    cached = re.search(r"models--([^/]+?)--([^/]+)", source)
    return f"{cached.group(1)}/{cached.group(2)}" if cached else None


def dataset_name(spec: str) -> str:
    """A dataset's short name for the card: the file or folder name of a spec, without suffix."""
    rest = str(spec).partition(":")[2] if ":" in str(spec) else str(spec)
    return Path(rest.rstrip("/")).stem or str(spec)


def card_data(
    config: dict[str, Any], results: list[tuple[str, dict[str, Any]]], license: str = "other"
) -> ModelCardData:
    """The card's YAML front matter (``huggingface_hub.ModelCardData``): license, library, pipeline tag,
    ``base_model`` (the warm start's Hub id), datasets, and a ``model-index`` with the release's test results."""
    m, arch = config["medfm"], config["architecture"]
    name = f"medfm-{m['objective']}-{arch.removeprefix(MODULE_PREFIX)}"
    evaluations = []
    for label, result in results:
        if result.get("init") not in (None, "release"):  # random-init and baseline rows are comparisons
            continue
        dataset = dataset_name(result["dataset"])
        for key, value in result["summary"].items():
            if key in _HUB_METRICS and isinstance(value, (int, float)) and math.isfinite(value):
                evaluations.append(
                    EvalResult(
                        task_type="image-classification",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        dataset_split="test",
                        metric_type=_HUB_METRICS[key],
                        metric_value=round(float(value), 4),
                        metric_name=f"{result['protocol']} {key} ({label})",
                    )
                )
    datasets = sorted({dataset_name(m["data"]["spec"]), *(dataset_name(r["dataset"]) for _, r in results)})
    timm_model = not arch.startswith(MODULE_PREFIX)
    return ModelCardData(
        license=license,
        # the Hub asks an "other" license to be named: the weights inherit the pretraining data's terms
        license_name="pretraining-data-terms" if license == "other" else None,
        library_name="timm" if timm_model else "pytorch",
        pipeline_tag="image-feature-extraction",
        base_model=hub_base_model(m.get("init")),
        datasets=datasets,
        tags=["medfm", "self-supervised", "medical-imaging", m["objective"], *(["timm"] if timm_model else [])],
        model_name=name if evaluations else None,
        eval_results=evaluations or None,
    )


def _load_lines(arch: str, chans: int, size: int, args_py: str, small_image_stem: bool = False) -> list[str]:
    """The card's "Load" section: timm alone for a timm architecture (plus the two lines of medfm's small-image
    stem, which no timm argument builds); a user module needs its class."""
    if arch.startswith(MODULE_PREFIX):
        name = arch.removeprefix(MODULE_PREFIX)
        return [
            f"The backbone is a user-defined module (`{name}`), trained through `medfm.pretrain(model=...)`; its "
            "weights sit under `model.` in `model.safetensors`. Register the same class, then load (every key checked):",
            "",
            "```python",
            "import medfm",
            f'medfm.register_module({name}(), "{name}")',
            'model = medfm.load_backbone("PATH/TO/THIS/FOLDER", num_classes=2)',
            "```",
            "",
        ]
    medfm_lines = [
        "With medfm (strict: every key is checked; ViT position embeddings are interpolated for another size):",
        "",
        "```python",
        "import medfm",
        'model = medfm.load_backbone("PATH/TO/THIS/FOLDER", num_classes=2)',
        "```",
        "",
    ]
    if small_image_stem:
        return [
            "The backbone has medfm's small-image stem (`small_image_stem` in `model_args`: a 3x3 stride-1 first "
            "convolution, no max-pool), which no timm argument builds. With timm only, build it, then load:",
            "",
            "```python",
            "import timm, torch",
            "from safetensors.torch import load_file",
            f'model = timm.create_model("{arch}", num_classes=0, in_chans={chans}{args_py})',
            f"model.conv1 = torch.nn.Conv2d({chans}, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)",
            "model.maxpool = torch.nn.Identity()",
            'model.load_state_dict(load_file("PATH/TO/THIS/FOLDER/model.safetensors"))',
            "model.reset_classifier(2)",
            "```",
            "",
            *medfm_lines,
        ]
    return [
        "With timm only (this folder has the layout of a Hub repo):",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True, num_classes=2)',
        "# or, by architecture name:",
        f'model = timm.create_model("{arch}", pretrained=True, num_classes=2, in_chans={chans}, img_size={size}{args_py},',
        '    pretrained_cfg_overlay=dict(file="PATH/TO/model.safetensors", custom_load=False, num_classes=0))',
        "```",
        "",
        *medfm_lines,
    ]


def model_card(config: dict[str, Any], results: list[tuple[str, dict[str, Any]]], license: str | None = None) -> str:
    """The release's README.md: a Hugging Face model card, front matter from ``card_data``."""
    m, p = config["medfm"], config["pretrained_cfg"]
    arch, args = config["architecture"], config["model_args"]
    chans, size = p["input_size"][0], p["input_size"][1]
    small_image_stem = bool(args.get(SMALL_IMAGE_STEM))
    args_py = ", ".join(f"{k}={v!r}" for k, v in args.items() if k not in ("in_chans", "img_size", SMALL_IMAGE_STEM))
    args_py = f", {args_py}" if args_py else ""
    data = m["data"]
    front = card_data(config, results, license or m.get("license") or "other").to_yaml()
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {arch} pretrained with {m['objective'].upper()} on medical images (medfm)",
        "",
        f"A `{arch}` backbone ({m['num_params'] / 1e6:.2f} M parameters, {config['num_features']} features) "
        f"pretrained without labels by {m.get('objective_description', m['objective'])}. Backbone only: no "
        "classifier, no projection head.",
        "",
        "| | |",
        "|---|---|",
        f"| input | {chans} x {size} x {size}, values in [0, 1] normalised with mean {p['mean']} and std {p['std']} |",
        f"| model args | `{json.dumps(args)}` |",
        f"| pooling | {config.get('global_pool', 'default')} |",
        f"| training | {m['steps']} optimizer steps, global batch {m['global_batch']}, {m['images_seen']} images seen |",
        f"| data | `{data['spec']}` (split {data['split']}) |",
        f"| initialisation | {_init_text(m.get('init'))} |",
        "",
        "## Load",
        "",
        *_load_lines(arch, chans, size, args_py, small_image_stem),
        "## Intended use",
        "",
        "Feature extraction, linear probing, kNN retrieval and fine-tuning on medical images of the modality and "
        "resolution it was trained on. A research artefact: it is not a medical device and was not validated for "
        "diagnosis or any clinical decision.",
        "",
        "## Data",
        "",
        f"Pretrained on `{data['spec']}`, split `{data['split']}`, {data.get('samples_per_epoch')} samples per epoch.",
    ]
    manifest = data.get("manifest")
    if manifest:
        lines += [
            "",
            f"Shard set: {manifest['samples']} images in {manifest['shards']} shards "
            f"({manifest['labeled']} with labels, {manifest['duplicates_removed']} duplicates removed); "
            f"modalities {manifest['by_modality']}; splits {manifest['by_split']}.",
            f"Sources: {', '.join(map(str, manifest['sources']))}.",
        ]
    recipe = m["recipe"]
    lines += [
        "",
        "## Recipe",
        "",
        f"Objective `{m['objective']}`, {m['steps']} steps ({m['epochs']} epochs), precision {recipe['precision']}, "
        f"seed {recipe['seed']}. The full recipe is in `config.json` (`medfm.recipe`):",
        "",
        "```yaml",
        OmegaConf.to_yaml(OmegaConf.create({k: recipe[k] for k in (m["objective"], "optim", "schedule")})).rstrip(),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if results:
        lines += [
            "| evaluation | protocol | dataset | " + " | ".join(SUMMARY_KEYS) + " |",
            "|---|---|---|" + "---|" * len(SUMMARY_KEYS),
        ]
        for name, result in results:
            summary = result["summary"]
            cells = [f"{summary[k]:.4f}" if isinstance(summary.get(k), (int, float)) else "-" for k in SUMMARY_KEYS]
            dataset = short_source(str(result["dataset"]))
            lines.append(f"| {name} | {result['protocol']} | `{dataset}` | " + " | ".join(cells) + " |")
        lines += ["", "Test-split metrics; the classifier or fine-tuning checkpoint was chosen on the val split."]
    else:
        lines.append("No downstream evaluation was attached to this export (see `medfm eval` and `medfm finetune`).")
    lines += [
        "",
        "## Limits",
        "",
        f"- Trained at {size} px on {chans}-channel images: other sizes need interpolated position embeddings "
        "(ViTs) and usually cost accuracy; other channel counts need an adapted first layer.",
        "- Learned from one data source: expect a drop on images from other scanners, sites, protocols and "
        "populations; evaluate on your own data before relying on the features.",
        "- Biases of the pretraining data (demographics, devices, label noise of any later fine-tuning) carry over.",
        "- Self-supervised features are not calibrated probabilities; thresholds must be set on labeled data.",
        "",
    ]
    return "\n".join(lines)
