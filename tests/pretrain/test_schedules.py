"""Step-indexed schedules: lengths, warm-up, end points; the engine's lr / weight-decay schedules from a config."""

from __future__ import annotations

import numpy as np
import pytest

from medfm.pretrain.config import derive, load_config
from medfm.pretrain.engine import Schedules
from medfm.pretrain.schedules import cosine_schedule, linear_warmup_schedule


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


@pytest.mark.parametrize(("batch", "world"), [(64, 1), (48, 1), (128, 1), (256, 4), (1024, 1), (64, 32)])
def test_each_objective_scales_its_lr_by_its_reference_rule(batch, world):
    """DINOv2: ``base_lr x sqrt(B / 1024)`` (dinov2 ``utils/config.py``, ``scaling_rule: sqrt_wrt_1024``); MAE,
    DINO, MoCo v3, SimCLR: ``base_lr x B / 256`` (their papers' linear rule)."""
    global_batch = batch * world
    for method in ("mae", "dino", "moco", "simclr", "dinov2"):
        overrides = [
            f"method={method}",
            "data.spec=medmnist:x.npz",
            "train.run_dir=runs/x",
            f"train.batch_size={batch}",
            "optim.base_lr=0.004",
        ]
        derived = derive(load_config(None, overrides), world_size=world, dataset_size=10**6).derived
        reference = 0.004 * (global_batch / 1024) ** 0.5 if method == "dinov2" else 0.004 * global_batch / 256
        assert derived.lr == pytest.approx(reference, rel=1e-12), method
        assert derived.lr_scaling == ("sqrt x (batch / 1024)" if method == "dinov2" else "linear x batch / 256")


def test_the_dinov2_recipes_give_the_reference_lr_at_their_batch():
    """The recipes' one-GPU lr is DINOv2's (ViT-S at 64: 1e-3; ViT-B at 48: 8.7e-4), not the 8-15x lower linear one."""
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
    for name, batch in (("dinov2_vit_s14_224", 64), ("dinov2_vit_b14_224", 48), ("dinov2_vit_s14_reg4_224", 64)):
        cfg = load_config(recipes / f"{name}.yaml", ["data.spec=medmnist:x.npz"])
        assert cfg.train.batch_size == batch
        lr = derive(cfg, world_size=1, dataset_size=10**6).derived.lr
        assert lr == pytest.approx(0.004 * (batch / 1024) ** 0.5, rel=1e-9), name
