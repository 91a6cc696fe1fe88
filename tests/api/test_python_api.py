"""``import medfm``: the command's steps as functions with result objects and typed exceptions, a user's own
``nn.Module`` as the backbone, and the release / evaluation chain on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import medfm


def heads(pretrain_overrides, method: str) -> list[str]:
    """The tiny backbone and head keys of the shared fixture, as command-line overrides."""
    return [o for o in pretrain_overrides(method, "x", Path("x")) if o.startswith(("model.", f"{method}."))]


def tiny_values(**extra: object) -> dict[str, object]:
    """The tiny pretraining config as the API's keyword arguments (sections as dicts, dotted keys)."""
    return {
        # data= and model= are the spec and the backbone: their sections' other keys go dotted
        **{"data.img_size": 28, "data.samples_per_epoch": 32, "data.num_workers": 0},
        "train": {"batch_size": 8},
        "schedule": {"epochs": 1, "warmup_epochs": 0},
        "checkpoint": {"every_steps": 2},
        "logging": {"every_steps": 2, "figure_every_steps": 0, "trackers": [], "progress_bar": False},
        **extra,
    }


class SmallNet(nn.Module):
    """A user's own CNN: no timm interface, returns a (B, D, h, w) feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def test_import_medfm_is_light_and_exposes_the_api() -> None:
    code = "import sys, medfm; print(sorted(m for m in ('torch', 'timm', 'webdataset') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for name in ("shard", "pretrain", "reduce", "export", "evaluate", "finetune", "load_backbone", "register_module"):
        assert callable(getattr(medfm, name))
    for name in ("ConfigError", "ShardError", "ReleaseError", "TrainingDiverged", "DistributedFailure", "Preempted"):
        assert issubclass(getattr(medfm, name), medfm.MedfmError)


def test_medfm_pretrain_is_the_package_and_the_api_step() -> None:
    """The pretraining package installs as medfm.pretrain, the name of the API's pretraining step too: importing
    submodules (in any order, any form) leaves it both."""
    code = (
        "import inspect, medfm.pretrain.errors, medfm\n"
        "import medfm.pretrain.schedules as schedules\n"
        "from medfm.pretrain import config\n"
        "print(callable(medfm.pretrain), medfm.pretrain.schedules is schedules, medfm.pretrain.config is config,"
        " list(inspect.signature(medfm.pretrain).parameters)[:3])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True True True ['out', 'data', 'method']"
    assert medfm.pretrain.__name__ == "medfm.pretrain" and callable(medfm.pretrain)


def test_a_bad_key_raises_a_config_error_naming_it(tmp_path: Path, pneumonia: Path) -> None:
    with pytest.raises(medfm.ConfigError, match=r"schedule\.epoch"):
        medfm.pretrain(out=tmp_path / "run", data=f"medmnist:{pneumonia}", method="simclr", schedule={"epoch": 1})
    with pytest.raises(medfm.ConfigError, match=r"data\.spec"):
        medfm.pretrain(out=tmp_path / "run", data=str(tmp_path / "nowhere"), method="simclr", model="resnet18")


def test_shard_pretrain_export_evaluate_chain(tmp_path: Path, pneumonia: Path, pretrain_overrides) -> None:
    pool = medfm.shard([f"medmnist:{pneumonia}"], tmp_path / "pool", workers=1, splits=["train"], max_count=2000)
    assert isinstance(pool, medfm.ShardResult) and pool.samples > 4000 and pool.skipped == []
    run = medfm.pretrain(
        out=tmp_path / "run",
        data=pool,
        method="mae",
        overrides=heads(pretrain_overrides, "mae"),
        **tiny_values(**{"data.split": None}),
    )
    assert isinstance(run, medfm.PretrainResult) and run.step == 4
    assert run.config["method"] == "mae" and run.config["data"]["spec"] == pool.spec
    assert any(r.get("event") == "done" for r in run.metrics)
    assert (run.release_dir / "model.safetensors").is_file()
    release = medfm.export(run, tmp_path / "release")
    assert {"model.safetensors", "config.json", "README.md"} <= set(release.files)
    assert release.load_backbone(num_classes=2)(torch.zeros(1, 1, 28, 28)).shape == (1, 2)
    scores = medfm.evaluate(
        release,
        data=f"medmnist:{pneumonia}",
        out=tmp_path / "eval",
        protocols=["knn"],
        plots=False,
        **{"backbone.inits": ["release"]},
    )
    assert isinstance(scores, medfm.EvalResult)
    assert 0.5 < scores.summary["release"]["knn"]["auc"] <= 1.0
    assert "| release | knn |" in scores.table


def test_pretrain_a_users_own_module_then_load_and_finetune_it(tmp_path: Path, pneumonia: Path) -> None:
    net = SmallNet()
    # bf16 here, then fine-tuning at auto (no): two Accelerators with different settings in one process
    run = medfm.pretrain(
        out=tmp_path / "run",
        data=f"medmnist:{pneumonia}",
        method="simclr",
        model=net,
        **tiny_values(simclr={"hidden_dim": 64, "output_dim": 32}, **{"train.precision": "bf16"}),
    )
    assert run.config["model"]["backbone"] == "module:SmallNet"
    config = (run.release_dir / "config.json").read_text()
    assert '"architecture": "module:SmallNet"' in config
    backbone = run.load_backbone()
    trained = backbone.model.state_dict()
    assert not torch.equal(trained["body.0.weight"], net.state_dict()["body.0.weight"])  # trained a copy
    assert backbone.forward_features(torch.zeros(2, 1, 28, 28)).shape == (2, 16)
    tuned = medfm.finetune(
        run,
        data=f"medmnist:{pneumonia}",
        out=tmp_path / "ft",
        plots=False,
        **{"backbone.inits": ["release"]},
        train={"epochs": 1, "max_steps": 2, "batch_size": 16},
        overrides=["data.num_workers=0"],
    )
    assert set(tuned.summary) == {"release"} and 0.0 <= tuned.summary["release"]["acc"] <= 1.0


def test_a_module_release_needs_the_module_registered(tmp_path: Path, pneumonia: Path) -> None:
    run = medfm.pretrain(
        out=tmp_path / "run",
        data=f"medmnist:{pneumonia}",
        method="simclr",
        model=SmallNet(),
        **tiny_values(simclr={"hidden_dim": 64, "output_dim": 32}),
    )
    from medfm.pretrain import backbones

    backbones._registered.clear()  # another process: nothing registered
    with pytest.raises(medfm.ConfigError, match="not registered"):
        medfm.pretrain(
            out=run.run_dir,
            data=f"medmnist:{pneumonia}",
            method="simclr",
            model="module:SmallNet",
            **tiny_values(simclr={"hidden_dim": 64, "output_dim": 32}),
        )
    with pytest.raises(ValueError, match="not registered"):
        medfm.load_backbone(run.release_dir)
    medfm.register_module(SmallNet())
    assert medfm.load_backbone(run.release_dir).num_features == 16


def test_a_module_that_fails_on_the_input_is_a_config_error(tmp_path: Path, pneumonia: Path) -> None:
    rgb_only = nn.Conv2d(3, 4, 3)
    with pytest.raises(medfm.ConfigError, match=r"model.backbone.*fails on a \(2, 1, 28, 28\) batch"):
        medfm.pretrain(
            out=tmp_path / "run",
            data=f"medmnist:{pneumonia}",
            method="simclr",
            model=rgb_only,
            **tiny_values(simclr={"hidden_dim": 64, "output_dim": 32}),
        )


def test_section_arguments_and_dotted_keys_merge_at_every_depth() -> None:
    from medfm.api import _downstream_values
    from medfm.pretrain.config import nested

    assert nested({"a.b.c": 1, "a": {"b": {"d": 2}}}) == {"a": {"b": {"c": 1, "d": 2}}}
    given = _downstream_values({"inits": ["release", "random"]}, {"spec": "medmnist:x.npz", "batch_size": 8}, "o", {})
    assert given == {
        "backbone": {"inits": ["release", "random"]},
        "data": {"spec": "medmnist:x.npz", "batch_size": 8},
        "out_dir": "o",
    }
