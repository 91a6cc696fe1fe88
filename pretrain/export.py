"""Release a pretraining run's backbone as a folder timm loads like a Hugging Face Hub repo.

``export_run(run_dir, out_dir)`` reads the newest checkpoint of a run directory, rebuilds the method from the
config saved in it, takes ``SSLMethod.export_backbone()`` (the DINO teacher, the MoCo momentum encoder, the MAE
encoder) and writes:

- ``model.safetensors``: the backbone's state dict with timm key names, exactly the keys of
  ``timm.create_model(architecture, num_classes=0, **model_args)`` (checked before anything is written);
- ``config.json``: timm's hub layout (``architecture``, ``num_classes``, ``num_features``, ``global_pool``,
  ``model_args``, ``pretrained_cfg``) plus a ``medfm`` section (objective, steps, input, data summary, recipe);
- ``README.md``: a model card (intended use, data, recipe, evaluation results when present, limits).

The folder loads without medfm: ``timm.create_model("local-dir:RELEASE", pretrained=True, num_classes=N)``, or
``timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors",
custom_load=False, num_classes=0), num_classes=N, **model_args)``. Nothing here imports ``downstream``; the
evaluation results of the card are read as JSON files (``RUN_DIR/{eval,finetune}/**/results.json`` by default).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file
from torch import nn

from pretrain import checkpoint as ckpt
from pretrain.config import PretrainConfig, to_dict
from pretrain.errors import ConfigError, ReleaseError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
RESULTS_GLOBS = ("eval/**/results.json", "finetune/**/results.json")  # what medfm eval / finetune write
FORMAT = "medfm-release/1"

# pretrained_cfg fields copied from the architecture's timm default (where they exist); the rest is ours.
_TIMM_CFG_KEYS = ("first_conv", "classifier", "fixed_input_size")
# Keys of model.backbone_kwargs that change how a model runs, not which weights it has.
_RUNTIME_KWARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "dynamic_img_size")


class ExportError(ReleaseError):
    """A run that cannot be released: no checkpoint, a checkpoint that does not match its config, bad keys."""


@dataclass(frozen=True)
class RunBackbone:
    """The backbone to release from a run, with what describes it."""

    backbone: nn.Module  # in eval mode, on the CPU
    module_name: str  # attribute path inside the method, e.g. "teacher_backbone" or "encoder.vit"
    config: DictConfig  # the run's resolved config (derived values included)
    step: int
    checkpoint: Path


def run_config(saved: dict[str, Any], source: str | Path) -> DictConfig:
    """A checkpoint's plain-dict config merged onto the schema: an unknown or mistyped key is an error."""
    try:
        return OmegaConf.merge(OmegaConf.structured(PretrainConfig), saved)
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
    directories; with ``deepspeed=True`` they are consolidated (``pretrain.checkpoint.consolidate_deepspeed``,
    fp32 full weights) to the same contract. That reads DeepSpeed's own files, which are full pickles: only for
    one's own runs (``medfm export``); downstream loading passes ``deepspeed=False`` and asks for an export.
    """
    from pretrain.methods import METHODS  # late import: the methods pull in lightly

    state, path = _checkpoint_state(Path(run_dir), checkpoint, deepspeed)
    cfg = run_config(state["config"], path)
    if cfg.method not in METHODS:
        raise ExportError(f"{path}: method {cfg.method!r} is not one of {sorted(METHODS)}")
    method = METHODS[cfg.method].from_config(cfg)
    _load_method_state(method, state["model"], path)
    backbone = method.export_backbone().eval()
    name = next(n for n, m in method.named_modules() if m is backbone)
    return RunBackbone(backbone=backbone, module_name=name, config=cfg, step=int(state["step"]), checkpoint=path)


def _checkpoint_state(run_dir: Path, checkpoint: str | Path | None, deepspeed: bool) -> tuple[dict[str, Any], Path]:
    path = Path(checkpoint) if checkpoint is not None else ckpt.find_resume(run_dir)
    if path is not None and path.is_file():
        return ckpt.load_checkpoint(path), path

    found = path if path is not None and path.is_dir() else ckpt.find_deepspeed_resume(run_dir)
    if found is None:
        raise ExportError(
            f"{run_dir}: no checkpoint to export (expected {ckpt.LAST}, step-*.pt or a DeepSpeed step-*/)"
        )
    if not deepspeed:
        raise ExportError(
            f"{found}: a DeepSpeed ZeRO checkpoint (its shard files are full pickles): release it first with "
            f"`medfm export {run_dir} --out RELEASE_DIR`, then load the release"
        )
    return ckpt.consolidate_deepspeed(found), found


def _load_method_state(method: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = method.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{path}: checkpoint does not match the {type(method).__name__} rebuilt from its config: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    empty = sorted(k for k, v in state.items() if v.numel() == 0 and expected[k].numel() > 0)
    if empty:
        raise ExportError(
            f"{path}: parameters {_few(empty)} are empty: a ZeRO-3 checkpoint holds shards only; save the "
            "consolidated state dict (accelerator.get_state_dict) or convert it with zero_to_fp32 first"
        )
    wrong = sorted(k for k, v in state.items() if v.shape != expected[k].shape)
    if wrong:
        shapes = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5])
        raise ExportError(f"{path}: tensor shapes differ from the rebuilt method: {shapes}")
    method.load_state_dict(state)


def _few(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def model_args(cfg: DictConfig, backbone: nn.Module) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild the released weights' shapes (besides ``num_classes=0``)."""
    extra = {k: v for k, v in to_dict(cfg)["model"]["backbone_kwargs"].items() if k not in _RUNTIME_KWARGS}
    args: dict[str, Any] = {"in_chans": cfg.data.in_chans}
    # Models with a fixed token grid (ViTs) take img_size: it sets the position-embedding shape.
    if "img_size" in inspect.signature(type(backbone).__init__).parameters:
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
        "exported_module": run.module_name,
        "steps": steps,
        "epochs": cfg.schedule.epochs,
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
            "seed": cfg.train.seed,
        },
        "checkpoint": run.checkpoint.name,
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
        sources = [_short_source(str(s)) for s in manifest.get("sources", [])]
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


def _short_source(source: str) -> str:
    """A source or spec without local folders: ``medmnist:../data/x.npz`` -> ``medmnist:x.npz``; a plain path
    keeps its relative form unless it is absolute or leaves its root (``..``)."""
    kind, sep, rest = source.partition(":")
    if sep and kind.isalpha() and len(kind) > 1:  # a spec (a Windows drive letter is one letter)
        return f"{kind}:{Path(rest).name}" if rest else source
    path = Path(source)
    return path.name if path.is_absolute() or ".." in path.parts else source


def check_release_keys(architecture: str, args: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The released keys and shapes are exactly those of ``timm.create_model(architecture, num_classes=0, ...)``."""
    reference = timm.create_model(architecture, pretrained=False, num_classes=0, **args).state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong = sorted(k for k in set(state) & set(reference) if state[k].shape != reference[k].shape)
    if missing or unexpected or wrong:
        raise ExportError(
            f"released weights do not match timm.create_model({architecture!r}, num_classes=0, **{args}): "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, shape mismatch {_few(wrong)}"
        )


def find_results(run_dir: Path, extra: list[str | Path] = ()) -> list[tuple[str, dict[str, Any]]]:
    """Downstream results files for the model card: ``RUN_DIR/{eval,finetune}/**/results.json`` plus ``extra``;
    each is named by its folder (relative to ``RUN_DIR``)."""
    found = [p for pattern in RESULTS_GLOBS for p in sorted(run_dir.glob(pattern))]
    named = [(p.parent.relative_to(run_dir).as_posix(), p) for p in found]
    named += [(Path(p).parent.name, Path(p)) for p in extra]
    results = []
    for name, path in named:
        try:
            results.append((name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            raise ExportError(f"{path}: cannot read evaluation results: {err}") from err
    return results


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    results: list[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    """Write the release folder (weights, config.json, README.md) for a run; returns ``out_dir``.

    Args:
        run_dir: a pretraining run directory (``last.pt`` / ``step-*.pt``).
        out_dir: the release folder; must be empty or absent unless ``overwrite``.
        checkpoint: export this checkpoint instead of the newest one.
        results: downstream ``results.json`` files to summarise in the card (besides ``RUN_DIR/{eval,finetune}/**``).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} is not empty (pass overwrite=True / --overwrite to replace the release)")
    run = load_run(run_dir, checkpoint)
    config = release_config(run, data_summary(run.config))
    state = {k: v.detach().cpu().contiguous() for k, v in run.backbone.state_dict().items()}
    check_release_keys(config["architecture"], config["model_args"], state)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",  # what Hugging Face tooling expects of a PyTorch safetensors file
        "architecture": config["architecture"],
        "model_args": json.dumps(config["model_args"]),
        "objective": run.config.method,
        "step": str(run.step),
    }
    ckpt.export_backbone(run.backbone, out_dir / WEIGHTS_NAME, metadata)
    reloaded = load_file(str(out_dir / WEIGHTS_NAME))
    check_release_keys(config["architecture"], config["model_args"], reloaded)
    _write_text(out_dir / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    _write_text(out_dir / CARD_NAME, model_card(config, find_results(run_dir, list(results))))
    return out_dir


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_OBJECTIVES = {
    "dino": "DINO self-distillation (Caron et al. 2021); released: the EMA teacher backbone",
    "mae": "masked autoencoding (He et al. 2022); released: the ViT encoder (decoder dropped)",
    "moco": "MoCo v3 contrastive learning (Chen et al. 2021); released: the momentum encoder",
    "simclr": "SimCLR contrastive learning (Chen et al. 2020); released: the backbone (projection head dropped)",
}
_SUMMARY_METRICS = ("acc", "balanced_acc", "auc", "f1")


def model_card(config: dict[str, Any], results: list[tuple[str, dict[str, Any]]]) -> str:
    """The release's README.md (Hugging Face model card with YAML front matter)."""
    m, p = config["medfm"], config["pretrained_cfg"]
    arch, args = config["architecture"], config["model_args"]
    chans, size = p["input_size"][0], p["input_size"][1]
    args_py = ", ".join(f"{k}={v!r}" for k, v in args.items() if k not in ("in_chans", "img_size"))
    args_py = f", {args_py}" if args_py else ""
    data = m["data"]
    lines = [
        "---",
        "library_name: timm",
        "tags: [timm, medfm, self-supervised, medical-imaging, image-feature-extraction]",
        "---",
        "",
        f"# {arch} pretrained with {m['objective'].upper()} on medical images (medfm)",
        "",
        f"A `{arch}` backbone ({m['num_params'] / 1e6:.2f} M parameters, {config['num_features']} features) "
        f"pretrained without labels by {_OBJECTIVES.get(m['objective'], m['objective'])}. Backbone only: no "
        "classifier, no projection head.",
        "",
        "| | |",
        "|---|---|",
        f"| input | {chans} x {size} x {size}, values in [0, 1] normalised with mean {p['mean']} and std {p['std']} |",
        f"| model args | `{json.dumps(args)}` |",
        f"| pooling | {config.get('global_pool', 'default')} |",
        f"| training | {m['steps']} optimizer steps, global batch {m['global_batch']}, {m['images_seen']} images seen |",
        f"| data | `{data['spec']}` (split {data['split']}) |",
        "",
        "## Load",
        "",
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
        "With medfm (strict: every key is checked; ViT position embeddings are interpolated for another size):",
        "",
        "```python",
        "from downstream.load import load_backbone",
        'model = load_backbone("PATH/TO/THIS/FOLDER", num_classes=2)',
        "```",
        "",
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
            "| evaluation | protocol | dataset | " + " | ".join(_SUMMARY_METRICS) + " |",
            "|---|---|---|" + "---|" * len(_SUMMARY_METRICS),
        ]
        for name, result in results:
            summary = result.get("summary", {})
            cells = [f"{summary[k]:.4f}" if isinstance(summary.get(k), (int, float)) else "-" for k in _SUMMARY_METRICS]
            dataset = _short_source(str(result.get("dataset", "-")))
            lines.append(f"| {name} | {result.get('protocol', '-')} | `{dataset}` | " + " | ".join(cells) + " |")
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
