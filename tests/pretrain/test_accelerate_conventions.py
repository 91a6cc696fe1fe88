"""Accelerate's conventions: ``train.precision=auto`` / ``dist.backend=auto`` defer to what ``accelerate config`` /
``accelerate launch`` chose (an explicit value wins and is logged), and the experiment trackers run offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medfm.pretrain import distributed as dist
from medfm.pretrain.backends.deepspeed import uses_deepspeed, zero_stage
from medfm.pretrain.config import load_config
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.main import pretrain

# what `accelerate launch` sets from an Accelerate config with `distributed_type: DEEPSPEED`, zero_stage 1, bf16
LAUNCHED_DEEPSPEED = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_CONFIG_DS_FIELDS": "offload_optimizer_device,offload_param_device,zero3_init_flag,zero_stage,mixed_precision",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
    "ACCELERATE_MIXED_PRECISION": "bf16",
}


@pytest.fixture
def clean_env(monkeypatch):
    """No Accelerate launch settings or tracker settings from the machine; every change undone afterwards."""
    for key in [
        *LAUNCHED_DEEPSPEED,
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "WANDB_MODE",
        "WANDB_API_KEY",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_ALLOW_FILE_STORE",
        "MLFLOW_DISABLE_TELEMETRY",
        "WANDB_DIR",
    ]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_precision_auto_defers_to_accelerate_and_an_explicit_value_wins(clean_env) -> None:
    assert dist.resolve_precision("auto") == ("fp32", "precision fp32 (train.precision=auto: no Accelerate setting)")
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    value, note = dist.resolve_precision("auto")
    assert value == "bf16" and "Accelerate config" in note
    value, note = dist.resolve_precision("no")  # Accelerate's word: an alias of fp32
    assert value == "fp32" and "the Accelerate setting bf16 is not used" in note


def test_precision_auto_is_bf16_on_a_gpu_that_supports_it(clean_env, monkeypatch) -> None:
    """medfm finetune / pretrain with precision auto on an H100 ran plain fp32 matmuls."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert dist.resolve_precision("auto") == (
        "bf16",
        "precision bf16 (train.precision=auto: no Accelerate setting, a GPU with bf16)",
    )
    assert dist.resolve_precision("fp32")[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # V100, T4
    assert dist.resolve_precision("auto")[0] == "fp32"


def test_a_run_records_the_precision_accelerate_chose(tiny, tmp_path: Path, clean_env) -> None:
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # `accelerate launch --mixed_precision bf16`
    assert pretrain(None, tiny("simclr", tmp_path, **{"data.samples_per_epoch": 16})) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["train"]["precision"], saved["dist"]["backend"]) == ("bf16", "ddp")
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    setup = [e["message"] for e in events if e.get("event") == "setup"]
    assert setup == ["precision bf16 (train.precision=auto: the Accelerate config / launch)"]


def test_backend_auto_takes_deepspeed_from_the_accelerate_config(tiny, tmp_path: Path, clean_env) -> None:
    for key, value in LAUNCHED_DEEPSPEED.items():
        clean_env.setenv(key, value)
    cfg = load_config(None, tiny("simclr", tmp_path))
    accelerator, notes = dist.make_accelerator(cfg)
    try:
        assert uses_deepspeed(accelerator) and zero_stage(accelerator) == 1
        assert (cfg.dist.backend.value, cfg.dist.zero_stage, cfg.train.precision.value) == ("deepspeed", 1, "bf16")
        assert "dist.backend=auto: DeepSpeed from the Accelerate config (ZeRO stage 1)" in notes
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["bf16"]["enabled"] is True
    finally:
        dist.shutdown(accelerator)


def test_an_explicit_backend_wins_over_the_accelerate_config(tiny, tmp_path: Path, clean_env) -> None:
    for key, value in LAUNCHED_DEEPSPEED.items():
        clean_env.setenv(key, value)
    cfg = load_config(None, [*tiny("simclr", tmp_path), "dist.backend=ddp", "train.precision='no'"])
    accelerator, notes = dist.make_accelerator(cfg)
    assert not uses_deepspeed(accelerator) and accelerator.mixed_precision == "no"
    assert "dist.backend=ddp: the Accelerate config's DeepSpeed settings are not used" in notes
    assert "precision fp32 (train.precision=fp32; the Accelerate setting bf16 is not used)" in notes


def test_accelerate_settings_that_contradict_the_config_name_the_key(tiny, tmp_path: Path, clean_env) -> None:
    for key, value in {**LAUNCHED_DEEPSPEED, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}.items():
        clean_env.setenv(key, value)
    cfg = load_config(None, tiny("simclr", tmp_path))
    with pytest.raises(ConfigError, match=r"train\.grad_accum.*gradient_accumulation_steps=4"):
        dist.make_accelerator(cfg)


def test_trackers_run_offline_into_the_run_directory(tiny, tmp_path: Path, clean_env) -> None:
    pytest.importorskip("wandb", reason="the dev extra installs wandb")
    pytest.importorskip("mlflow", reason="the dev extra installs mlflow-skinny")
    overrides = tiny(
        "mae", tmp_path, **{"logging.trackers": "[tensorboard,wandb,mlflow]", "logging.figure_every_steps": 4}
    )
    assert pretrain(None, overrides) == 0
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert any(wandb_run.glob("run-*.wandb"))
    losses = list((tmp_path / "mlruns").rglob("metrics/train/loss"))
    assert len(losses) == 1 and len(losses[0].read_text().splitlines()) == 4  # logged every 2 of 8 steps
    assert any((tmp_path / "mlruns").rglob("artifacts/figures/*.png"))
    params = {p.name for p in (tmp_path / "mlruns").rglob("params/*")}
    assert {"method", "train.batch_size", "optim.betas"} <= params


def test_an_unknown_or_missing_tracker_is_a_config_error(tiny, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"logging\.trackers.*'comet' is not one of"):
        load_config(None, [*tiny("simclr", tmp_path), "logging.trackers=[comet]"])
    monkeypatch.setattr("medfm.pretrain.config.tracker_installed", lambda name: name != "wandb")
    with pytest.raises(ConfigError, match=r"wandb is not installed \(pip install wandb\)"):
        load_config(None, [*tiny("simclr", tmp_path), "logging.trackers=[tensorboard,wandb]"])


def test_accelerate_launch_with_a_config_file_sets_the_precision(tiny, tmp_path: Path, clean_env) -> None:
    """The real launcher: `accelerate launch --config_file` with `mixed_precision: bf16` -> a bf16 run."""
    import subprocess
    import sys

    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n"
        "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n"
    )
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "medfm.pretrain.main",
               "--config", "configs/pretrain/simclr_resnet18_pneumonia28.yaml",
               *tiny("simclr", run_dir, **{"data.samples_per_epoch": 16})]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "precision bf16 (train.precision=auto: the Accelerate config / launch)" in done.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"] == "bf16"


@pytest.mark.slow
def test_accelerate_launch_with_a_deepspeed_config_trains_with_zero2_bf16(tiny, tmp_path: Path, clean_env) -> None:
    """`accelerate config` chose DeepSpeed ZeRO-2 + bf16 on 2 processes; the recipe leaves both on auto. (BatchNorm
    models under DeepSpeed bf16: tests/pretrain/test_backends.py and test_scale.py.)"""
    import subprocess
    import sys

    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n"
        "  offload_optimizer_device: none\n  offload_param_device: none\n  zero3_init_flag: false\n"
        "mixed_precision: bf16\nnum_machines: 1\nnum_processes: 2\nuse_cpu: false\n"
    )
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "medfm.pretrain.main",
               "--config", "configs/pretrain/mae_vit_tiny_pneumonia28.yaml",
               *tiny("mae", run_dir, **{"data.samples_per_epoch": 32})]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["train"]["precision"], saved["dist"]["backend"], saved["dist"]["zero_stage"]) == (
        "bf16",
        "deepspeed",
        2,
    )
    assert saved["derived"]["world_size"] == 2
    assert (run_dir / "release" / "model.safetensors").is_file() and (run_dir / "last").exists()


def test_shutdown_restores_the_environment_and_accelerate_state(tiny, tmp_path: Path, clean_env) -> None:
    """A later run in the same Python process starts from the user's environment, with any precision."""
    import os

    for key, value in LAUNCHED_DEEPSPEED.items():
        clean_env.setenv(key, value)
    before = dict(os.environ)
    cfg = load_config(None, [*tiny("simclr", tmp_path), "logging.trackers=[tensorboard,mlflow]", "dist.backend=ddp"])
    accelerator, _ = dist.make_accelerator(cfg)
    assert "MLFLOW_TRACKING_URI" in os.environ and "ACCELERATE_USE_DEEPSPEED" not in os.environ
    dist.shutdown(accelerator)
    assert dict(os.environ) == before
    clean_env.delenv("ACCELERATE_MIXED_PRECISION")
    assert dist.build_accelerator("no").mixed_precision == "no"  # a second Accelerator, another precision


def test_a_resumed_run_keeps_the_settings_it_started_with(tiny, tmp_path: Path, clean_env, capsys) -> None:
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    overrides = tiny("simclr", tmp_path, **{"data.samples_per_epoch": 16})
    assert pretrain(None, overrides) == 0
    clean_env.delenv("ACCELERATE_MIXED_PRECISION")  # relaunched with plain python: auto alone would say "no"
    assert pretrain(None, [*overrides, "schedule.epochs=2"]) == 0
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["precision"] == "bf16"
    assert "resuming: dist.backend=ddp and train.precision=bf16 as the run started" in capsys.readouterr().err
    assert pretrain(None, [*overrides, "schedule.epochs=2", "dist.backend=deepspeed"]) == 2
    assert "dist.backend': deepspeed cannot resume" in capsys.readouterr().err


def test_configs_of_earlier_versions_still_load(tiny, tmp_path: Path) -> None:
    from medfm.pretrain.runs import run_config

    cfg = load_config(None, [*tiny("simclr", tmp_path), "logging.tensorboard=false"])
    assert list(cfg.logging.trackers) == []
    saved = {
        "method": "simclr",
        "logging": {"tensorboard": True},
        "train": {"run_dir": str(tmp_path)},
        "data": {"spec": "x"},
    }
    assert list(run_config(saved, "old/config.yaml").logging.trackers) == ["tensorboard"]


@pytest.mark.parametrize(
    "written", ["train.precision=no", "train.precision='no'", "train.precision=NO", "train.precision=fp32"]
)
def test_precision_fp32_and_its_alias_no(written, tiny, tmp_path: Path, clean_env) -> None:
    """``no`` (Accelerate's word; bare, YAML reads it as false) is fp32, and the run's config says fp32."""
    cfg = load_config(None, [*tiny("simclr", tmp_path), written])
    assert cfg.train.precision.value == "fp32"
    accelerator, notes = dist.make_accelerator(cfg)
    assert accelerator.mixed_precision == "no" and "precision fp32 (train.precision=fp32)" in notes
    dist.shutdown(accelerator)
