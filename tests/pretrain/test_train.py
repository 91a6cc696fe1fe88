"""End to end through ``pretrain()``: every objective on real PneumoniaMNIST, checkpoints and automatic resume,
non-finite losses skipped then stopped, collapse metrics, and SIGKILL -> resume -> same weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from medfm.cli import main as medfm
from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.main import pretrain
from medfm.pretrain.methods import METHODS, SimCLR
from medfm.pretrain.monitor import effective_rank, embedding_std

REPO = Path(__file__).resolve().parents[2]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_objective_trains_checkpoints_and_resumes(method, tiny, tmp_path):
    run = tmp_path / method
    assert pretrain(None, tiny(method, run)) == 0
    logged = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8] and all(math.isfinite(r["loss"]) for r in logged)
    assert all(r["effective_rank"] >= 1 and r["embedding_std"] > 0 for r in logged)
    assert {"step-0000004.pt", "step-0000008.pt", "last.pt", "config.yaml", "release"} <= {
        p.name for p in run.iterdir()
    }
    assert ckpt.load_checkpoint(run / "last.pt")["step"] == 8
    # The same command with a longer schedule continues from the last checkpoint.
    assert pretrain(None, tiny(method, run, **{"schedule.epochs": 1.5})) == 0
    resumed = [r for r in records(run) if r.get("event") == "resume"]
    assert resumed and resumed[-1]["step"] == 8
    assert ckpt.load_checkpoint(run / "last.pt")["step"] == 12
    assert load_file(run / "release" / "model.safetensors")  # released weights written


def test_mae_writes_pictures_tensorboard_and_knn(tiny, tmp_path, pneumonia):
    extra = {
        "logging.figure_every_steps": 4,
        "logging.trackers": "[tensorboard]",
        "knn.spec": f"medmnist:{pneumonia}",
        "knn.every_steps": 4,
        "knn.max_samples": 64,
    }
    overrides = tiny("mae", tmp_path, **extra)
    assert (
        medfm(["pretrain", "--config", str(REPO / "configs/pretrain/mae_vit_tiny_pneumonia28.yaml"), *overrides]) == 0
    )
    assert [r["step"] for r in records(tmp_path) if "knn_acc" in r] == [4, 8]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "mae_reconstruction-step0000004.png",
        "mae_reconstruction-step0000008.png",
        "training_curves.png",  # loss, lr, collapse signals and kNN accuracy, drawn at the end of the run
    ]
    assert any((tmp_path / "tensorboard").iterdir())


def test_config_error_exits_before_training(tiny, tmp_path, capsys):
    assert pretrain(None, [*tiny("simclr", tmp_path), "optim.lr=1"]) == 2
    assert "'optim.lr'" in capsys.readouterr().err
    cnn = [o for o in tiny("mae", tmp_path) if "backbone_kwargs" not in o] + ["model.backbone=resnet18"]
    assert pretrain(None, cnn) == 2
    assert "'model.backbone': MAE needs a timm VisionTransformer" in capsys.readouterr().err
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.img_size=30", "'data.img_size': 30 is not a multiple of the patch size 7"),
        ("data.spec=imagefolder:{tmp}/no_such_folder", "'data.spec': dataset spec 'imagefolder:"),
        ("data.spec=shards:{tmp}/empty", "'data.spec': "),
        ("model.backbone_kwargs.no_such_kwarg=1", "'model.backbone_kwargs': vit_tiny_patch16_224 does not take them"),
    ],
)
def test_bad_data_or_backbone_settings_exit_2_naming_the_key(override, key, tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert pretrain(None, [*tiny("simclr", tmp_path / "run"), override.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"config key {key}" in err and "Traceback" not in err


class NaNAt(SimCLR):
    """SimCLR whose loss is NaN at the steps in ``bad``; records the weights each step starts from."""

    bad: ClassVar[set[int]] = set()
    weights_at: ClassVar[dict[int, dict[str, torch.Tensor]]] = {}
    momentum_steps: ClassVar[list[int]] = []

    def forward(self, views, step):
        self.weights_at[step] = {k: v.clone() for k, v in self.backbone.named_parameters()}
        out = super().forward(views, step)
        if step in self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out

    def update_momentum(self, step):
        self.momentum_steps.append(step)


def test_a_non_finite_step_is_skipped(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "simclr", NaNAt)
    monkeypatch.setattr(NaNAt, "bad", {5})
    monkeypatch.setattr(NaNAt, "weights_at", {})
    monkeypatch.setattr(NaNAt, "momentum_steps", [])
    assert pretrain(None, tiny("simclr", tmp_path)) == 0
    skipped = [r for r in records(tmp_path) if r.get("event") == "nonfinite_step_skipped"]
    assert [r["step"] for r in skipped] == [5]
    assert NaNAt.momentum_steps == [0, 1, 2, 3, 4, 6, 7]  # no EMA update on the skipped step
    before, after = NaNAt.weights_at[5], NaNAt.weights_at[6]
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 5 moved no weight
    assert not all(torch.equal(NaNAt.weights_at[4][k], before[k]) for k in before)  # step 4 did


def test_non_finite_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "simclr", NaNAt)
    monkeypatch.setattr(NaNAt, "bad", set(range(5, 100)))
    code = pretrain(None, tiny("simclr", tmp_path, **{"train.max_nonfinite_steps": 3}))
    assert code == 1
    assert "3 non-finite optimizer steps in a row" in capsys.readouterr().err
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 4  # the checkpoint before the NaNs
    assert not (tmp_path / "step-0000008.pt").exists()


def test_collapse_metrics_on_collapsed_and_healthy_embeddings():
    collapsed = torch.ones(64, 32) * torch.randn(1, 32)
    assert embedding_std(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(collapsed) == pytest.approx(1.0, abs=1e-3)
    healthy = torch.randn(64, 32)
    assert embedding_std(healthy) == pytest.approx(1 / math.sqrt(32), rel=0.2)
    assert effective_rank(healthy) > 20


RECIPES = {
    "mae": "mae_vit_tiny_pneumonia28.yaml",
    "dinov2": "mae_vit_tiny_pneumonia28.yaml",
    "spark": "spark_resnet18_pneumonia32.yaml",
}


def run_command(run_dir: Path, overrides: list[str], method: str = "mae") -> list[str]:
    return [
        sys.executable,
        "-m",
        "medfm.pretrain.main",
        "--config",
        str(REPO / "configs/pretrain" / RECIPES[method]),
        *overrides,
    ]


@pytest.mark.parametrize("method", ["mae", "dinov2", "spark"])
def test_sigkill_then_resume_ends_with_the_same_weights(tiny, tmp_path, method, signalled_after):
    """Tolerance atol 1e-6 (bitwise equal on this CPU: same ops in the same order; the slack is for BLAS builds
    whose reductions depend on thread timing).

    64 samples per epoch, batch 4 x grad_accum 2 -> 8 steps per epoch, 3 epochs, 2 loader workers, drop path
    on (the RNG state matters); a checkpoint every 4 steps; the run SIGKILLs itself right after step 4's
    checkpoint is written (mid-epoch), then the same command resumes it."""
    extra = {
        "schedule.epochs": 3,
        "schedule.warmup_epochs": 1,
        "checkpoint.every_steps": 4,
        "model.drop_path_rate": 0.1,
        "train.batch_size": 4,
        "train.grad_accum": 2,
        "data.num_workers": 2,
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    recipe = str(REPO / "configs/pretrain" / RECIPES[method])
    kill = signalled_after("medfm.pretrain.checkpoint:TorchStore.save", 1, signal.SIGKILL)
    process = subprocess.run(
        [*kill, "pretrain", "--config", recipe, *tiny(method, killed, **extra)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    killed_at = ckpt.load_checkpoint(killed / "last.pt")["step"]
    assert 4 <= killed_at < 24, "the run finished before it could be killed"
    for run_dir in (killed, reference):
        done = subprocess.run(
            run_command(run_dir, tiny(method, run_dir, **extra), method),
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed = [r for r in records(killed) if r.get("event") == "resume"]
    assert [r["step"] for r in resumed] == [killed_at]
    final_killed = ckpt.load_checkpoint(killed / "last.pt")
    final_reference = ckpt.load_checkpoint(reference / "last.pt")
    assert final_killed["step"] == final_reference["step"] == 24
    for key, value in final_reference["model"].items():
        assert torch.allclose(final_killed["model"][key], value, atol=1e-6, rtol=0), key
    losses = {r["step"]: r["loss"] for r in records(reference) if "loss" in r}
    assert all(
        abs(r["loss"] - losses[r["step"]]) < 1e-5 for r in records(killed) if "loss" in r and r["step"] > killed_at
    )


def test_a_run_whose_newest_checkpoint_is_damaged_resumes_from_the_older_one(tiny, tmp_path):
    run = tmp_path / "run"
    assert pretrain(None, tiny("simclr", run)) == 0  # checkpoints at steps 4 and 8
    for name in ("last.pt", "step-0000008.pt"):
        (run / name).write_bytes((run / name).read_bytes()[:1000])  # torn by a crash or a full disk
    assert pretrain(None, tiny("simclr", run, **{"schedule.epochs": 1.5})) == 0
    events = records(run)
    assert any("step-0000008.pt is unreadable" in r.get("message", "") for r in events)
    assert [r["step"] for r in events if r.get("event") == "resume"] == [4]
    assert ckpt.load_checkpoint(run / "last.pt")["step"] == 12


def test_img_s_counts_training_time_only(tiny, tmp_path, monkeypatch):
    """On a fake clock: each optimizer step takes 1 s, each log line 5 s, the pictures / kNN hook 10 s; img/s is
    the global batch per second of steps (before, a log's seconds came off the next window twice: overstated)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from medfm.pretrain import engine

    clock = [0.0]

    def advancing(function, seconds: float, before: bool):
        def wrapped(*args, **kwargs):
            clock[0] += seconds if before else 0.0
            result = function(*args, **kwargs)
            clock[0] += 0.0 if before else seconds
            return result

        return wrapped

    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(engine, "train_step", advancing(engine.train_step, 1.0, before=True))
    monkeypatch.setattr(engine, "_log", advancing(engine._log, 5.0, before=False))  # after it reads the clock
    monkeypatch.setattr(engine, "_after_step", advancing(engine._after_step, 10.0, before=True))
    assert pretrain(None, tiny("simclr", tmp_path, **{"logging.every_steps": 2})) == 0
    batch = OmegaConf.load(tmp_path / "config.yaml").derived.global_batch
    rates = [r["img_s"] for r in records(tmp_path) if "img_s" in r]
    assert len(rates) == 4 and all(rate == pytest.approx(batch / 1.0) for rate in rates), (rates, batch)
