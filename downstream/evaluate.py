"""``medfm eval``: kNN and linear probe on frozen features (computed once, cached), with label efficiency and
robustness to corrupted test copies. ``run_eval(cfg)`` wires; the protocols are functions of ``Features``.

Output: ``OUT_DIR/config.yaml``, ``OUT_DIR/<init>/<protocol>/results.{json,md}`` + ``roc.png``, ``confusion.png``
(single-label), ``embedding.png`` for each init (``release``, ``random``) and protocol (``knn``, ``linear``), and
``OUT_DIR/summary.md`` with one row per (init, protocol).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from medfm.data_shards.outputs import lock_folder
from medfm.downstream import report
from medfm.downstream.data import (
    EvalTransform,
    Task,
    checked_task,
    class_names_of,
    dataset_fingerprint,
    open_split,
    split_label_lists,
)
from medfm.downstream.efficiency import label_efficiency_rows, label_subset
from medfm.downstream.features import FeatureCache, Features, dataset_features, state_checksum
from medfm.downstream.linear import select_linear_probe
from medfm.downstream.load import Release, load_for_init, read_baseline, read_release
from medfm.downstream.metrics import classification_metrics, summary
from medfm.downstream.report import write_plots, write_results
from medfm.downstream.robustness import Corruption, corruption_rows
from medfm.downstream.sites import per_site_rows, robustness_index, sample_sites
from medfm.pretrain.config import save_config, to_dict
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.knn import feature_precision, knn_scores

Scorer = Callable[[Tensor], Tensor]  # features (N, D) -> scores (N, C)


@dataclass
class FrozenSetup:
    """A loaded backbone and everything the feature cache keys on."""

    model: nn.Module
    description: dict[str, Any]  # source, architecture, init, checksum (results JSON "backbone")
    transform: EvalTransform
    cache: FeatureCache
    spec: str
    fingerprint: str
    data: DictConfig
    device: torch.device
    pooling: DictConfig  # cfg.features: pooling, layers

    def features(self, split: str, corruption: Corruption | None = None) -> Features:
        """Features of one split (optionally corrupted), from the cache when the same inputs were seen."""
        transform = EvalTransform(self.transform.size, self.transform.mean, self.transform.std, corruption)
        parts = {
            "backbone": self.description["checksum"],
            "dataset": self.fingerprint,
            "spec": self.spec,
            "split": split,
            "transform": repr(transform),
            "splitting": (self.data.val_fraction, self.data.test_fraction, self.data.split_seed),
            "channels": self.transform_channels,
            "pooling": (self.pooling.pooling, self.pooling.layers) if self.pooling.pooling != "head" else "head",
            "precision": feature_precision(self.device),
        }

        def compute() -> Features:
            dataset = open_split(
                self.spec,
                split,
                transform,
                channels=self.transform_channels,
                val_fraction=self.data.val_fraction,
                test_fraction=self.data.test_fraction,
                seed=self.data.split_seed,
            )
            return dataset_features(
                self.model,
                dataset,
                batch_size=self.data.batch_size,
                num_workers=self.data.num_workers,
                device=self.device,
                pooling=self.pooling.pooling,
                layers=self.pooling.layers,
            )

        return self.cache.get_or_compute(parts, compute)

    @property
    def transform_channels(self) -> int:
        return int(self.model.pretrained_cfg["input_size"][0])


def frozen_setups(cfg: DictConfig, release: Release, init: str, baseline: Release | None = None) -> list[FrozenSetup]:
    """One setup per ``features.input_scales``: the backbone at each input side."""
    side = cfg.backbone.img_size or release.img_size
    return [frozen_setup(cfg, release, init, baseline, img_size=round(side * s)) for s in cfg.features.input_scales]


def frozen_setup(cfg: DictConfig, release: Release, init: str, baseline: Release | None, img_size: int) -> FrozenSetup:
    """Load the backbone (strictly) for feature extraction at ``img_size`` and set up the cache."""
    torch.manual_seed(cfg.seed)  # random-init baselines are reproducible
    model, weights = load_for_init(release, init, baseline, img_size=img_size, in_chans=cfg.backbone.in_chans)
    model.eval()
    input_cfg = model.pretrained_cfg
    description = {
        "source": str(cfg.backbone.baseline if init == "baseline" else cfg.backbone.path),
        "architecture": weights.architecture,
        "model_args": weights.model_args,
        "init": init,
        "objective": weights.info.get("objective"),
        "pretrain_steps": weights.info.get("steps"),
        "input_size": input_cfg["input_size"],
        "pooling": cfg.features.pooling if cfg.features.pooling == "head" else f"last {cfg.features.layers} layers",
        "checksum": state_checksum(model.state_dict(), weights.architecture),
    }
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else Path(cfg.out_dir) / "feature_cache"
    return FrozenSetup(
        model=model,
        description=description,
        transform=EvalTransform(input_cfg["input_size"][-1], input_cfg["mean"], input_cfg["std"]),
        cache=FeatureCache(cache_dir),
        spec=cfg.data.spec,
        fingerprint=dataset_fingerprint(cfg.data.spec),
        data=cfg.data,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        pooling=cfg.features,
    )


def task_of(spec: str, splits: dict[str, Features]) -> Task:
    """Binary / multiclass / multilabel from the labels of all splits, with the spec's class names; a LabelError
    when a split has fewer than 2 classes or a class has no sample (see ``checked_task``)."""
    return checked_task(spec, {split: f.labels.tolist() for split, f in splits.items()}, class_names_of(spec))


def fit_protocol(protocol: str, train: Features, val: Features, task: Task, cfg: DictConfig) -> tuple[Scorer, dict]:
    """A scorer fitted on ``train`` (selection on ``val`` for the linear probe) and the settings it used."""
    if protocol == "knn":
        k, temperature = cfg.knn.k, cfg.knn.temperature

        def scorer(features: Tensor) -> Tensor:
            return knn_scores(train.features, train.labels, features, task.num_outputs, k=k, temperature=temperature)

        return scorer, {"k": k, "temperature": temperature}
    if protocol == "linear":
        selection = select_linear_probe(
            (train.features, train.labels),
            (val.features, val.labels),
            task,
            grid=list(cfg.linear.weight_decays),
            metric=cfg.selection_metric,
            class_weights=cfg.linear.class_weights,
            max_iter=cfg.linear.max_iter,
        )
        settings = {
            "weight_decay": selection.weight_decay,
            "sklearn_c": selection.sklearn_c,  # the same penalty as scikit-learn's LogisticRegression(C=...)
            f"val_{cfg.selection_metric}_by_weight_decay": selection.grid,
            "class_weights": cfg.linear.class_weights,
        }
        return selection.probe.scores, settings
    raise ConfigError(f"config key 'protocols': unknown protocol {protocol!r}")


def _metrics(task: Task, features: Features, scorer: Scorer) -> tuple[dict[str, Any], np.ndarray]:
    scores = scorer(features.features).numpy()
    return classification_metrics(task, features.labels.numpy(), scores), scores


def label_efficiency(protocol: str, splits: dict[str, Features], task: Task, cfg: DictConfig) -> list[dict[str, Any]]:
    """Each label budget x seed: fit on a stratified train subset, test metrics; mean +- std over seeds."""

    def run(budget: dict[str, Any], seed: int) -> tuple[dict[str, float], int]:
        subset = splits["train"].subset(label_subset(splits["train"].labels, seed=seed, **budget))
        scorer, _ = fit_protocol(protocol, subset, splits["val"], task, cfg)
        return summary(_metrics(task, splits["test"], scorer)[0]), len(subset)

    return label_efficiency_rows(cfg.efficiency, run)


def robustness(
    setup: FrozenSetup, scorer: Scorer, task: Task, clean: dict[str, Any], cfg: DictConfig
) -> list[dict[str, Any]]:
    """Test metrics on corrupted copies of the test split, and the drop from the clean test metrics."""
    return corruption_rows(
        cfg.robustness, clean, lambda c: summary(_metrics(task, setup.features("test", c).labeled(), scorer)[0])
    )


def run_eval(cfg: DictConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Every configured init x protocol; returns ``{init: {protocol: result}}``, written under ``cfg.out_dir``."""
    out_dir = Path(cfg.out_dir)
    d = cfg.data
    labels = split_label_lists(d.spec, d.val_fraction, d.test_fraction, d.split_seed)
    if labels is not None:  # labels that define no task fail before a backbone is loaded (shards: after a pass)
        checked_task(d.spec, labels, class_names_of(d.spec))
    with lock_folder(out_dir, "medfm eval") as lock:  # two evaluations into one folder would mix their results
        if lock.warning:
            print(f"medfm eval: warning: {lock.warning}", file=sys.stderr)
        return _evaluate_into(cfg, out_dir)


def _evaluate_into(cfg: DictConfig, out_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    save_config(cfg, out_dir / "config.yaml")
    release = read_release(cfg.backbone.path, cfg.backbone.architecture)
    baseline = read_baseline(cfg.backbone, release)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    cache = {"hits": 0, "misses": 0}
    for init in cfg.backbone.inits:
        setups = frozen_setups(cfg, release, init, baseline)
        results[init] = evaluate_frozen(setups, cfg, out_dir / init)
        cache = {k: cache[k] + sum(getattr(setup.cache, k) for setup in setups) for k in cache}
    (out_dir / "summary.md").write_text(summary_table(results))
    (out_dir / "run.json").write_text(json.dumps({"config": to_dict(cfg), "cache": cache}, indent=2))
    return results


def evaluate_frozen(setups: list[FrozenSetup], cfg: DictConfig, out_dir: Path) -> dict[str, dict[str, Any]]:
    """The protocols on one backbone's features: ``{protocol: result}``, each written to ``out_dir/<protocol>``.
    With several input sides (``setups``), each protocol keeps the side of the best val ``selection_metric``; the
    robustness index uses the first."""
    splits_by_side = [{split: s.features(split).labeled() for split in ("train", "val", "test")} for s in setups]
    task = task_of(cfg.data.spec, splits_by_side[0])
    sites = None
    if cfg.sites.source is not None:
        keys = {split: f.keys for split, f in splits_by_side[0].items()}
        sites = {split: sample_sites(cfg.sites.source, cfg.data.spec, split_keys) for split, split_keys in keys.items()}
    results = {}
    for protocol in cfg.protocols:
        if protocol == "robustness_index":
            results[protocol] = centre_robustness(setups[0], cfg, splits_by_side[0], sites, task, out_dir / protocol)
            continue
        fits = [fit_protocol(protocol, s["train"], s["val"], task, cfg) for s in splits_by_side]
        vals = [_metrics(task, s["val"], scorer)[0] for s, (scorer, _) in zip(splits_by_side, fits, strict=True)]
        best = best_on_val([summary(v).get(cfg.selection_metric, math.nan) for v in vals])
        setup, splits, (scorer, settings), val = setups[best], splits_by_side[best], fits[best], vals[best]
        settings = {**settings, "input_side": setup.transform.size}
        if len(setups) > 1:
            sides = [s.transform.size for s in setups]
            by_side = {side: summary(v).get(cfg.selection_metric) for side, v in zip(sides, vals, strict=True)}
            settings[f"val_{cfg.selection_metric}_by_input_side"] = by_side
        test, test_scores = _metrics(task, splits["test"], scorer)
        result: dict[str, Any] = {
            "protocol": protocol,
            "dataset": cfg.data.spec,
            "backbone": setup.description,
            "task": {"kind": task.kind, "class_names": list(task.class_names)},
            "n": {split: len(f) for split, f in splits.items()},
            "settings": settings,
            "val": val,
            "test": test,
            "summary": summary(test),
        }
        if cfg.efficiency.fractions or cfg.efficiency.per_class:
            result["label_efficiency"] = label_efficiency(protocol, splits, task, cfg)
        if cfg.robustness.corruptions:
            result["robustness"] = robustness(setup, scorer, task, summary(test), cfg)
        if sites is not None:
            labels = splits["test"].labels.numpy()
            result["per_site"] = per_site_rows(
                sites["test"], labels, test_scores, lambda y, s: summary(classification_metrics(task, y, s))
            )
        write_results(out_dir / protocol, result)
        if cfg.plots:
            embedding = (splits["test"].features.numpy(), splits["test"].labels.numpy())
            title = f"{protocol} ({setup.description['init']}) - {Path(cfg.data.spec.partition(':')[2]).name}"
            labels = splits["test"].labels.numpy()
            write_plots(out_dir / protocol, task, labels, test_scores, test.get("confusion"), embedding, title)
        results[protocol] = result
    return results


def best_on_val(values: list[float]) -> int:
    """The index of the highest value, the first on ties; NaN (an undefined metric) ranks last."""
    ranked = [-math.inf if math.isnan(value) else value for value in values]
    return ranked.index(max(ranked))


def centre_robustness(
    setup: FrozenSetup,
    cfg: DictConfig,
    splits: dict[str, Features],
    sites: dict[str, list[str]],
    task: Task,
    out_dir: Path,
) -> dict[str, Any]:
    """Protocol robustness_index on the embeddings of every labeled split together (medfm.downstream.sites):
    ``results.json`` / ``results.md`` and ``sites.png`` (the index over k, the embedding coloured by site)."""
    features = torch.cat([f.features for f in splits.values()])
    labels = torch.cat([f.labels for f in splits.values()])
    names = [site for split in splits for site in sites[split]]
    index = robustness_index(features, labels, names, list(cfg.sites.k))
    result: dict[str, Any] = {
        "protocol": "robustness_index",
        "dataset": cfg.data.spec,
        "backbone": setup.description,
        "task": {"kind": task.kind, "class_names": list(task.class_names)},
        "settings": {"sites_source": cfg.sites.source, "k": list(cfg.sites.k), "splits": list(splits)},
        **index,
        "summary": {},  # no classification metric: the index is in "rows"
    }
    report.write_robustness_index(out_dir, result, features.numpy(), names, plots=cfg.plots)
    return result


def summary_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One Markdown row per (init, protocol) with the test metrics, then the robustness index of each init."""
    table = report.summary_table(
        [
            ({"init": init, "protocol": protocol, "dataset": f"`{result['dataset']}`"}, result["summary"])
            for init, protocols in results.items()
            for protocol, result in protocols.items()
            if protocol != "robustness_index"
        ]
    )
    indices = {
        init: protocols["robustness_index"] for init, protocols in results.items() if "robustness_index" in protocols
    }
    return table + (("\n" if table else "") + report.robustness_index_table(indices) if indices else "")
