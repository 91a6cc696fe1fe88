"""The training step and loop shared by every objective (cf. facebookresearch/mae ``engine_pretrain.py``).

``train_step`` is one optimizer step, for pretraining and fine-tuning alike: set lr / weight decay for the step
-> ``grad_accum`` micro-steps of forward (autocast) and backward (gradients synchronised on the last micro-step
only, ``accelerator.accumulate``) -> if any micro-step's loss or the gradient norm is non-finite on any process:
drop the gradients and skip the update -> else clip, hook, ``optimizer.step()``, EMA update (not when an fp16
grad scaler skipped the step). It returns what happened (:class:`StepOutcome`); ``NonFiniteGuard`` stops a run
after ``max_nonfinite_steps`` skips in a row, without writing a checkpoint.

``train`` is pretraining's loop around it: logging, pictures, the kNN monitor, checkpoints and stop signals.
A skipped step still consumes its data and its step index (schedules and data position stay aligned).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain, islice
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from lightly.utils.lars import LARS
from omegaconf import DictConfig
from torch import nn

from medfm.pretrain.backends import TrainingBackend
from medfm.pretrain.config import OptimizerName
from medfm.pretrain.data import EpochLoader, ShardDamage
from medfm.pretrain.errors import ConfigError, Preempted, TrainingDiverged
from medfm.pretrain.monitor import Monitor, effective_rank, embedding_std
from medfm.pretrain.preemption import StopRequest
from medfm.pretrain.schedules import cosine_schedule


@dataclass
class Schedules:
    """Per optimizer step: ``lr[step]``, ``weight_decay[step]``."""

    lr: np.ndarray
    weight_decay: np.ndarray

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Schedules:
        d, o = cfg.derived, cfg.optim
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        return cls(
            lr=cosine_schedule(d.lr, o.min_lr, d.total_steps, d.warmup_steps),
            weight_decay=cosine_schedule(o.weight_decay, wd_end, d.total_steps),
        )


def build_optimizer(method: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """``optim.name`` over the method's parameter groups (``SSLMethod.param_groups``: ``lr_scale`` / ``wd_scale``
    per group, applied to the step's schedules by ``set_schedule``).

    adamw: ``torch.optim.AdamW`` with ``optim.betas``. lars: lightly's ``LARS`` with SimCLR's settings
    (google-research/simclr ``lars_optimizer.py``: momentum 0.9, trust coefficient 0.001). SimCLR excludes biases
    and batch-norm parameters from both the trust ratio and the decay; lightly's LARS excludes exactly the groups
    whose weight decay is 0, which are those ``param_groups`` gives ``wd_scale`` 0 (ndim <= 1). A scheduled
    weight decay of 0 would switch the trust ratio off for every group, so LARS needs one above 0 throughout.
    """
    groups, optim = method.param_groups(), cfg.optim
    if OptimizerName(optim.name) == OptimizerName.adamw:
        return torch.optim.AdamW(groups, lr=cfg.derived.lr, betas=tuple(optim.betas))
    for key in ("weight_decay", "weight_decay_end"):
        if optim[key] == 0:
            raise ConfigError(
                f"config key 'optim.{key}': LARS needs a weight decay above 0 (lightly's LARS adapts only the "
                "parameters that are decayed); SimCLR uses 1e-6"
            )
    return LARS(groups, lr=cfg.derived.lr, momentum=0.9, trust_coefficient=0.001)


class StepHooks(Protocol):
    """What an objective may do around the update (``SSLMethod`` implements both)."""

    def before_optimizer_step(self, step: int) -> None: ...

    def update_momentum(self, step: int) -> None: ...


@dataclass
class Optimization:
    """What every optimizer step uses: the prepared model and optimizer, clipping, the backend (precision, EMA
    gathering) and the hooks."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    clip_grad: float = 0.0  # max global grad norm; 0: no clipping (the norm is still measured)
    backend: TrainingBackend | None = None  # default: the plain / DDP backend of the accelerator
    hooks: StepHooks | None = None

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = self.clip_grad if self.clip_grad > 0 else math.inf
        if self.backend is None:
            self.backend = TrainingBackend(self.accelerator)


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    loss: torch.Tensor  # mean loss over the micro-steps, this process, detached (no host sync)
    grad_norm: float  # before clipping; nan when DeepSpeed measured none
    ok: bool  # every micro-step's loss and the gradient norm were finite on every process
    updated: bool  # the parameters (and the EMA modules) moved: ok and not skipped by an fp16 grad scaler
    stop: bool  # some process has received a stop signal
    out: dict[str, torch.Tensor]  # the last micro-step's forward outputs (scalars to log, embeddings)
    batch: Any  # the last micro-batch, as the loader gave it (figures)


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None) -> None:
    """lr (x the group's ``lr_scale``: layer-wise decay) and weight decay (x ``wd_scale``; None: the group's own)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr) * group.get("lr_scale", 1.0)  # python floats: checkpoints load weights_only
        if weight_decay is not None:
            group["weight_decay"] = float(weight_decay) * group.get("wd_scale", 1.0)


def train_step(
    opt: Optimization,
    step: int,
    micro_batches: Iterable[Any],
    forward: Callable[[Any], dict[str, torch.Tensor]],
    *,
    lr: float,
    weight_decay: float | None = None,
    stop_requested: bool = False,
) -> StepOutcome:
    """One optimizer step over ``micro_batches`` (``forward(batch) -> {"loss", ...}`` each).

    Schedules -> micro-steps (forward under autocast, backward; gradients synchronised on the last one only) ->
    one collective carrying the finite flag and the stop flag (every process decides alike) -> clip, hook,
    ``optimizer.step()`` or, when not finite, drop the gradients -> EMA update when the parameters moved.

    One host synchronisation per step: the flags and the gradient norm come to the host together; every other
    value (the loss, the outputs) stays on the device.
    """
    accelerator, model, optimizer, backend = opt.accelerator, opt.model, opt.optimizer, opt.backend
    set_schedule(optimizer, lr, weight_decay)  # before the first backward: DeepSpeed steps inside the last one
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    total, count = finite.new_zeros((), dtype=torch.float32), 0
    for batch in micro_batches:
        with accelerator.accumulate(model):  # DDP: no gradient sync before the last micro-step
            with backend.autocast():
                out = forward(batch)
            loss = out["loss"]
            finite &= torch.isfinite(loss.detach())
            total += loss.detach().float()
            count += 1
            accelerator.backward(loss)
    # DDP: the norm before clipping. DeepSpeed has clipped and stepped inside backward (or skipped a non-finite
    # step itself, norm inf); this is the norm it measured (None: none measured).
    norm = accelerator.clip_grad_norm_(opt.params, opt.clip)
    # new_full fills on the device (new_tensor of a Python number would be a blocking host-to-device copy).
    stop_flag = finite.new_full((), float(stop_requested), dtype=torch.float32)
    flags = accelerator.reduce(torch.stack([finite.float(), stop_flag]), "sum")
    # The step's one host sync: both flags and the norm together (a tensor under DDP; DeepSpeed gives a float or
    # None, already on the host).
    if torch.is_tensor(norm):
        finite_count, stops, grad_norm = torch.cat([flags, norm.detach().float().reshape(1)]).tolist()
    else:
        (finite_count, stops), grad_norm = flags.tolist(), math.nan if norm is None else float(norm)
    # fp16: overflowing gradients are routine and the grad scaler skips those steps itself.
    ok = finite_count == accelerator.num_processes
    ok = ok and (norm is None or math.isfinite(grad_norm) or accelerator.scaler is not None)
    if ok and opt.hooks is not None:
        opt.hooks.before_optimizer_step(step)  # no effect under DeepSpeed, which has stepped already
    if not ok:  # every gradient None: AdamW moves no parameter and no moment (an fp16 scaler still updates)
        optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    updated = ok and not accelerator.optimizer_step_was_skipped
    if updated and opt.hooks is not None:
        with backend.gathered(model):  # ZeRO-3: the whole student
            opt.hooks.update_momentum(step)
    return StepOutcome(total / max(1, count), grad_norm, ok, updated, stops > 0, out, batch)


class NonFiniteGuard:
    """Counts skipped (non-finite) steps in a row; ``limit`` of them raise :class:`TrainingDiverged`."""

    def __init__(self, limit: int, report: Callable[..., None] | None = None):
        self.limit, self.report, self.in_a_row = limit, report, 0

    def check(self, step: int, outcome: StepOutcome) -> None:
        if outcome.ok:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        loss = float(outcome.loss)
        if self.report is not None:
            self.report(
                f"step {step}: non-finite loss or gradient norm ({loss:.4g}, {outcome.grad_norm:.4g}); "
                f"update skipped ({self.in_a_row}/{self.limit} in a row)",
                event="nonfinite_step_skipped",
                step=step,
                loss=loss,
                grad_norm=outcome.grad_norm,
            )
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.in_a_row} non-finite optimizer steps in a row (steps {step - self.in_a_row + 1}-{step}): "
                "stopped. The last checkpoint in the run directory predates them; lower the learning rate, "
                "set clip_grad or use bf16 precision before resuming."
            )


def optimizer_steps(batches: Iterator[Any], accum: int) -> Iterator[Iterator[Any]]:
    """Group a stream of micro-batches by optimizer step, lazily (never ``accum`` batches held at once)."""
    for first in batches:
        yield chain([first], islice(batches, accum - 1))


def train(
    *,
    cfg: DictConfig,
    accelerator: Accelerator,
    backend: TrainingBackend,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: EpochLoader,
    schedules: Schedules,
    monitor: Monitor,
    save: Callable[[int], None],
    start_step: int,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    stop: StopRequest | None = None,
) -> int:
    """Train from ``start_step`` to ``cfg.derived.total_steps``; returns the final step.

    ``evaluate(exported_backbone) -> metrics`` runs on the main process every ``cfg.knn.every_steps``; it and the
    method's figures run under ``backend.inference()`` (the step's precision, no gradients).
    ``stop``: when any process has received a stop signal, every process finishes the current optimizer
    step, the checkpoint of that step is saved (unless the step was skipped) and :class:`Preempted` is raised.
    """
    method = accelerator.unwrap_model(model)
    total, per_epoch, accum = cfg.derived.total_steps, cfg.derived.steps_per_epoch, cfg.train.grad_accum
    opt = Optimization(accelerator, model, optimizer, cfg.optim.clip_grad, backend, hooks=method)
    guard, window, step = NonFiniteGuard(cfg.train.max_nonfinite_steps, monitor.message), _Window(), start_step
    damage = getattr(loader, "damage", None)  # what a shard stream leaves out (medfm.pretrain.data.ShardDamage)
    if damage is not None:
        damage.report = partial(_warn_damage, accelerator, monitor, damage)
    context = LoopContext(cfg, accelerator, backend, method, monitor, schedules, damage, evaluate)
    model.train()
    while step < total:
        epoch, done = divmod(step, per_epoch)
        for micro_batches in optimizer_steps(loader.epoch(epoch, skip=done * accum), accum):
            forward = partial(_views_forward, model, backend, step)
            outcome = train_step(
                opt,
                step,
                micro_batches,
                forward,
                lr=schedules.lr[step],
                weight_decay=schedules.weight_decay[step],
                stop_requested=stop is not None and stop.requested,
            )
            guard.check(step, outcome)
            step += 1
            window.add(outcome)
            monitor.advance()
            hooks_start = time.perf_counter()
            logged = step % cfg.logging.every_steps == 0 or step == total
            if logged:
                _log(context, window, outcome.out, step)
            _after_step(context, outcome, step)
            if (step % cfg.checkpoint.every_steps == 0 or step == total or outcome.stop) and guard.in_a_row == 0:
                save(step)
            if outcome.stop:
                received = stop.received if stop is not None and stop.received else None
                name = received.name if received else "stop signal (another rank)"
                raise Preempted(step, name, checkpointed=guard.in_a_row == 0)
            # img/s counts training time only: a new window starts after this step's hooks, an open one skips them
            window = _Window() if logged else window.skip(time.perf_counter() - hooks_start)
            if step >= total:
                break
    return step


def _views_forward(
    model: nn.Module, backend: TrainingBackend, step: int, batch: dict[str, Any]
) -> dict[str, torch.Tensor]:
    return model([backend.to_device(v) for v in batch["views"]], step)


@dataclass(frozen=True)
class LoopContext:
    """What the loop's hooks after each optimizer step (the log line, pictures, the kNN monitor) read: one run's."""

    cfg: DictConfig
    accelerator: Accelerator
    backend: TrainingBackend
    method: nn.Module  # unwrapped: its figures and exported backbone
    monitor: Monitor
    schedules: Schedules
    damage: ShardDamage | None  # what a shard stream left out so far (None: not streaming shards)
    evaluate: Callable[[nn.Module], dict[str, float]] | None  # the kNN monitor on the exported backbone


def _after_step(context: LoopContext, outcome: StepOutcome, step: int) -> None:
    """Pictures and the kNN monitor, on the main process, at their cadences, in the backend's inference context
    (under DeepSpeed bf16 the parameters are bf16: an fp32 forward would fail on a dtype mismatch)."""
    cfg, backend, method, monitor, evaluate = (
        context.cfg,
        context.backend,
        context.method,
        context.monitor,
        context.evaluate,
    )
    if not backend.accelerator.is_main_process:
        return
    every = cfg.logging.figure_every_steps
    if every and step % every == 0:
        views = [backend.to_device(v) for v in outcome.batch["views"]]
        with backend.inference():
            figures = method.figures(views)
        for name, image in figures.items():
            monitor.figure(step, name, image.float())
    every = cfg.knn.every_steps
    if evaluate is not None and every and step % every == 0:
        with backend.inference():
            metrics = evaluate(method.export_backbone())
        monitor.log(step, metrics)


@dataclass
class _Window:
    """What accumulates between two log lines."""

    steps: int = 0
    loss: torch.Tensor | float = 0.0
    grad_norm: float = 0.0
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def add(self, outcome: StepOutcome) -> None:
        self.steps += 1
        self.loss += outcome.loss
        self.grad_norm = outcome.grad_norm

    def skip(self, seconds: float) -> _Window:
        """Leave ``seconds`` (logging, pictures, checkpoints) out of the window's elapsed time."""
        self.start += seconds
        return self


def _warn_damage(accelerator, monitor, damage, reason: str) -> None:
    """A warning line and event for a shard or sample the shard stream left out (rank 0 writes the event; other
    ranks print their own finds, which rank 0 may meet later)."""
    text = (
        f"left out of training: {reason} ({damage.shards} damaged shard(s), {damage.samples} rejected sample(s) so far)"
    )
    if accelerator.is_main_process:
        counts = {"shards_damaged": damage.shards, "samples_rejected": damage.samples}
        monitor.message(f"warning: {text}", event="warning", message=text, **counts)
    else:
        print(f"rank {accelerator.process_index}: warning: {text}", file=sys.stderr)


def _log(context: LoopContext, window: _Window, out: dict[str, torch.Tensor], step: int) -> None:
    """The log line of the steps in ``window``: a collective (the loss is averaged over processes), every process
    comes here; only the main one writes."""
    cfg, accelerator, schedules, damage = context.cfg, context.accelerator, context.schedules, context.damage
    loss = accelerator.reduce(torch.as_tensor(window.loss, device=accelerator.device).float(), "mean")
    elapsed = time.perf_counter() - window.start
    metrics = {
        "epoch": step / cfg.derived.steps_per_epoch,
        "loss": float(loss) / max(1, window.steps),
        "lr": float(schedules.lr[step - 1]),
        "weight_decay": float(schedules.weight_decay[step - 1]),
        "grad_norm": window.grad_norm,
        "img_s": window.steps * cfg.derived.global_batch / max(elapsed, 1e-9),
    }
    if damage is not None:  # this rank's counts (every rank draws from every shard)
        metrics.update(shards_damaged=damage.shards, samples_rejected=damage.samples)
    metrics.update({k: float(v) for k, v in out.items() if k not in ("loss", "embeddings") and v.ndim == 0})
    if "embeddings" in out and accelerator.is_main_process:
        metrics["embedding_std"] = embedding_std(out["embeddings"])
        metrics["effective_rank"] = effective_rank(out["embeddings"])
    context.monitor.log(step, metrics)
