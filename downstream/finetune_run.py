"""One fine-tuning run (``finetune_once``): a released (or random-init) backbone trained on a labeled task.

Recipe after MAE / BEiT fine-tuning: AdamW with layer-wise lr decay (timm's ``param_groups_layer_decay``), drop
path, linear warm-up + cosine lr per optimizer step, label smoothing (single-label) or BCE (multi-label), class
weights for imbalance, and the stem + first K blocks / stages frozen (``train.freeze_blocks``; their BatchNorm
statistics frozen too). The checkpoint with the best val metric is kept and evaluated once on test. Same
Accelerate setup as pretraining (devices, processes, mixed precision). The grid over inits, label budgets, seeds
and corrupted test copies is ``medfm.downstream.finetune``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from medfm.downstream.data import EvalTransform, Task, checked_task, class_names_of, open_split, split_labels
from medfm.downstream.efficiency import label_subset
from medfm.downstream.features import collate, dataset_features
from medfm.downstream.linear import class_weight_tensor, loss_function, select_linear_probe
from medfm.downstream.load import Release, load_for_init
from medfm.downstream.metrics import SUMMARY_KEYS, classification_metrics
from medfm.pretrain.checkpoint import TorchStore, config_changes, gather_rng, restore_rng
from medfm.pretrain.config import to_dict
from medfm.pretrain.data import EpochLoader
from medfm.pretrain.engine import NonFiniteGuard, Optimization, optimizer_steps, train_step
from medfm.pretrain.errors import ConfigError, InputError
from medfm.pretrain.monitor import strict_json
from medfm.pretrain.schedules import cosine_schedule, derive_steps
from medfm.pretrain.transforms import MedicalAugment, augment_from_section, scale_blur_sigma


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
        if not hasattr(model, "group_matcher"):
            raise ConfigError(
                f"config key 'train.freeze_blocks': {type(model).__name__} has no timm group_matcher to count blocks by; use 0 or -1"
            )
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


def derive(train: DictConfig, world_size: int, train_samples: int) -> dict[str, Any]:
    """Pretraining's ``derive_steps`` (global batch, linearly scaled peak lr, step counts) plus the eval cadence.
    An epoch is at least one global batch: a small label budget is drawn again within the epoch."""
    derived = derive_steps(
        batch_size=train.batch_size,
        world_size=world_size,
        grad_accum=1,
        samples=max(train_samples, train.batch_size * world_size),
        base_lr=train.lr,
        epochs=train.epochs,
        warmup_epochs=train.warmup_epochs,
        max_steps=train.max_steps,
    )
    return {**derived, "eval_every_steps": max(1, round(train.eval_every_epochs * derived["steps_per_epoch"]))}


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, task: Task, accelerator: Accelerator
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) over a prepared loader, gathered from every process (padding dropped); no autograd graph
    (the prepared model runs in the run's precision: Accelerate wraps its forward in autocast)."""
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


def finetune_augment(cfg: DictConfig, size: int, mean: Sequence[float], std: Sequence[float]) -> MedicalAugment:
    """The training images' augmentation (``cfg.augment``), blur sigma given at 224 px as pretraining's."""
    sigma = scale_blur_sigma(cfg.augment.blur_sigma, size)
    return augment_from_section(cfg.augment, size, mean, std, blur_sigma=sigma)


@dataclass
class TaskData:
    """A run's labeled splits: the training set (untransformed: the loader augments each sample with its own seed,
    so a resumed run reproduces its batches; a label budget's subset), val / test with the eval transform."""

    train: Dataset
    evaluation: dict[str, Dataset]  # "val", "test"
    task: Task
    train_labels: Tensor  # of ``train``, in its order
    split_args: dict[str, Any]  # how the splits were cut (``open_split``'s arguments)


def task_data(
    cfg: DictConfig, transform: EvalTransform, channels: int, *, seed: int, budget: dict[str, Any] | None
) -> TaskData:
    """The splits of ``cfg.data.spec`` and the task their labels define; ``budget``: a seeded label subset."""
    d = cfg.data
    split_args = {
        "channels": channels,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "seed": d.split_seed,
    }
    train_set: Dataset = open_split(d.spec, "train", None, **split_args)
    eval_sets = {s: open_split(d.spec, s, transform, **split_args) for s in ("val", "test")}
    labels = split_labels(train_set)
    if labels is None:
        raise InputError(f"{d.spec}: fine-tuning needs an indexable dataset (stream a shard set into a file first)")
    by_split = {"train": labels, **{s: split_labels(ds) or [] for s, ds in eval_sets.items()}}
    task = checked_task(d.spec, by_split, class_names_of(d.spec))
    label_tensor = torch.tensor(np.asarray(labels, dtype=np.float32 if task.multilabel else np.int64))
    if budget:
        train_set = Subset(train_set, label_subset(label_tensor, seed=seed, **budget).tolist())
        label_tensor = label_tensor[torch.tensor(train_set.indices)]
    return TaskData(train_set, eval_sets, task, label_tensor, split_args)


def finetune_once(
    cfg: DictConfig,
    release: Release,
    init: str,
    accelerator: Accelerator,
    *,
    seed: int,
    budget: dict[str, Any] | None = None,
    log_path: Path | None = None,
    checkpoint_dir: Path | None = None,
    baseline: Release | None = None,
) -> FinetuneRun:
    """Train one model with the recipe in ``cfg.train``; the best val checkpoint is evaluated once on test."""
    t = cfg.train
    torch.manual_seed(seed)
    model, _ = load_for_init(
        release,
        init,
        baseline,
        img_size=cfg.backbone.img_size,
        in_chans=cfg.backbone.in_chans,
        drop_path_rate=t.drop_path,
    )
    input_cfg = model.pretrained_cfg
    size, mean, std = input_cfg["input_size"][-1], input_cfg["mean"], input_cfg["std"]
    channels = input_cfg["input_size"][0]
    d = cfg.data
    data = task_data(cfg, EvalTransform(size, mean, std), channels, seed=seed, budget=budget)
    train_set, eval_sets, task, label_tensor, split_args = (
        data.train,
        data.evaluation,
        data.task,
        data.train_labels,
        data.split_args,
    )

    model.reset_classifier(task.num_outputs)
    # LP-FT starts from features worth probing: random init keeps timm's head init (a probe fitted on random
    # features is no starting point: on PneumoniaMNIST it cut random init's 100 % fine-tune from 0.939 to 0.81 AUC)
    head_init = t.head_init if init != "random" else "new"
    if head_init == "linear_probe":
        probe_train = open_split(d.spec, "train", EvalTransform(size, mean, std), **split_args)
        if isinstance(train_set, Subset):
            probe_train = Subset(probe_train, train_set.indices)
        note = init_head_from_probe(
            model,
            probe_train,
            eval_sets["val"],
            task,
            metric=cfg.selection_metric,
            class_weights=t.class_weights,
            batch_size=d.batch_size,
            device=accelerator.device,
        )
        accelerator.print(f"finetune ({init}, seed {seed}): head from the linear probe ({note})")
    frozen = freeze_blocks(model, t.freeze_blocks)
    optimizer = torch.optim.AdamW(optimizer_groups(model, t.weight_decay, t.layer_decay), betas=(0.9, 0.999))
    world = accelerator.num_processes
    weights = class_weight_tensor(label_tensor, task) if t.class_weights else None
    criterion = loss_function(task, weights, label_smoothing=t.label_smoothing)
    derived = {**derive(t, world, len(train_set)), "head_init": head_init}
    augment = finetune_augment(cfg, size, mean, std)
    train_loader = EpochLoader(
        train_set,
        lambda image: [augment(image)],
        batch_size=t.batch_size,
        batches_per_epoch=derived["steps_per_epoch"],
        in_chans=channels,
        seed=seed,
        num_workers=d.num_workers,
        rank=accelerator.process_index,
        world_size=world,
        pin_memory=accelerator.device.type == "cuda",
    )
    loaders = {
        s: DataLoader(ds, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate)
        for s, ds in eval_sets.items()
    }
    model, optimizer, val_loader, test_loader = accelerator.prepare(model, optimizer, loaders["val"], loaders["test"])
    criterion = criterion.to(accelerator.device)
    schedule = cosine_schedule(derived["lr"], t.min_lr, derived["total_steps"], derived["warmup_steps"])

    accelerator.print(
        f"finetune ({init}, seed {seed}, {len(train_set)} training images): "
        + ", ".join(f"{k}={v}" for k, v in derived.items())
    )
    opt = Optimization(accelerator, model, optimizer, clip_grad=t.clip_grad)
    store = None if checkpoint_dir is None else TorchStore(accelerator, checkpoint_dir, 1, model, optimizer)
    best = train_loop(
        opt, criterion, train_loader, val_loader, schedule, task, store=store, config=to_dict(cfg),
        eval_every=derived["eval_every_steps"], metric=cfg.selection_metric, log_path=log_path,
    )  # fmt: skip
    best_state, best_step, best_val, history = best.state, best.step, best.val, best.history
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


def init_head_from_probe(
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    task: Task,
    *,
    metric: str,
    class_weights: bool,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> str:
    """Set ``model``'s classifier to the linear probe fitted on its frozen pre-logits features of ``train`` (weight
    decay chosen on ``val`` by ``metric``), folding the probe's standardisation into the layer. Returns a note."""
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear) or classifier.out_features != task.num_outputs or classifier.bias is None:
        raise ConfigError(
            f"train.head_init=linear_probe: the model's classifier is {type(classifier).__name__}, "
            f"not one linear layer with {task.num_outputs} outputs and a bias; use train.head_init=new"
        )
    train_features = dataset_features(model, train, batch_size=batch_size, pooling="head", device=device)
    val_features = dataset_features(model, val, batch_size=batch_size, pooling="head", device=device)
    selection = select_linear_probe(
        (train_features.features, train_features.labels),
        (val_features.features, val_features.labels),
        task,
        metric=metric,
        class_weights=class_weights,
    )
    probe = selection.probe
    with torch.no_grad():  # W ((x - mean) / std) + b  =  (W / std) x + (b - (W / std) mean)
        weight = (probe.linear.weight / probe.std).to(classifier.weight)
        classifier.weight.copy_(weight)
        classifier.bias.copy_(probe.linear.bias.to(weight) - weight @ probe.mean.to(weight))
    return f"weight decay {selection.weight_decay:g}, val {metric} {selection.val_metric:.3f}"


@dataclass
class Best:
    """The best-on-val checkpoint so far and the history of evaluations (what a fine-tuning checkpoint adds)."""

    state: dict[str, Tensor] | None = None
    step: int = 0
    value: float = -math.inf
    val: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_meta(self) -> dict[str, Any]:
        plain = json.loads(
            json.dumps(
                {"step": self.step, "value": self.value, "val": self.val, "history": self.history}, default=_plain
            )
        )
        return {"best_state": self.state, "best": plain}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Best:
        return cls(state=meta["best_state"], **meta["best"])


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def train_loop(
    opt: Optimization,
    criterion: nn.Module,
    loader: EpochLoader,
    val_loader: DataLoader,
    schedule: np.ndarray,
    task: Task,
    *,
    eval_every: int,
    metric: str,
    log_path: Path | None,
    store: TorchStore | None = None,
    config: dict[str, Any] | None = None,
) -> Best:
    """``len(schedule)`` optimizer steps of pretraining's ``train_step``; val every ``eval_every`` steps and at
    the end, each evaluation checkpointed in ``store`` (best state, history, RNG) so that a killed run resumes
    there. Returns the best state (by ``metric`` on val), its step, its val metrics and the evaluations."""
    accelerator, model = opt.accelerator, opt.model
    step, best, total = 0, Best(), len(schedule)
    found = store.load_latest() if store is not None else None
    if found is not None:
        latest, meta, notes = found
        for note in notes:
            accelerator.print(f"warning: {note}")
        step, best = meta["step"], Best.from_meta(meta)
        if len(meta["rng"]) == accelerator.num_processes:
            restore_rng(meta["rng"][accelerator.process_index])
        for note in config_changes(meta["config"], config or {}):
            accelerator.print(f"warning: {note}")
        accelerator.print(f"resumed from {latest} at step {step}")
    guard, losses = NonFiniteGuard(1), []  # a non-finite fine-tuning loss stops at once

    def forward(batch: dict[str, Any]) -> dict[str, Tensor]:
        target = batch["label"].to(accelerator.device)
        logits = model(batch["views"][0].to(accelerator.device, non_blocking=True))
        return {"loss": criterion(logits.float(), target.float() if task.multilabel else target)}

    while step < total:
        model.train()
        freeze_norm_statistics(model)
        epoch, done = divmod(step, loader.batches_per_epoch)
        for micro_batches in optimizer_steps(loader.epoch(epoch, skip=done), 1):
            outcome = train_step(opt, step, micro_batches, forward, lr=schedule[step])
            guard.check(step, outcome)
            losses.append(outcome.loss)
            step += 1
            if step % eval_every == 0 or step == total:
                _evaluate(opt, val_loader, task, best, step, float(schedule[step - 1]), losses, metric, log_path)
                losses = []
                if store is not None:
                    store.save(step, {"rng": gather_rng(), "config": config or {}, **best.to_meta()})
            if step >= total:
                break
    return best


def _evaluate(opt, val_loader, task, best: Best, step: int, lr: float, losses, metric: str, log_path) -> None:
    accelerator, model = opt.accelerator, opt.model
    train_loss = accelerator.reduce(torch.stack(losses).mean(), "mean") if losses else torch.tensor(math.nan)
    val = classification_metrics(task, *predict(model, val_loader, task, accelerator))
    record = {"step": step, "lr": lr, "train_loss": float(train_loss), **{f"val_{k}": val[k] for k in SUMMARY_KEYS}}
    best.history.append(record)
    if log_path is not None and accelerator.is_main_process:  # whole: a resumed run's history included
        log_path.write_text("".join(strict_json(r) + "\n" for r in best.history))  # a NaN loss: null, still JSON
    value = _metric(val, metric)
    if value > best.value or best.state is None:
        best.value, best.step, best.val = value, step, val
        best.state = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
    model.train()
    freeze_norm_statistics(model)
