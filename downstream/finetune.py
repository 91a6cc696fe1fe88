"""``medfm finetune``: full fine-tuning of a released (or random-init) backbone on a labeled task.

Recipe after MAE / BEiT fine-tuning: AdamW with layer-wise lr decay (timm's ``param_groups_layer_decay``), drop
path, linear warm-up + cosine lr per optimizer step, label smoothing (single-label) or BCE (multi-label), class
weights for imbalance, and the stem + first K blocks / stages frozen (``train.freeze_blocks``; their BatchNorm
statistics frozen too). The checkpoint with the best val metric is kept and evaluated once on test. Same
Accelerate setup as pretraining (devices, processes, mixed precision).

``finetune_once`` trains one model; ``run_finetune`` runs the configured inits (pretrained release and/or random
init, same recipe), label budgets x seeds and corrupted test copies, and writes the results.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from safetensors.torch import save_file
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from downstream.config import save_config, to_dict
from downstream.data import EvalTransform, Task, class_names_of, infer_task, open_split, split_labels
from downstream.efficiency import budget_name, budgets, label_subset, mean_std
from downstream.features import collate
from downstream.linear import class_weight_tensor, loss_function
from downstream.load import Release, load_backbone, read_release
from downstream.metrics import SUMMARY_KEYS, classification_metrics, summary
from downstream.report import write_plots, write_results
from downstream.robustness import Corruption
from pretrain.errors import TrainingDiverged
from pretrain.schedules import cosine_schedule
from pretrain.transforms import MedicalAugment, RandomIntensity


def freeze_blocks(model: nn.Module, blocks: int) -> list[str]:
    """Freeze the stem and the first ``blocks`` blocks (ViT) / stages (CNN) by timm's coarse ``group_matcher``;
    ``-1``: everything but the classifier. Returns the frozen parameter names."""
    if blocks == 0:
        return []
    classifier = (model.pretrained_cfg or {}).get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    if blocks < 0:
        frozen = [n for n, _ in model.named_parameters() if not any(n.startswith(f"{c}.") for c in names)]
    else:
        layer_of = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
        frozen = [n for n, _ in model.named_parameters() if layer_of.get(n, math.inf) <= blocks]
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    return frozen


def freeze_norm_statistics(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen keep their running statistics (eval mode)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


def optimizer_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth - layer)`` (head 1.0) and no decay on 1-D params."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
    )


def derive(train: DictConfig, world_size: int, steps_per_epoch: int) -> dict[str, Any]:
    """Every number computed from the recipe, in one place: global batch, scaled peak lr (linear scaling rule,
    ``lr x global_batch / 256`` as in MAE's fine-tuning), and the step counts of the schedule."""
    steps_per_epoch = max(1, steps_per_epoch)
    total = max(1, math.ceil(train.epochs * steps_per_epoch))
    if train.max_steps is not None:
        total = min(total, train.max_steps)
    global_batch = train.batch_size * world_size
    return {
        "world_size": world_size,
        "global_batch": global_batch,
        "lr": train.lr * global_batch / 256,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "warmup_steps": min(total, round(train.warmup_epochs * steps_per_epoch)),
        "eval_every_steps": max(1, round(train.eval_every_epochs * steps_per_epoch)),
    }


def train_transform(cfg: DictConfig, size: int, mean: list[float], std: list[float]) -> MedicalAugment:
    a = cfg.augment
    return MedicalAugment(
        size=size,
        scale=tuple(a.crop_scale),
        hflip=a.hflip,
        vflip=a.vflip,
        intensity=RandomIntensity(a.brightness, a.contrast, a.gamma, p=a.intensity_prob),
        blur_prob=0.0,
        mean=tuple(mean),
        std=tuple(std),
    )


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, task: Task, accelerator: Accelerator
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) over a prepared loader, gathered from every process (padding dropped)."""
    model.eval()
    labels, scores = [], []
    for batch in loader:
        logits = model(batch["image"]).float()
        probs = logits.sigmoid() if task.multilabel else logits.softmax(dim=1)
        probs, target = accelerator.gather_for_metrics((probs, batch["label"]))
        scores.append(probs.cpu())
        labels.append(target.cpu())
    return torch.cat(labels).numpy(), torch.cat(scores).numpy()


def _metric(metrics: dict[str, Any], name: str) -> float:
    value = metrics.get(name, math.nan)
    return -math.inf if value is None or math.isnan(value) else float(value)


@dataclass
class FinetuneRun:
    """Outcome of one fine-tuning run: the best model (on val) and its metrics."""

    model: nn.Module
    task: Task
    val: dict[str, Any]
    test: dict[str, Any]
    test_labels: np.ndarray
    test_scores: np.ndarray
    best_step: int
    derived: dict[str, Any]
    n_train: int
    frozen: list[str]
    history: list[dict[str, Any]]
    accelerator: Accelerator
    prepared: nn.Module  # the model as wrapped by the accelerator (DDP / mixed precision)
    eval_transform: EvalTransform
    split_args: dict[str, Any]


def finetune_once(
    cfg: DictConfig,
    release: Release,
    init: str,
    accelerator: Accelerator,
    *,
    seed: int,
    budget: dict[str, Any] | None = None,
    log_path: Path | None = None,
) -> FinetuneRun:
    """Train one model with the recipe in ``cfg.train``; the best val checkpoint is evaluated once on test."""
    t = cfg.train
    torch.manual_seed(seed)
    model = load_backbone(
        release,
        img_size=cfg.backbone.img_size,
        in_chans=cfg.backbone.in_chans,
        init=init,
        drop_path_rate=t.drop_path,
    )
    input_cfg = model.pretrained_cfg
    size, mean, std = input_cfg["input_size"][-1], input_cfg["mean"], input_cfg["std"]
    channels = input_cfg["input_size"][0]
    d = cfg.data
    split_args = {
        "channels": channels,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "seed": d.split_seed,
    }
    train_set: Dataset = open_split(d.spec, "train", train_transform(cfg, size, mean, std), **split_args)
    eval_sets = {s: open_split(d.spec, s, EvalTransform(size, mean, std), **split_args) for s in ("val", "test")}
    labels = split_labels(train_set)
    if labels is None:
        raise ValueError(f"{d.spec}: fine-tuning needs an indexable dataset (stream a shard set into a file first)")
    all_labels = [*labels, *(label for s in eval_sets.values() for label in split_labels(s) or [])]
    task = infer_task(all_labels, class_names_of(d.spec))
    label_tensor = torch.tensor(np.asarray(labels, dtype=np.float32 if task.multilabel else np.int64))
    if budget:
        train_set = Subset(train_set, label_subset(label_tensor, seed=seed, **budget).tolist())
        label_tensor = label_tensor[torch.tensor(train_set.indices)]

    model.reset_classifier(task.num_outputs)
    frozen = freeze_blocks(model, t.freeze_blocks)
    optimizer = torch.optim.AdamW(optimizer_groups(model, t.weight_decay, t.layer_decay), betas=(0.9, 0.999))
    world = accelerator.num_processes
    weights = class_weight_tensor(label_tensor, task) if t.class_weights else None
    criterion = loss_function(task, weights, label_smoothing=t.label_smoothing)

    generator = torch.Generator().manual_seed(seed)
    drop_last = len(train_set) >= t.batch_size * world
    train_loader = DataLoader(
        train_set, batch_size=t.batch_size, shuffle=True, drop_last=drop_last, num_workers=d.num_workers,
        collate_fn=collate, generator=generator,
    )  # fmt: skip
    loaders = {
        s: DataLoader(ds, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate)
        for s, ds in eval_sets.items()
    }
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, loaders["val"], loaders["test"]
    )
    criterion = criterion.to(accelerator.device)
    derived = derive(t, world, len(train_loader))
    eval_every = derived["eval_every_steps"]
    schedule = cosine_schedule(derived["lr"], t.min_lr, derived["total_steps"], derived["warmup_steps"])

    accelerator.print(f"finetune ({init}, seed {seed}, {len(train_set)} training images): " + ", ".join(f"{k}={v}" for k, v in derived.items()))  # fmt: skip
    best_state, best_step, best_val, history = train_loop(
        model, optimizer, criterion, train_loader, val_loader, schedule, task, accelerator,
        eval_every=eval_every, clip_grad=t.clip_grad, metric=cfg.selection_metric, log_path=log_path,
    )  # fmt: skip
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best_state)
    test_labels, test_scores = predict(model, test_loader, task, accelerator)
    test = classification_metrics(task, test_labels, test_scores)
    accelerator.free_memory()
    return FinetuneRun(
        model=unwrapped.eval(),
        task=task,
        val=best_val,
        test=test,
        test_labels=test_labels,
        test_scores=test_scores,
        best_step=best_step,
        derived=derived,
        n_train=len(train_set),
        frozen=frozen,
        history=history,
        accelerator=accelerator,
        prepared=model,
        eval_transform=EvalTransform(size, mean, std),
        split_args=split_args,
    )


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    schedule: np.ndarray,
    task: Task,
    accelerator: Accelerator,
    *,
    eval_every: int,
    clip_grad: float,
    metric: str,
    log_path: Path | None,
) -> tuple[dict[str, Tensor], int, dict[str, Any], list[dict[str, Any]]]:
    """``len(schedule)`` optimizer steps; val every ``eval_every`` steps and at the end. The step: lr by layer ->
    forward under autocast -> stop on a non-finite loss -> backward / clip / step. Returns the best state (by
    ``metric`` on val), its step, its val metrics and the history of evaluations."""
    total = len(schedule)
    best_value, best_state, best_step, best_val = -math.inf, None, 0, {}
    history: list[dict[str, Any]] = []
    step, losses = 0, []
    while step < total:
        model.train()
        freeze_norm_statistics(model)
        for batch in train_loader:
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[step]) * group.get("lr_scale", 1.0)
            with accelerator.autocast():
                logits = model(batch["image"])
                target = batch["label"].float() if task.multilabel else batch["label"]
                loss = criterion(logits.float(), target)
            mean_loss = accelerator.reduce(loss.detach(), "mean")  # every process stops together
            if not torch.isfinite(mean_loss):
                raise TrainingDiverged(f"non-finite loss {mean_loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if clip_grad > 0:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            losses.append(mean_loss.item())
            step += 1
            if step % eval_every == 0 or step == total:
                val = classification_metrics(task, *predict(model, val_loader, task, accelerator))
                record = {"step": step, "lr": float(schedule[step - 1]), "train_loss": float(np.mean(losses)), **{f"val_{k}": val[k] for k in SUMMARY_KEYS}}  # fmt: skip
                history.append(record)
                losses = []
                if log_path is not None and accelerator.is_main_process:
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                value = _metric(val, metric)
                if value > best_value or best_state is None:
                    best_value, best_step, best_val = value, step, val
                    best_state = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
                model.train()
                freeze_norm_statistics(model)
            if step >= total:
                break
    return best_state, best_step, best_val, history


def corrupted_test(run: FinetuneRun, cfg: DictConfig) -> list[dict[str, Any]]:
    """Best model on corrupted copies of the test split; drop from the clean test metrics."""
    rows, clean, base = [], summary(run.test), run.eval_transform
    for name in cfg.robustness.corruptions:
        for severity in cfg.robustness.severities:
            transform = EvalTransform(base.size, base.mean, base.std, Corruption(name, severity))
            dataset = open_split(cfg.data.spec, "test", transform, **run.split_args)
            loader = DataLoader(
                dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, collate_fn=collate
            )
            labels, scores = predict(run.prepared, run.accelerator.prepare(loader), run.task, run.accelerator)
            metrics = summary(classification_metrics(run.task, labels, scores))
            rows.append({"corruption": name, "severity": severity, "test": metrics, "drop": {k: clean[k] - metrics[k] for k in metrics}})  # fmt: skip
    return rows


def run_finetune(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Every init in ``cfg.backbone.inits`` with the same recipe; returns ``{init: result}``, written under
    ``OUT_DIR/<init>/`` (results.json / .md, PNGs, metrics.jsonl, best.safetensors) plus ``OUT_DIR/summary.md``."""
    out_dir = Path(cfg.out_dir)
    # cpu=True where there is no GPU: without it a 2-process CPU launch gives two unsynchronised runs.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.precision)
    main = accelerator.is_main_process  # one process writes the files
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    release = read_release(cfg.backbone.path, cfg.backbone.architecture)
    results = {}
    for init in cfg.backbone.inits:
        folder = out_dir / init
        if main:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metrics.jsonl").unlink(missing_ok=True)
        run = finetune_once(cfg, release, init, accelerator, seed=cfg.train.seed, log_path=folder / "metrics.jsonl")
        result: dict[str, Any] = {
            "protocol": "finetune",
            "dataset": cfg.data.spec,
            "backbone": {
                "source": str(cfg.backbone.path),
                "architecture": release.architecture,
                "model_args": release.model_args,
                "init": init,
                "objective": release.info.get("objective"),
                "input_size": run.model.pretrained_cfg["input_size"],
            },
            "task": {"kind": run.task.kind, "class_names": list(run.task.class_names)},
            "settings": {
                "best_step": run.best_step,
                "total_steps": run.derived["total_steps"],
                "derived": run.derived,
                "n_train": run.n_train,
                "frozen_parameters": len(run.frozen),
                "selection_metric": cfg.selection_metric,
                "recipe": to_dict(cfg)["train"],
            },
            "val": run.val,
            "test": run.test,
            "summary": summary(run.test),
            "history": run.history,
        }
        if cfg.efficiency.fractions or cfg.efficiency.per_class:
            result["label_efficiency"] = _label_efficiency(cfg, release, init, accelerator)
        if cfg.robustness.corruptions:
            result["robustness"] = corrupted_test(run, cfg)
        results[init] = result
        if not main:
            continue
        save_file({k: v.contiguous() for k, v in run.model.state_dict().items()}, str(folder / "best.safetensors"))
        write_results(folder, result)
        if cfg.plots:
            write_plots(
                folder,
                run.task,
                run.test_labels,
                run.test_scores,
                run.test.get("confusion"),
                title=f"finetune ({init})",
            )
    if main:
        (out_dir / "summary.md").write_text(summary_table(results))
    return results


def _label_efficiency(cfg: DictConfig, release: Release, init: str, accelerator: Accelerator) -> list[dict[str, Any]]:
    rows = []
    for budget in budgets(cfg.efficiency.fractions, cfg.efficiency.per_class):
        runs = [
            finetune_once(cfg, release, init, accelerator, seed=seed, budget=budget) for seed in cfg.efficiency.seeds
        ]
        metrics = [summary(r.test) for r in runs]
        rows.append(
            {
                "budget": budget_name(**budget),
                **budget,
                "n_train": int(np.median([r.n_train for r in runs])),
                "seeds": list(cfg.efficiency.seeds),
                "runs": metrics,
                "test": mean_std(metrics),
            }
        )
    return rows


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """One Markdown row per init with the test metrics of the best-on-val checkpoint."""
    lines = [
        "| init | dataset | best step | " + " | ".join(SUMMARY_KEYS) + " |",
        "|---|---|---|" + "---|" * len(SUMMARY_KEYS),
    ]
    for init, result in results.items():
        cells = [
            f"{result['summary'][k]:.4f}" if result["summary"].get(k) == result["summary"].get(k) else "-"
            for k in SUMMARY_KEYS
        ]
        lines.append(
            f"| {init} | `{result['dataset']}` | {result['settings']['best_step']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"
