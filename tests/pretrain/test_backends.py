"""The backend interface (``medfm.pretrain.backends``) and the GPU-path defects it fixes, shown on CPU.

- SyncBatchNorm conversion keeps timm's fused BatchNorm + activation (torch's conversion dropped the activation);
- DeepSpeed bf16 casts parameters only: normalisation statistics follow their weights, so BatchNorm models train;
- figures and the kNN monitor run under the backend's inference autocast (fp32 inputs met bf16 parameters);
- RNG states: this process's GPU only, so a job resumes with another GPU count;
- the step syncs the host once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.backends import DeepSpeedBackend, TrainingBackend, backend_for
from medfm.pretrain.backends.base import to_sync_batchnorm, use_channels_last
from medfm.pretrain.backends.deepspeed import cast_norm_statistics
from medfm.pretrain.distributed import build_accelerator

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv3_small_050"])
def test_sync_batchnorm_conversion_keeps_timms_fused_activation(arch: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0, in_chans=1).eval()
    fused = [m for m in model.modules() if isinstance(m, timm.layers.BatchNormAct2d)]
    assert fused and any(not isinstance(m.act, nn.Identity) for m in fused), "the test needs BatchNormAct2d layers"
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = model(images)
        converted = to_sync_batchnorm(model).eval()
        got = converted(images)
    assert not any(type(m) is nn.SyncBatchNorm for m in converted.modules()), "plain SyncBatchNorm: act dropped"
    assert torch.allclose(got, expected, atol=1e-5)
    torch_converted = nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model(arch, num_classes=0, in_chans=1))
    torch_converted.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(torch_converted.eval()(images), expected, atol=1e-3)  # what it used to do


def test_batchnorm_becomes_syncbatchnorm_on_several_gpus_only() -> None:
    def bn_kinds(module: nn.Module) -> set[type]:
        return {type(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), timm.layers.BatchNormAct2d(4))
    precision = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    try:
        gpus = TrainingBackend(SimpleNamespace(num_processes=2, device=torch.device("cuda")))
        assert bn_kinds(gpus.before_prepare(model)) == {nn.SyncBatchNorm, timm.layers.SyncBatchNormAct}
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark  # TF32, autotune
    finally:
        torch.set_float32_matmul_precision(precision[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = precision[1:]
    cpus = TrainingBackend(SimpleNamespace(num_processes=2, device=torch.device("cpu")))
    assert bn_kinds(cpus.before_prepare(nn.Sequential(nn.BatchNorm2d(4)))) == {nn.BatchNorm2d}


def test_channels_last_is_chosen_for_convolutional_models_on_cuda_only() -> None:
    resnet, vit = timm.create_model("resnet18", num_classes=0), timm.create_model("vit_tiny_patch16_224", depth=1)
    auto = SimpleNamespace(train=SimpleNamespace(channels_last=None))
    assert use_channels_last(auto, resnet, torch.device("cuda")) and not use_channels_last(
        auto, vit, torch.device("cuda")
    )
    assert not use_channels_last(auto, resnet, torch.device("cpu"))
    forced = SimpleNamespace(train=SimpleNamespace(channels_last=True))
    assert use_channels_last(forced, vit, torch.device("cpu"))


def test_norm_statistics_follow_deepspeeds_parameter_cast() -> None:
    """DeepSpeed >= 0.19.2 casts parameters only (engine._cast_module_mixed_precision): a BatchNorm with bf16
    weights and fp32 running statistics fails; with the statistics cast it runs, and other buffers stay fp32."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.register_buffer("frequencies", torch.ones(3))
    for param in model.parameters():  # what DeepSpeed's bf16 engine does to the module
        param.data = param.data.to(torch.bfloat16)
    images = torch.randn(2, 1, 8, 8)
    with pytest.raises(RuntimeError), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
    cast_norm_statistics(model, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert torch.isfinite(out.float()).all() and model[1].running_mean.dtype == torch.bfloat16
    assert model.frequencies.dtype == torch.float32 and model[1].num_batches_tracked.dtype == torch.long


def test_the_backend_follows_the_accelerator() -> None:
    accelerator = build_accelerator("no")
    backend = backend_for(accelerator)
    assert type(backend) is TrainingBackend and backend.runs_models_on_one_process
    assert not issubclass(TrainingBackend, DeepSpeedBackend)


def test_rng_states_hold_this_processs_gpu_only(monkeypatch) -> None:
    """A job that resumes with fewer visible GPUs per process: set_rng_state_all of every saved GPU raised."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.arange(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("all GPUs' states captured"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda _: pytest.fail("all GPUs' states restored"))
    state = ckpt.capture_rng()
    assert torch.equal(state["cuda"], torch.arange(4, dtype=torch.uint8))
    ckpt.restore_rng(state)
    assert len(restored) == 1
    ckpt.restore_rng({**state, "cuda": [torch.zeros(4, dtype=torch.uint8)] * 8})  # saved by earlier versions
    assert len(restored) == 1


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _medfm_pretrain(recipe: str, overrides: list[str]) -> None:
    """``medfm pretrain`` in its own process (DeepSpeed keeps process-wide groups: one run per process)."""
    config = str(REPO / "configs" / "pretrain" / recipe)
    done = subprocess.run(
        [sys.executable, "-m", "medfm.pretrain.main", "--config", config, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_deepspeed_zero2_bf16_trains_batchnorm_models_and_draws_mae_figures_with_knn(
    pretrain_overrides, medmnist, tmp_path: Path
) -> None:
    """Both failed on d3f9bf3: SimCLR ResNet-18 (BatchNorm everywhere) under ZeRO-2 bf16 at its first step
    ('expected scalar type BFloat16 but found Float'), MAE figures and the kNN monitor at their first step
    ('Input type (float) and bias type (c10::BFloat16) should be the same')."""
    spec = f"medmnist:{medmnist('pneumoniamnist')}"
    deepspeed = {"train.precision": "bf16", "dist.backend": "deepspeed", "dist.zero_stage": 2}
    simclr = tmp_path / "simclr"
    _medfm_pretrain(
        "simclr_resnet18_pneumonia28.yaml",
        pretrain_overrides("simclr", spec, simclr, {"model.backbone": "resnet18"}, **deepspeed),
    )
    losses = [r["loss"] for r in _records(simclr) if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (simclr / "release" / "model.safetensors").is_file()

    mae = tmp_path / "mae"
    every_step = {"logging.figure_every_steps": 1, "knn.every_steps": 1, "knn.spec": spec, "knn.max_samples": 64}
    _medfm_pretrain("mae_vit_tiny_pneumonia28.yaml", pretrain_overrides("mae", spec, mae, **deepspeed, **every_step))
    assert len(list((mae / "figures").glob("mae_reconstruction-step*.png"))) == 4
    knn = [r["knn_acc"] for r in _records(mae) if "knn_acc" in r]
    assert len(knn) == 4 and all(0.0 <= acc <= 1.0 for acc in knn)


def test_evaluation_features_run_in_bf16_on_gpus_with_bf16_only(monkeypatch) -> None:
    from medfm.pretrain import knn

    assert knn.feature_precision("cpu") == "fp32"
    monkeypatch.setattr(knn, "gpu_supports_bf16", lambda: True)
    assert knn.feature_precision("cuda") == "bf16" and knn.feature_precision(torch.device("cpu")) == "fp32"
    monkeypatch.setattr(knn, "gpu_supports_bf16", lambda: False)
    assert knn.feature_precision("cuda") == "fp32"


@pytest.mark.slow
def test_train_compile_compiles_the_step_and_keeps_checkpoint_keys(pretrain_overrides, medmnist, tmp_path: Path):
    """``train.compile=true``: torch.compile (inductor, on CPU here) runs the method's forward; the checkpoint and the
    release have the keys of an eager run, and the run resumes from them."""
    import torch._dynamo

    from medfm.pretrain.main import pretrain

    spec = f"medmnist:{medmnist('pneumoniamnist')}"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    overrides = pretrain_overrides("simclr", spec, tmp_path, **{"train.compile": True})
    assert pretrain(None, overrides) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    eager = pretrain_overrides("simclr", spec, tmp_path / "eager")
    assert pretrain(None, eager) == 0
    compiled_keys = ckpt.load_checkpoint(tmp_path / "last.pt")["model"].keys()
    assert compiled_keys == ckpt.load_checkpoint(tmp_path / "eager" / "last.pt")["model"].keys()
    assert pretrain(None, [*overrides, "schedule.epochs=2"]) == 0  # resumes, compiled again
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 8
    torch._dynamo.reset()


def test_compile_is_refused_when_deepspeed_is_chosen_after_the_config_checks() -> None:
    """dist.backend=auto becomes DeepSpeed from an Accelerate config or a resumed run, after load_config."""
    from medfm.pretrain.errors import ConfigError

    cfg = SimpleNamespace(train=SimpleNamespace(compile=True))
    backend = DeepSpeedBackend(SimpleNamespace(device=torch.device("cpu"), num_processes=1), cfg)
    with pytest.raises(ConfigError, match=r"train\.compile"):
        backend.prepare(nn.Linear(2, 2), lambda m: torch.optim.AdamW(m.parameters()))
