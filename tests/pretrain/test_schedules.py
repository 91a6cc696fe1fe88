"""Step-indexed schedules: lengths, warm-up, end points; the engine's lr / weight-decay schedules from a config."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.config import derive, load_config
from pretrain.engine import Schedules
from pretrain.schedules import cosine_schedule, linear_warmup_schedule


def test_cosine_with_warmup():
    values = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4, warmup_start=0.0)
    assert len(values) == 10
    assert np.allclose(values[:4], [0.0, 0.25, 0.5, 0.75])  # linear, reaching base at the first decay step
    assert values[4] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert np.all(np.diff(values[4:]) <= 0)


def test_cosine_can_increase_momentum_to_one():
    values = cosine_schedule(0.996, 1.0, total_steps=50)
    assert values[0] == pytest.approx(0.996) and values[-1] == pytest.approx(1.0) and np.all(np.diff(values) >= 0)


def test_linear_warmup_then_constant():
    assert np.allclose(
        linear_warmup_schedule(0.04, 0.07, total_steps=5, warmup_steps=3), [0.04, 0.05, 0.06, 0.07, 0.07]
    )
    assert np.allclose(linear_warmup_schedule(0.04, 0.07, total_steps=2, warmup_steps=0), [0.07, 0.07])


def test_engine_schedules_follow_the_derived_config():
    overrides = ["data.spec=x", "train.run_dir=x", "train.batch_size=16", "optim.base_lr=1e-3", "optim.min_lr=1e-5",
                 "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "schedule.epochs=4", "schedule.warmup_epochs=1"]  # fmt: skip
    cfg = derive(load_config(None, overrides), world_size=1, dataset_size=160)  # 10 steps per epoch
    schedules = Schedules.from_config(cfg)
    assert len(schedules.lr) == len(schedules.weight_decay) == 40
    assert schedules.lr[10] == pytest.approx(1e-3 * 16 / 256) and schedules.lr[-1] == pytest.approx(1e-5)
    assert schedules.weight_decay[0] == pytest.approx(0.04) and schedules.weight_decay[-1] == pytest.approx(0.4)
