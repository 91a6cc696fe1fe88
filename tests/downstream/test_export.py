"""Release contract: timm key names, timm loads the folder without medfm, identical features, model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.backbones import pooled_features
from medfm.pretrain.config import derive, load_config, to_dict
from medfm.pretrain.export import export_run
from medfm.pretrain.methods import METHODS
from medfm.pretrain.release import RESULTS_NAME, ExportError, data_summary, write_results_summary
from medfm.pretrain.runs import load_run


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pooled_features(model.eval(), x)


def test_release_layout_and_timm_keys(tiny_release: Path):
    assert sorted(p.name for p in tiny_release.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tiny_release / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["num_features"] == 192
    assert config["model_args"] == {"in_chans": 1, "img_size": 28, "patch_size": 7, "depth": 2}
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [1, 28, 28] and pcfg["mean"] == [0.5] and pcfg["std"] == [0.5]
    assert pcfg["custom_load"] is False and pcfg["num_classes"] == 0
    medfm = config["medfm"]
    assert medfm["objective"] == "dino" and medfm["steps"] == 4 and medfm["exported_module"] == "teacher_backbone"
    assert medfm["patch_size"] == 7 and medfm["in_chans"] == 1
    assert medfm["data"]["spec"] == "medmnist:pneumoniamnist.npz"  # the file name, not the local path
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, **config["model_args"]).state_dict()
    weights = load_file(str(tiny_release / "model.safetensors"))
    assert set(weights) == set(reference)
    assert all(weights[k].shape == reference[k].shape for k in reference)


def test_timm_loads_the_release_without_medfm_and_gives_identical_features(tiny_run: Path, tiny_release: Path):
    run = load_run(tiny_run)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = features(run.backbone, x)
    by_file = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tiny_release / "model.safetensors"), custom_load=False, num_classes=0),
        num_classes=3,
        in_chans=1,
        img_size=28,
        patch_size=7,
        depth=2,
    )
    by_folder = timm.create_model(f"local-dir:{tiny_release}", pretrained=True, num_classes=3)
    for model in (by_file, by_folder):
        torch.testing.assert_close(features(model, x), expected, rtol=0, atol=1e-6)
        assert model(x).shape == (4, 3)


def test_dino_exports_the_teacher_not_the_student(tiny_run: Path, tiny_release: Path):
    state = ckpt.load_checkpoint(ckpt.find_resume(tiny_run))["model"]
    weights = load_file(str(tiny_release / "model.safetensors"))
    assert all(torch.equal(weights[k], state[f"teacher_backbone.{k}"]) for k in weights)
    assert any(not torch.equal(weights[k], state[f"student_backbone.{k}"]) for k in weights)


@pytest.mark.parametrize(
    ("method", "backbone", "module"),
    [
        ("mae", None, "encoder.vit"),
        ("moco", None, "backbone_momentum"),
        ("simclr", {"model.backbone": "resnet18"}, "backbone"),
    ],
)
def test_every_objective_exports_its_release_module(method, backbone, module, medmnist, pretrain_overrides, tmp_path):
    """A checkpoint written through pretrain's contract (perturbed so student and EMA copies differ)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = f"medmnist:{medmnist('pneumoniamnist')}"
    cfg = load_config(None, pretrain_overrides(method, spec, run_dir, backbone))
    derive(cfg, world_size=1, dataset_size=64)
    torch.manual_seed(0)
    model = METHODS[method].from_config(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    state = {"model": model.state_dict(), "optimizer": {}, "step": 3, "data": {}, "rng": [], "config": to_dict(cfg)}
    ckpt.save_checkpoint(run_dir, state, keep=1)

    release = export_run(run_dir, tmp_path / "release")
    config = json.loads((release / "config.json").read_text())
    assert config["medfm"]["exported_module"] == module and config["medfm"]["steps"] == 3
    expected = model.get_submodule(module).eval()
    weights = load_file(str(release / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in expected.state_dict().items())
    loaded = timm.create_model(f"local-dir:{release}", pretrained=True, num_classes=0)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(features(loaded, x), features(expected, x), rtol=0, atol=1e-6)


def test_model_card_lists_attached_results(tiny_run: Path, tmp_path: Path):
    results = tmp_path / "linear_pneumonia" / "results.json"
    results.parent.mkdir()
    summary = {"acc": 0.81, "balanced_acc": 0.77, "auc": 0.9, "f1": 0.8}
    results.write_text(json.dumps({"protocol": "linear", "dataset": "medmnist:pneumoniamnist.npz", "summary": summary}))
    card = (export_run(tiny_run, tmp_path / "release", results=[results]) / "README.md").read_text()
    for section in ("## Intended use", "## Data", "## Recipe", "## Evaluation", "## Limits", "library_name: timm"):
        assert section in card
    assert "| linear_pneumonia | linear | `medmnist:pneumoniamnist.npz` | 0.8100 | 0.7700 | 0.9000 | 0.8000 |" in card


def test_export_refuses_a_run_without_checkpoint_and_a_full_release_folder(tiny_run: Path, tmp_path: Path):
    with pytest.raises(ExportError, match="no checkpoint"):
        export_run(tmp_path, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_run(tiny_run, tmp_path / "full")


def test_data_summary_reads_the_shard_manifest(pretrain_overrides, tmp_path: Path):
    shards = tmp_path / "chest_shards"
    shards.mkdir()
    manifest = {
        "sources": ["nih/images_001", "nih/images_002"],
        "totals": {
            "samples": 1000,
            "shards": 4,
            "labeled": 0,
            "by_modality": {"DX": 1000},
            "by_split": {},
            "duplicates_exact": 3,
            "duplicates_near": 2,
        },
        "classes": {},
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, pretrain_overrides("mae", f"shards:{shards}", tmp_path / "run"))
    derive(cfg, world_size=1, dataset_size=1000)
    summary = data_summary(cfg)
    assert summary["spec"] == "shards:chest_shards"
    assert summary["manifest"]["samples"] == 1000 and summary["manifest"]["duplicates_removed"] == 5
    assert summary["manifest"]["by_modality"] == {"DX": 1000}


def test_a_checkpoint_that_does_not_match_its_method_is_refused_naming_the_keys(tiny_run: Path, tmp_path: Path):
    state = ckpt.load_checkpoint(tiny_run / "last.pt")
    state["model"]["extra.weight"] = state["model"].pop("teacher_backbone.norm.weight")
    state["model"]["student_backbone.cls_token"] = torch.zeros(1, 1, 3)
    ckpt.save_checkpoint(tmp_path / "run", state, keep=1)
    with pytest.raises(ExportError) as err:
        export_run(tmp_path / "run", tmp_path / "release")
    message = str(err.value)
    assert "missing from the weights (1): teacher_backbone.norm.weight" in message
    assert "not in the model (1): extra.weight" in message
    assert "shape mismatch (1): student_backbone.cls_token (1, 1, 3) vs model (1, 1, 192)" in message
    assert not (tmp_path / "release").exists()


def test_the_card_lists_the_results_summary_files_downstream_writes(tiny_run: Path, tmp_path: Path):
    from medfm.downstream.report import write_results

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes((tiny_run / "last.pt").read_bytes())
    metrics = {"acc": 0.8, "balanced_acc": 0.7, "auc": float("nan"), "f1": 0.6}
    result = {
        "protocol": "linear",
        "dataset": "medmnist:/data/breastmnist.npz",
        "backbone": {"source": "releases/x", "architecture": "vit_tiny_patch16_224", "init": "release"},
        "task": {"kind": "binary", "class_names": ["benign", "malignant"]},
        "test": {"n": 10, **metrics},
        "summary": metrics,
    }
    write_results(run_dir / "eval" / "breast" / "release" / "linear", result)
    written = json.loads((run_dir / "eval" / "breast" / "release" / "linear" / RESULTS_NAME).read_text())
    assert written == {
        "format": "medfm-results/1",
        "protocol": "linear",
        "dataset": "medmnist:/data/breastmnist.npz",
        "init": "release",
        "backbone": "releases/x",
        "summary": {"acc": 0.8, "balanced_acc": 0.7, "auc": None, "f1": 0.6},
    }
    elsewhere = tmp_path / "finetunes"
    write_results_summary(
        elsewhere / "breast" / "random",
        protocol="finetune",
        dataset="medmnist:breastmnist.npz",
        init="random",
        summary={"acc": 0.5, "auc": 0.25},
    )
    card = (export_run(run_dir, tmp_path / "release", results=[elsewhere]) / "README.md").read_text()
    assert "| eval/breast/release/linear | linear | `medmnist:breastmnist.npz` | 0.8000 | 0.7000 | - | 0.6000 |" in card
    assert "| finetunes/breast/random | finetune | `medmnist:breastmnist.npz` | 0.5000 | - | 0.2500 | - |" in card
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"protocol": "linear", "summary": {}}))
    with pytest.raises(ExportError, match=r"bad\.json: not an evaluation results file.*missing \['dataset'\]"):
        export_run(run_dir, tmp_path / "release2", results=[bad])


class _Payload:
    """Pickles to a call that creates a marker file: what a booby-trapped checkpoint would run on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_exporting_a_deepspeed_run_never_runs_pickled_code(tmp_path, capsys):
    import torch

    from medfm.cli import main as medfm

    marker = tmp_path / "code_ran"
    step = tmp_path / "run" / "step-0000002"
    (step / "zero").mkdir(parents=True)
    torch.save({"step": 2, "data": {}, "rng": [], "config": {}, "momentum": {}, "version": 1}, step / "medfm.pt")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": {}, "payload": _Payload(marker)}, step / "zero" / name)
    (tmp_path / "run" / "last").symlink_to(step.name)
    code = medfm(["export", str(tmp_path / "run"), "--out", str(tmp_path / "release")])
    assert not marker.exists(), "exporting the run executed code from its checkpoint"
    assert code == 1
    err = capsys.readouterr().err
    assert "refused to unpickle" in err
    assert "mp_rank_00_model_states.pt needs" in err and "getattr" in err  # the file and what it needs, named
    assert not (tmp_path / "release").exists() or not any((tmp_path / "release").iterdir())
