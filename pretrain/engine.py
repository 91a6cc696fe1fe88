"""The training loop shared by every objective (cf. facebookresearch/mae ``engine_pretrain.py``).

One optimizer step: set lr / weight decay for the step -> ``grad_accum`` micro-steps of forward (autocast)
and backward (gradients synchronised on the last micro-step only, ``accelerator.accumulate``) -> if any
micro-step's loss or the gradient norm is non-finite on any process: drop the gradients and skip the
update -> else clip, method hook, ``optimizer.step()``, EMA update -> log / picture / checkpoint.
A skipped step still consumes its data and its step index (schedules and data position stay aligned);
``max_nonfinite_steps`` skips in a row stop the run without writing a checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import nn

from pretrain import distributed
from pretrain.data import EpochLoader
from pretrain.errors import Preempted, TrainingDiverged
from pretrain.monitor import Monitor, effective_rank, embedding_std
from pretrain.preemption import StopRequest
from pretrain.schedules import cosine_schedule


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


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (ndim <= 1), as MAE/DINO."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "wd_scale": 1.0},
        {"params": [p for p in params if p.ndim <= 1], "wd_scale": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.derived.lr, betas=tuple(cfg.optim.betas))


def train(
    *,
    cfg: DictConfig,
    accelerator: Accelerator,
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

    ``evaluate(exported_backbone) -> metrics`` runs on the main process every ``cfg.knn.every_steps``.
    ``stop``: when any process has received a stop signal, every process finishes the current optimizer
    step, the checkpoint of that step is saved and :class:`Preempted` is raised.
    """
    method = accelerator.unwrap_model(model)
    total, per_epoch, accum = cfg.derived.total_steps, cfg.derived.steps_per_epoch, cfg.train.grad_accum
    clip = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
    params = [p for p in model.parameters() if p.requires_grad]
    step, bad_in_row, window = start_step, 0, _Window()
    model.train()
    while step < total:
        epoch, done = divmod(step, per_epoch)
        finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
        for micro, batch in enumerate(loader.epoch(epoch, skip=done * accum)):
            views = [v.to(accelerator.device, non_blocking=True) for v in batch["views"]]
            if micro % accum == 0:  # before the step's first backward: DeepSpeed steps inside the last one
                for group in optimizer.param_groups:
                    group["lr"] = float(schedules.lr[step])  # python floats: checkpoints load weights_only
                    group["weight_decay"] = float(schedules.weight_decay[step]) * group["wd_scale"]
            with accelerator.accumulate(model):
                with distributed.autocast(accelerator, cfg):
                    out = model(views, step)
                loss = out["loss"]
                finite &= torch.isfinite(loss.detach())
                window.loss += loss.detach().float() / accum
                accelerator.backward(loss)
                if not accelerator.sync_gradients:
                    continue
                # DDP: the norm before clipping. DeepSpeed: it has clipped and stepped inside backward (or skipped a
                # non-finite step itself, norm inf); this is the norm it measured.
                norm = accelerator.clip_grad_norm_(params, clip)
                grad_norm = math.nan if norm is None else float(norm)  # None: DeepSpeed measured no norm
                # One collective per step carries both flags, so every rank takes the same decisions.
                stop_flag = float(stop is not None and stop.requested)
                flags = accelerator.reduce(torch.stack([finite.float(), finite.new_tensor(stop_flag).float()]), "sum")
                ok = bool(flags[0] == accelerator.num_processes)
                stop_now = bool(flags[1] > 0)
                # fp16: overflowing gradients are routine and the grad scaler skips those steps itself.
                ok = ok and (norm is None or math.isfinite(grad_norm) or accelerator.scaler is not None)
                if ok:
                    method.before_optimizer_step(step)  # no effect under DeepSpeed, which has stepped already
                else:  # every gradient None: AdamW moves no parameter and no moment (an fp16 scaler still updates)
                    optimizer.zero_grad(set_to_none=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ok:
                    with distributed.gathered_parameters(accelerator, model):  # ZeRO-3: whole student
                        method.update_momentum(step)
                    bad_in_row = 0
                else:
                    bad_in_row += 1
                    monitor.message(
                        f"step {step}: non-finite loss or gradient norm ({float(loss.detach()):.4g}, {float(grad_norm):.4g}); "
                        f"update skipped ({bad_in_row}/{cfg.train.max_nonfinite_steps} in a row)",
                        event="nonfinite_step_skipped", step=step, loss=float(loss.detach()), grad_norm=float(grad_norm),
                    )  # fmt: skip
                    if bad_in_row >= cfg.train.max_nonfinite_steps:
                        raise TrainingDiverged(
                            f"{bad_in_row} non-finite optimizer steps in a row (steps {step - bad_in_row + 1}-{step}): "
                            "stopped. The last checkpoint in the run directory predates them; lower optim.base_lr, "
                            "set optim.clip_grad or use train.precision=bf16 before resuming."
                        )
                step += 1
                finite.fill_(True)
                window.steps += 1
                window.grad_norm = grad_norm
                monitor.advance()
                if step % cfg.logging.every_steps == 0 or step == total:
                    _log(cfg, accelerator, monitor, window, out, step, schedules)
                    window = _Window()
                hooks_start = time.perf_counter()
                every = cfg.logging.figure_every_steps
                if every and step % every == 0 and accelerator.is_main_process:
                    for name, image in method.figures(views).items():
                        monitor.figure(step, name, image)
                every = cfg.knn.every_steps
                if evaluate is not None and every and step % every == 0 and accelerator.is_main_process:
                    monitor.log(step, evaluate(method.export_backbone()))
                if (step % cfg.checkpoint.every_steps == 0 or step == total or stop_now) and bad_in_row == 0:
                    save(step)
                if stop_now:
                    received = stop.received if stop is not None and stop.received else None
                    raise Preempted(step, received.name if received else "stop signal (another rank)")
                window.start += time.perf_counter() - hooks_start  # img/s counts training time only
            if step >= total:
                break
    return step


@dataclass
class _Window:
    """What accumulates between two log lines."""

    steps: int = 0
    loss: torch.Tensor | float = 0.0
    grad_norm: float = 0.0
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()


def _log(cfg, accelerator, monitor, window, out, step, schedules) -> None:
    # The reduce is a collective: every process comes here; only the main one writes.
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
    metrics.update({k: float(v) for k, v in out.items() if k not in ("loss", "embeddings") and v.ndim == 0})
    if "embeddings" in out and accelerator.is_main_process:
        metrics["embedding_std"] = embedding_std(out["embeddings"])
        metrics["effective_rank"] = effective_rank(out["embeddings"])
    monitor.log(step, metrics)
