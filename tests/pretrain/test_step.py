"""The one training step (pretraining and fine-tuning): finite handling, EMA only after a real update, the
fp16 loss scale in the checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from medfm.pretrain.checkpoint import TorchStore
from medfm.pretrain.engine import NonFiniteGuard, Optimization, optimizer_steps, set_schedule, train_step
from medfm.pretrain.errors import TrainingDiverged


class Hooks:
    def __init__(self):
        self.before, self.momentum = [], []

    def before_optimizer_step(self, step: int) -> None:
        self.before.append(step)

    def update_momentum(self, step: int) -> None:
        self.momentum.append(step)


def setup(hooks: Hooks):
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD([{"params": model.parameters(), "lr_scale": 0.5, "wd_scale": 0.0}], lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Optimization(accelerator, model, optimizer, clip_grad=1.0, hooks=hooks)


def forward_of(opt: Optimization, scale: float):
    return lambda batch: {"loss": opt.model(batch).pow(2).mean() * scale}


def test_a_finite_step_updates_then_runs_the_ema_hook():
    hooks = Hooks()
    opt = setup(hooks)
    before = [p.detach().clone() for p in opt.model.parameters()]
    outcome = train_step(opt, 7, [torch.ones(4, 3)], forward_of(opt, 1.0), lr=0.2, weight_decay=0.1)
    assert outcome.ok and outcome.updated and not outcome.stop
    assert hooks.before == [7] and hooks.momentum == [7]
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # lr x lr_scale (layer-wise decay)
    assert opt.optimizer.param_groups[0]["weight_decay"] == 0.0  # weight decay x wd_scale
    assert any(not torch.equal(a, b) for a, b in zip(before, opt.model.parameters(), strict=True))


def test_a_non_finite_step_moves_nothing_and_the_guard_stops_after_the_limit():
    hooks = Hooks()
    opt = setup(hooks)
    before = [p.detach().clone() for p in opt.model.parameters()]
    guard = NonFiniteGuard(2)
    outcome = train_step(opt, 0, [torch.ones(4, 3)], forward_of(opt, float("nan")), lr=0.2)
    assert not outcome.ok and not outcome.updated and hooks.momentum == [] and hooks.before == []
    assert all(torch.equal(a, b) for a, b in zip(before, opt.model.parameters(), strict=True))
    guard.check(0, outcome)  # 1 of 2
    with pytest.raises(TrainingDiverged, match="2 non-finite optimizer steps in a row"):
        guard.check(1, outcome)


def test_no_ema_update_on_a_step_the_grad_scaler_skipped(monkeypatch):
    hooks = Hooks()
    opt = setup(hooks)
    # What an fp16 GradScaler reports after an overflow: the optimizer step did not happen.
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    outcome = train_step(opt, 3, [torch.ones(4, 3)], forward_of(opt, 1.0), lr=0.2)
    assert outcome.ok and not outcome.updated
    assert hooks.before == [3] and hooks.momentum == []


def test_micro_batches_are_grouped_lazily_by_optimizer_step():
    pulled = []

    def batches():
        for i in range(5):
            pulled.append(i)
            yield i

    groups = optimizer_steps(batches(), 2)
    first = next(groups)
    assert pulled == [0]  # nothing read ahead of the step that uses it
    assert list(first) == [0, 1]
    assert [list(g) for g in groups] == [[2, 3], [4]]


def test_set_schedule_keeps_a_group_weight_decay_when_none_is_scheduled():
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "weight_decay": 0.05}])
    set_schedule(optimizer, 1e-3, None)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[0]["lr"] == 1e-3


def test_the_fp16_loss_scale_travels_with_the_checkpoint(tmp_path):
    def store(scale: float) -> TorchStore:
        model = nn.Linear(2, 1)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        accelerator = SimpleNamespace(
            is_main_process=True,
            num_processes=1,
            scaler=scaler,
            unwrap_model=lambda m: m,
            wait_for_everyone=lambda: None,
        )
        return TorchStore(accelerator, tmp_path, 1, model, torch.optim.SGD(model.parameters(), lr=0.1))

    saved = store(1024.0)
    saved.accelerator.scaler.scale(torch.ones(()))  # the scale tensor exists once a loss was scaled
    saved.accelerator.scaler.update(512.0)  # a run that backed off once
    saved.save(5, {"rng": [], "config": {}})
    resumed = store(65536.0)
    assert resumed.load(resumed.latest())["step"] == 5
    assert resumed.accelerator.scaler.get_scale() == 512.0
