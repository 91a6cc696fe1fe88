"""The functions behind ``import medfm`` (see the package docstring); each wires one step and returns its result.

Heavy modules (torch, timm, webdataset) are imported inside the functions: ``import medfm`` stays instant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from medfm.data_shards.manifest import Manifest


# --- results -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardResult:
    """A written shard set: ``out`` (use it as ``data="shards:OUT"``) and its manifest."""

    out: Path
    manifest: Manifest

    @property
    def spec(self) -> str:
        return f"shards:{self.out}"

    @property
    def samples(self) -> int:
        return int(self.manifest.totals["samples"])

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """One ``{"source", "reason"}`` per input that could not be read."""
        return list(self.manifest.skipped)


@dataclass(frozen=True)
class PretrainResult:
    """A finished pretraining run: its folder, the release folder it ended with, the final step."""

    run_dir: Path
    step: int
    config: dict[str, Any]

    @property
    def release_dir(self) -> Path:
        from medfm.pretrain.release import RELEASE_DIR

        return self.run_dir / RELEASE_DIR

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The run's ``metrics.jsonl`` records (training logs and events), oldest first."""
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def load_backbone(self, num_classes: int = 0, **kwargs: Any) -> nn.Module:
        """The released backbone (every key checked), optionally with a new ``num_classes`` classifier."""
        return load_backbone(self.release_dir, num_classes, **kwargs)


@dataclass(frozen=True)
class ExportResult:
    """A release folder (``model.safetensors``, ``config.json``, ``README.md``) and, when pushed, its Hub URL."""

    out: Path
    files: tuple[str, ...]
    repo_url: str | None = None

    @property
    def card(self) -> str:
        return (self.out / "README.md").read_text()

    def load_backbone(self, num_classes: int = 0, **kwargs: Any) -> nn.Module:
        return load_backbone(self.out, num_classes, **kwargs)


@dataclass(frozen=True)
class EvalResult:
    """Frozen-feature evaluation: ``results[init][protocol]`` (the results.json records) under ``out_dir``."""

    out_dir: Path
    results: dict[str, dict[str, dict[str, Any]]] = field(repr=False)

    @property
    def summary(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """``{init: {protocol: {"acc", "auc", ...}}}``: the test metrics (NaN where a metric is undefined)."""
        return {init: {p: r["summary"] for p, r in protocols.items()} for init, protocols in self.results.items()}

    @property
    def table(self) -> str:
        from medfm.downstream.evaluate import summary_table

        return summary_table(self.results)


@dataclass(frozen=True)
class FinetuneResult:
    """Fine-tuning: ``results[init]`` (the results.json records) under ``out_dir``; best weights per init."""

    out_dir: Path
    results: dict[str, dict[str, Any]] = field(repr=False)

    @property
    def summary(self) -> dict[str, dict[str, float | None]]:
        """``{init: {"acc", "auc", ...}}``: test metrics of the best-on-val checkpoint."""
        return {init: r["summary"] for init, r in self.results.items()}

    @property
    def table(self) -> str:
        from medfm.downstream.finetune import summary_table

        return summary_table(self.results)


# --- steps ---------------------------------------------------------------------------------------------------


def shard(sources: str | Path | Sequence[str | Path], out: str | Path, **options: Any) -> ShardResult:
    """Write medical images as WebDataset shards (``medfm shard``); options as in ``medfm.data_shards.shard.shard``
    (``workers``, ``max_side``, ``dedup``, ``splits``, ``part``, ``resume``, ...)."""
    from medfm.data_shards.shard import shard as write_shards

    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    manifest = write_shards([str(s) for s in sources], out, **options)
    return ShardResult(out=Path(out), manifest=manifest)


def reduce(
    shards: str | Path | ShardResult,
    out: str | Path,
    *,
    model: str | Path | PretrainResult | ExportResult,
    keep: float,
    method: str = "kcenter",
    **options: Any,
) -> ShardResult:
    """Keep a diverse ``keep`` fraction of a shard set, chosen on ``model``'s embeddings (``medfm shard reduce``).

    Args:
        shards: the shard set (its folder or a ``ShardResult``).
        out: the new shard set's folder; its manifest's ``reduction`` section and ``dropped.jsonl`` say what was
            dropped and why.
        model: a medfm release or run (or their results), a timm hub snapshot, ``hf-hub:ORG/NAME`` from the local
            cache, or a weights file with ``architecture=``.
        method: ``kcenter`` (k-center greedy within k-means clusters) or ``random`` (the comparison).
        options: as ``medfm.downstream.reduce.reduce_shards`` (``architecture``, ``img_size``, ``batch_size``,
            ``clusters``, ``seed``, ``overwrite``).
    """
    from medfm.downstream.reduce import reduce_shards

    source = shards.out if isinstance(shards, ShardResult) else shards
    manifest = reduce_shards(source, out, model=_backbone_path(model), keep=keep, method=method, **options)
    return ShardResult(out=Path(out), manifest=manifest)


def pretrain(
    out: str | Path | None = None,
    data: str | ShardResult | None = None,
    method: str | None = None,
    model: str | nn.Module | None = None,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    **values: Any,
) -> PretrainResult:
    """Pretrain (or resume) a backbone; returns when the run ends with its release written.

    Args:
        out: the run folder (``train.run_dir``); running again on it resumes.
        data: a dataset spec (``data.spec``: ``shards:DIR``, ``medmnist:FILE.npz``, ...) or a ``ShardResult``.
        method: ``mae``, ``dino``, ``dinov2``, ``simclr``, ``moco``, ``distill`` or ``spark``.
        model: a timm model name (``model.backbone``), or your own ``nn.Module``: a timm model or any module
            mapping (B, C, H, W) images to (B, D) features or a (B, D, h, w) map (``register_module``).
        config: a YAML recipe (``configs/pretrain/``); ``values`` and ``overrides`` go on top of it.
        values: config keys: ``schedule={"epochs": 5}``, ``**{"train.batch_size": 32}``. ``data`` and ``model``
            given as dicts are those sections (``data={"spec": ..., "img_size": 28}``); their other keys can also
            go dotted beside the shortcut: ``**{"data.img_size": 28}``.
        overrides: ``["key=value", ...]`` as on the command line.
    """
    from medfm.pretrain.backbones import register_module as register
    from medfm.pretrain.config import load_config, to_dict
    from medfm.pretrain.main import run_pretraining

    given: dict[str, Any] = dict(values)
    if out is not None:
        given["train.run_dir"] = str(out)
    if method is not None:
        given["method"] = method
    _section_or(given, "data", data, "spec", _spec)
    _section_or(given, "model", model, "backbone", lambda m: m if isinstance(m, str) else register(m))
    cfg = load_config(config, list(overrides), values=given)
    step = run_pretraining(cfg)
    return PretrainResult(run_dir=Path(cfg.train.run_dir), step=step, config=to_dict(cfg))


def export(
    run_dir: str | Path | PretrainResult,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    results: Sequence[str | Path] = (),
    overwrite: bool = False,
    license: str = "other",
    push_to_hub: str | None = None,
    private: bool = True,
    token: str | None = None,
) -> ExportResult:
    """Write a run's release folder (``medfm export``); ``push_to_hub="ORG/NAME"`` then uploads it to the
    Hugging Face Hub (``medfm.pretrain.hub``; private unless ``private=False``; ``token``: else the logged-in one).
    ``license``: the weights' license id in the model card."""
    from medfm.pretrain.export import export_run

    source = run_dir.run_dir if isinstance(run_dir, PretrainResult) else run_dir
    if push_to_hub:
        from medfm.pretrain.hub import check_repo_id

        check_repo_id(push_to_hub)  # before the release is written
    folder = export_run(source, out, checkpoint=checkpoint, results=list(results), overwrite=overwrite, license=license)
    url = None
    if push_to_hub:
        from medfm.pretrain.hub import push_release

        url = push_release(folder, push_to_hub, private=private, token=token)
    files = tuple(sorted(p.name for p in Path(folder).iterdir() if p.is_file()))
    return ExportResult(out=Path(folder), files=files, repo_url=url)


def _section_or(given: dict[str, Any], section: str, value: Any, key: str, convert: Any) -> None:
    """A shortcut argument named like a config section (``data``, ``model``, ``backbone``): a dict is that
    section's keys (``data={"img_size": 28}``), anything else the section's main key (``data.spec``)."""
    if value is None:
        return
    if isinstance(value, Mapping):
        given[section] = {**given.get(section, {}), **value} if isinstance(given.get(section), Mapping) else value
    else:
        given[f"{section}.{key}"] = convert(value)


def _spec(data: str | Path | ShardResult) -> str:
    return data.spec if isinstance(data, ShardResult) else str(data)


def _backbone_path(backbone: str | Path | PretrainResult | ExportResult) -> str:
    if isinstance(backbone, PretrainResult):
        return str(backbone.run_dir)
    if isinstance(backbone, ExportResult):
        return str(backbone.out)
    return str(backbone)


def _downstream_values(backbone: Any, data: Any, out: str | Path | None, values: Mapping[str, Any]) -> dict:
    given: dict[str, Any] = dict(values)
    _section_or(given, "backbone", backbone, "path", _backbone_path)
    _section_or(given, "data", data, "spec", _spec)
    if out is not None:
        given["out_dir"] = str(out)
    return given


def evaluate(
    backbone: str | Path | PretrainResult | ExportResult | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    **values: Any,
) -> EvalResult:
    """kNN and linear probe on frozen features (``medfm eval``) of the release (add the random-init comparison
    with ``**{"backbone.inits": ["release", "random"]}``).

    ``backbone``: a release folder, run directory, weights file or result object, or the ``backbone`` section as a
    dict; ``data``: a labeled spec, a ``ShardResult`` or the ``data`` section. ``values``: keys of the eval schema,
    e.g. ``protocols=["linear"]``, ``efficiency={"fractions": [0.1, 1.0]}``."""
    from medfm.downstream.config import EvalConfig, load_config
    from medfm.downstream.evaluate import run_eval

    cfg = load_config(EvalConfig, config, list(overrides), values=_downstream_values(backbone, data, out, values))
    return EvalResult(out_dir=Path(cfg.out_dir), results=run_eval(cfg))


def finetune(
    backbone: str | Path | PretrainResult | ExportResult | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    **values: Any,
) -> FinetuneResult:
    """Full fine-tuning with layer-wise lr decay (``medfm finetune``); ``values`` as for ``evaluate``, e.g.
    ``train={"epochs": 5}``."""
    from medfm.downstream.config import FinetuneConfig, load_config
    from medfm.downstream.finetune import run_finetune

    cfg = load_config(FinetuneConfig, config, list(overrides), values=_downstream_values(backbone, data, out, values))
    return FinetuneResult(out_dir=Path(cfg.out_dir), results=run_finetune(cfg))


def load_backbone(path: str | Path, num_classes: int = 0, **kwargs: Any) -> nn.Module:
    """A released backbone with every key checked (``medfm.downstream.load.load_backbone``): a timm model, or a
    registered module of yours (``register_module`` first, under the name the release records)."""
    from medfm.downstream.load import load_backbone as load

    return load(path, num_classes, **kwargs)


def register_module(module: nn.Module, name: str | None = None) -> str:
    """Make your own backbone buildable by medfm in this process as ``module:NAME`` (default: its class name);
    needed to load or evaluate a release of it (``medfm.pretrain.backbones.register_module``)."""
    from medfm.pretrain.backbones import register_module as register

    return register(module, name)
