"""The release's model card (``README.md``): a Hugging Face model card whose text is the template ``card.md``
(``string.Template``: ``$name`` fields) and whose front matter is ``huggingface_hub.ModelCardData``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCardData
from omegaconf import OmegaConf

from medfm.pretrain.backbones import MODULE_PREFIX, SMALL_IMAGE_STEM
from medfm.pretrain.release.results import SUMMARY_KEYS
from medfm.pretrain.weights import HF_PREFIX

TEMPLATE = Path(__file__).with_name("card.md")


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
    """The release's README.md: ``card.md`` filled in, front matter from ``card_data``."""
    m, p = config["medfm"], config["pretrained_cfg"]
    arch, args = config["architecture"], config["model_args"]
    chans, size = p["input_size"][0], p["input_size"][1]
    small_image_stem = bool(args.get(SMALL_IMAGE_STEM))
    args_py = ", ".join(f"{k}={v!r}" for k, v in args.items() if k not in ("in_chans", "img_size", SMALL_IMAGE_STEM))
    args_py = f", {args_py}" if args_py else ""
    data, recipe = m["data"], m["recipe"]
    fields = {
        "front": card_data(config, results, license or m.get("license") or "other").to_yaml(),
        "arch": arch,
        "objective": m["objective"],
        "objective_title": m["objective"].upper(),
        "params_m": f"{m['num_params'] / 1e6:.2f}",
        "num_features": config["num_features"],
        "description": m.get("objective_description", m["objective"]),
        "chans": chans,
        "size": size,
        "mean": p["mean"],
        "std": p["std"],
        "model_args": json.dumps(args),
        "pooling": config.get("global_pool", "default"),
        "steps": m["steps"],
        "epochs": m["epochs"],
        "global_batch": m["global_batch"],
        "images_seen": m["images_seen"],
        "spec": data["spec"],
        "split": data["split"],
        "samples_per_epoch": data.get("samples_per_epoch"),
        "init": _init_text(m.get("init")),
        "load": "\n".join(_load_lines(arch, chans, size, args_py, small_image_stem)),
        "shard_set": _shard_set(data.get("manifest")),
        "precision": recipe["precision"],
        "seed": recipe["seed"],
        "recipe": OmegaConf.to_yaml(
            OmegaConf.create({k: recipe[k] for k in (m["objective"], "optim", "schedule")})
        ).rstrip(),
        "evaluation": _evaluation(results),
    }
    return Template(TEMPLATE.read_text()).substitute(fields)


def _shard_set(manifest: dict[str, Any] | None) -> str:
    """The Data section's shard-set lines (none for a dataset read without shards)."""
    if not manifest:
        return ""
    return (
        f"\n\nShard set: {manifest['samples']} images in {manifest['shards']} shards "
        f"({manifest['labeled']} with labels, {manifest['duplicates_removed']} duplicates removed); "
        f"modalities {manifest['by_modality']}; splits {manifest['by_split']}.\n"
        f"Sources: {', '.join(map(str, manifest['sources']))}."
    )


def _evaluation(results: list[tuple[str, dict[str, Any]]]) -> str:
    """The Evaluation section: one row per results file, test-split headline metrics."""
    if not results:
        return "No downstream evaluation was attached to this export (see `medfm eval` and `medfm finetune`)."
    lines = [
        "| evaluation | protocol | dataset | " + " | ".join(SUMMARY_KEYS) + " |",
        "|---|---|---|" + "---|" * len(SUMMARY_KEYS),
    ]
    for name, result in results:
        summary = result["summary"]
        cells = [f"{summary[k]:.4f}" if isinstance(summary.get(k), (int, float)) else "-" for k in SUMMARY_KEYS]
        dataset = short_source(str(result["dataset"]))
        lines.append(f"| {name} | {result['protocol']} | `{dataset}` | " + " | ".join(cells) + " |")
    return "\n".join(
        [*lines, "", "Test-split metrics; the classifier or fine-tuning checkpoint was chosen on the val split."]
    )
