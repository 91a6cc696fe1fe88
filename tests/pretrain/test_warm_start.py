"""Warm starts (``model.init``): weights a test writes itself (a seeded RGB timm ViT at 224 px, patch 16) loaded
into a 1-channel 28 px, patch 7 run; the result equals timm's own pretrained loading of the same file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.config import derive, load_config
from medfm.pretrain.main import pretrain
from medfm.pretrain.methods import METHODS
from medfm.pretrain.weights import LoadError, file_sha256, load_init

ARCH = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A seeded RGB ViT-Tiny (2 blocks) at 224 px, patch 16, saved as safetensors."""
    torch.manual_seed(7)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, depth=2)
    path = tmp_path_factory.mktemp("init") / "rgb_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def timm_reference(path: Path) -> torch.nn.Module:
    """timm's own loading of the same file into the run's shape (its checkpoint filter + adapt_input_conv)."""
    return timm.create_model(
        ARCH,
        pretrained=True,
        num_classes=0,
        depth=2,
        in_chans=1,
        img_size=28,
        patch_size=7,
        pretrained_cfg_overlay={"file": str(path), "custom_load": False},
    ).eval()


def run_config(method: str, init: Path, run_dir: Path, tiny) -> object:
    cfg = load_config(None, tiny(method, run_dir, **{"model.init": str(init)}))
    return derive(cfg, world_size=1, dataset_size=32)


@pytest.mark.parametrize("method", ["dino", "dinov2", "moco", "mae"])
def test_the_warm_started_backbone_equals_timms_adapted_source(method, source, tiny, tmp_path):
    reference = timm_reference(source)
    model = METHODS[method].from_config(run_config(method, source, tmp_path, tiny)).eval()
    backbone = {"dino": "student_backbone", "dinov2": "student_backbone", "moco": "backbone", "mae": "encoder"}[method]
    student = getattr(model, backbone)
    student = getattr(student, "vit", student)  # lightly's masked wrappers hold the timm ViT
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = reference.forward_features(images)
        assert torch.allclose(student.forward_features(images), expected, atol=1e-5)
        teacher = {"dino": "teacher_backbone", "dinov2": "teacher_backbone", "moco": "backbone_momentum"}.get(method)
        if teacher is not None:  # EMA teachers start from the same weights
            teacher = getattr(model, teacher)
            teacher = getattr(teacher, "vit", teacher)
            assert torch.allclose(teacher.forward_features(images), expected, atol=1e-5)


def test_mismatched_weights_name_their_keys(tmp_path):
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet.pt"
    torch.save(resnet.state_dict(), path)
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, depth=2, in_chans=1, img_size=28, patch_size=7)
    with pytest.raises(LoadError, match=r"resnet\.pt: weights do not match .*missing from the weights.*cls_token"):
        load_init(vit, str(path), ARCH)


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": object()}, path)
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, depth=2)
    with pytest.raises(LoadError, match="refused"):
        load_init(vit, str(path), ARCH)


def test_an_hf_hub_name_absent_from_the_cache_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, depth=2)
    with pytest.raises(LoadError, match=r"hf-hub:timm/vit_tiny_patch16_224\.augreg_in21k is not in the local"):
        load_init(vit, "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", ARCH)


def test_a_local_hub_snapshot_folder_loads(source, tmp_path):
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(source.read_bytes())
    (folder / "config.json").write_text(
        json.dumps({"architecture": ARCH, "num_classes": 0, "pretrained_cfg": {"first_conv": "patch_embed.proj"}})
    )
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, depth=2, in_chans=1, img_size=28, patch_size=7)
    report = load_init(vit, str(folder), ARCH)
    assert report.sha256 == file_sha256(source) and "patch_embed.proj.weight" in report.adapted


def test_medfm_pretrain_from_a_warm_start_records_it_and_resumes_without_it(source, tiny, tmp_path):
    run = tmp_path / "run"
    init = tmp_path / "copy.safetensors"
    init.write_bytes(source.read_bytes())
    assert pretrain(None, tiny("dino", run, **{"model.init": str(init)})) == 0
    sha = file_sha256(init)
    assert ckpt.load_checkpoint(run / "last.pt")["config"]["derived"]["init_sha256"] == sha
    released = json.loads((run / "release" / "config.json").read_text())["medfm"]["init"]
    assert released == {"source": str(init), "sha256": sha}
    assert sha in (run / "release" / "README.md").read_text()
    init.unlink()  # a resumed run reads its checkpoint, not the warm-start source
    assert pretrain(None, tiny("dino", run, **{"model.init": str(init), "schedule.epochs": 1.5})) == 0
    assert ckpt.load_checkpoint(run / "last.pt")["config"]["derived"]["init_sha256"] == sha


def test_an_original_mae_checkpoint_loads_without_its_decoder(source, tmp_path):
    """facebookresearch/mae checkpoints: ``{"model": {encoder keys, decoder_*, mask_token}}``."""
    from safetensors.torch import load_file

    encoder = load_file(str(source))
    mae = {
        **encoder,
        "mask_token": torch.zeros(1, 1, 512),
        "decoder_embed.weight": torch.zeros(512, 192),
        "decoder_pred.weight": torch.zeros(768, 512),
    }
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae, "epoch": 799}, path)
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, depth=2, in_chans=1, img_size=28, patch_size=7)
    report = load_init(vit, str(path), ARCH)
    assert report.dropped == ("decoder_embed.weight", "decoder_pred.weight", "mask_token")
    with torch.no_grad():
        images = torch.rand(2, 1, 28, 28)
        assert torch.allclose(vit.forward_features(images), timm_reference(source).forward_features(images), atol=1e-5)


def test_an_original_dinov2_checkpoint_with_registers_maps_through_timms_filter(tmp_path):
    """facebookresearch/dinov2 names: ``register_tokens``, a ``mask_token``, position embeddings that include the
    class token; timm's ``vit_small_patch14_reg4_dinov2`` keeps registers apart (its checkpoint filter converts)."""
    torch.manual_seed(0)
    timm_model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, depth=2, img_size=56
    )
    state = timm_model.state_dict()
    original = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    cls_pos = torch.randn(1, 1, 384) * 0.02
    original.update(
        {
            "register_tokens": state["reg_token"],
            "cls_token": state["cls_token"] - cls_pos,  # the original adds its class position to the class token
            "pos_embed": torch.cat([cls_pos, state["pos_embed"]], dim=1),
            "mask_token": torch.zeros(1, 384),
        }
    )
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)
    fresh = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, depth=2, img_size=56)
    load_init(fresh, str(path), "vit_small_patch14_reg4_dinov2")
    for key, value in state.items():
        assert torch.allclose(fresh.state_dict()[key], value, atol=1e-6), key
