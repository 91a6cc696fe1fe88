"""Distillation: a frozen general model (a seeded RGB ViT as a hub snapshot folder) into tiny students on real
PneumoniaMNIST images; the student's projected features approach the teacher's; the teacher is never saved."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from data_shards.specs import MedMNISTDataset
from pretrain import checkpoint as ckpt
from pretrain.backbones import build_backbone
from pretrain.config import derive, load_config
from pretrain.errors import ConfigError
from pretrain.main import pretrain
from pretrain.methods import METHODS


def distill_config(tiny, run_dir, **extra):
    overrides = tiny("distill", run_dir, **extra)
    if extra.get("model.backbone") == "resnet18":  # a CNN student: no ViT patch / depth arguments
        overrides = [o for o in overrides if not o.startswith("model.backbone_kwargs")]
    return derive(load_config(None, overrides), world_size=1, dataset_size=64)


def agreement(model, images) -> float:
    """Mean cosine between the student's projected pooled features and the teacher's."""
    with torch.no_grad():
        target, _ = model.teacher(images)
        student = model.pooled_projection(model.student.forward_head(model.student.forward_features(images), True))
        return float(F.cosine_similarity(student, target, dim=-1).mean())


@pytest.mark.parametrize("student", ["vit", "resnet18"])
def test_the_students_features_approach_the_teachers_on_real_images(student, tiny, pneumonia, tmp_path):
    extra = {} if student == "vit" else {"model.backbone": "resnet18"}
    torch.manual_seed(0)
    model = METHODS["distill"].from_config(distill_config(tiny, tmp_path, **extra))
    data = MedMNISTDataset(pneumonia)
    images = torch.stack([data[i]["image"] for i in range(96)]) * 2 - 1  # augment mean / std 0.5
    train, held_out = images[:64], images[64:]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    before = agreement(model, held_out)
    for step in range(30):
        batch = train[(step * 16) % 64 :][:16]
        loss = model([batch], step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = agreement(model, held_out)
    assert after > before + 0.2 and after > 0.5, (before, after)
    assert not any(n.startswith("teacher") for n in model.state_dict())  # the teacher is not part of the run
    assert model.teacher.model.training is False
    assert not any(p.requires_grad for p in model.teacher.model.parameters())


def test_medfm_pretrain_distils_releases_the_student_and_exports_without_the_teacher(tiny, tmp_path):
    run = tmp_path / "run"
    assert pretrain(None, tiny("distill", run)) == 0
    state = ckpt.load_checkpoint(run / "last.pt")
    assert not any(k.startswith("teacher") for k in state["model"])
    config = json.loads((run / "release" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["medfm"]["exported_module"] == "student"
    from pretrain.release import load_run

    teacher = state["config"]["distill"]["teacher"]
    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / "teacher"
    __import__("shutil").move(teacher, moved)  # a release is made from the checkpoint: no teacher read
    try:
        assert load_run(run).backbone.num_features == 192
    finally:
        __import__("shutil").move(moved, teacher)


def test_a_missing_teacher_is_a_config_error(tiny, tmp_path):
    cfg = distill_config(tiny, tmp_path, **{"distill.teacher": "null"})
    with pytest.raises(ConfigError, match=r"distill\.teacher"):
        METHODS["distill"].from_config(cfg)
    bare = tmp_path / "teacher.safetensors"
    from safetensors.torch import save_file

    save_file(build_backbone("resnet18", 32, 3).state_dict(), str(bare))
    with pytest.raises(ConfigError, match=r"distill\.teacher_architecture"):
        METHODS["distill"].from_config(distill_config(tiny, tmp_path, **{"distill.teacher": str(bare)}))
