"""``auto`` teacher settings of DINO / DINOv2 (medfm.pretrain.methods.auto_settings): LightlyTrain's data-size rules,
DINO's small-batch momentum, chosen in ``derive``, recorded, and kept on resume."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from medfm.pretrain.config import derive, load_config
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.main import pretrain
from medfm.pretrain.methods.auto_settings import prototypes, teacher_momentum, teacher_temperatures, warmup_epochs


@pytest.mark.parametrize(
    ("images", "expected"),
    [(546, 1024), (19_999, 1024), (20_000, 2048), (49_999, 2048), (99_999, 4096), (150_000, 16_384),
     (499_999, 32_768), (500_000, 65_536), (14_000_000, 65_536)],
)  # fmt: skip
def test_prototypes_follow_lighttrains_buckets(images, expected):
    assert prototypes(images) == expected


def test_teacher_temperatures_are_linear_in_the_image_count_between_20k_and_1m():
    assert teacher_temperatures(4_708) == pytest.approx((0.02, 0.02))  # small data: the low end, clamped
    assert teacher_temperatures(20_000) == pytest.approx((0.02, 0.02))
    assert teacher_temperatures(510_000) == pytest.approx((0.03, 0.045))  # halfway
    assert teacher_temperatures(1_000_000) == pytest.approx((0.04, 0.07))  # the references' ImageNet values
    assert teacher_temperatures(5_000_000) == pytest.approx((0.04, 0.07))
    assert warmup_epochs(100) == 30 and warmup_epochs(20) == pytest.approx(6.0)


def test_teacher_momentum_follows_data_size_batch_and_run_length():
    long_run = 10**6
    assert teacher_momentum(1_000_000, 1024, long_run) == pytest.approx(0.996)
    assert teacher_momentum(4_708, 1024, long_run) == pytest.approx(0.99)
    # DINO's advice for small batches: the EMA averages as many images as at 1024 (0.996 -> ~0.999 at 256)
    assert teacher_momentum(1_000_000, 256, long_run) == pytest.approx(0.996**0.25, abs=1e-6)
    # ... but never more than a tenth of the run: 720 steps -> an EMA over 72 steps
    assert teacher_momentum(4_708, 128, 720) == pytest.approx(1 - 1 / 72, abs=1e-6)


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_derive_resolves_auto_values_and_records_them(method, tiny, tmp_path):
    auto = {f"{method}.{key}": "auto" for key in ("head_output_dim", "warmup_teacher_temp_epochs")}
    cfg = load_config(None, tiny(method, tmp_path, **auto))
    assert cfg[method].teacher_temp == "auto"
    derive(cfg, world_size=1, dataset_size=4_708)
    section = cfg[method]
    assert section.head_output_dim == 1024 and section.teacher_temp == section.warmup_teacher_temp == 0.02
    assert section.warmup_teacher_temp_epochs == pytest.approx(0.3) and 0 < section.momentum_teacher < 1
    assert f"{method}.head_output_dim=1024" in cfg.derived.auto and "(4708 images)" in cfg.derived.auto


def test_values_the_config_sets_are_kept_and_bad_ones_name_their_key(tiny, tmp_path):
    cfg = load_config(None, tiny("dinov2", tmp_path, **{"dinov2.teacher_temp": 0.07, "dinov2.momentum_teacher": 1}))
    derive(cfg, world_size=1, dataset_size=4_708)
    assert cfg.dinov2.teacher_temp == 0.07 and cfg.dinov2.momentum_teacher == 1
    assert "dinov2.teacher_temp" not in cfg.derived.auto
    with pytest.raises(ConfigError, match=r"'dinov2.teacher_temp': must be 'auto' or a number"):
        load_config(None, tiny("dinov2", tmp_path, **{"dinov2.teacher_temp": "hot"}))
    with pytest.raises(ConfigError, match=r"'dino.momentum_teacher': must be 'auto' or a number in \[0, 1\]"):
        load_config(None, tiny("dino", tmp_path, **{"dino.momentum_teacher": 1.5}))
    with pytest.raises(ConfigError, match=r"'dino.head_output_dim'"):
        load_config(None, tiny("dino", tmp_path, **{"dino.head_output_dim": 0}))


def test_a_resumed_run_keeps_the_auto_values_it_started_with(tiny, tmp_path):
    overrides = tiny("dino", tmp_path / "run")
    assert pretrain(None, overrides) == 0
    saved_path = tmp_path / "run" / "config.yaml"
    saved = OmegaConf.load(saved_path)
    assert saved.dino.teacher_temp == 0.02 and "dino.momentum_teacher=" in saved.derived.auto
    # As if the run had started on another image count: the resumed run must keep these, not derive new ones.
    saved.dino.momentum_teacher, saved.dino.teacher_temp = 0.5, 0.03
    OmegaConf.save(saved, saved_path)
    assert pretrain(None, [*overrides, "schedule.epochs=2"]) == 0
    resumed = OmegaConf.load(saved_path)
    assert resumed.dino.momentum_teacher == 0.5 and resumed.dino.teacher_temp == 0.03
