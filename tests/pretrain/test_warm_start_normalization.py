"""Warm starts keep the source's input normalisation: ``augment.mean`` / ``std`` left out are taken from the
source's ``pretrained_cfg`` (its config.json, else timm's for the architecture), recorded in the run's config and
release, and kept on resume. The contract: a warm-started model's first forward on an image equals the source
model's on the same image with the source's own (timm) preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from medfm.pretrain.config import derive, load_config
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.main import pretrain
from medfm.pretrain.methods import METHODS
from medfm.pretrain.methods.base import augment_from_config
from medfm.pretrain.weights import source_normalization

ARCH = "vit_tiny_patch16_224"
SHAPE = {"depth": 1, "img_size": 32, "patch_size": 8}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# The first training view without randomness: a full-image crop at the image's own size, no flip, intensity or blur.
NO_RANDOMNESS = {
    "augment.crop_scale": "[1.0,1.0]",
    "augment.crop_ratio": "[1.0,1.0]",
    "augment.hflip": 0.0,
    "augment.intensity_prob": 0.0,
    "augment.blur_prob": 0.0,
}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """A timm hub snapshot (config.json + model.safetensors) of an RGB ViT trained with ImageNet normalisation."""
    torch.manual_seed(3)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **SHAPE)
    folder = tmp_path_factory.mktemp("hub")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    pretrained_cfg = {
        "input_size": [3, 32, 32],
        "mean": IMAGENET[0],
        "std": IMAGENET[1],
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": "patch_embed.proj",
    }
    config = {"architecture": ARCH, "num_classes": 0, "model_args": SHAPE, "pretrained_cfg": pretrained_cfg}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_config(tiny, tmp_path: Path, method: str, folder: Path, **extra: object):
    overrides = tiny(method, tmp_path / "run", **{"model.init": str(folder), "data.in_chans": 3, "data.img_size": 32,
                                                  "model.backbone_kwargs.patch_size": 8, "model.backbone_kwargs.depth": 1, "dino.local_crop_size": 16, **extra})  # fmt: skip
    return derive(load_config(None, overrides), world_size=1, dataset_size=64)


def source_model(folder: Path) -> torch.nn.Module:
    """The source as timm loads it, with its pretrained_cfg (the preprocessing timm derives from it)."""
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    overlay = {**cfg, "file": str(folder / "model.safetensors"), "custom_load": False}
    return timm.create_model(ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **SHAPE).eval()


@pytest.mark.parametrize(("method", "student_name"), [("dino", "student_backbone"), ("mae", "encoder")])
def test_the_first_forward_equals_the_sources_with_its_own_preprocessing(
    method, student_name, hub_folder, tiny, tmp_path
):
    cfg = run_config(tiny, tmp_path, method, hub_folder, **NO_RANDOMNESS)
    assert list(cfg.augment.mean) == IMAGENET[0] and list(cfg.augment.std) == IMAGENET[1]
    assert str(hub_folder / "config.json") in cfg.derived.normalization
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    source = source_model(hub_folder)
    with torch.no_grad():
        expected = source.forward_features(
            create_transform(**resolve_data_config({}, model=source))(Image.fromarray(pixels))[None]
        )
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255  # medfm's images: (C, H, W) in [0, 1]
        model = METHODS[method].from_config(cfg).eval()
        student = getattr(model, student_name)
        student = getattr(student, "vit", student)
        got = student.forward_features(augment_from_config(cfg)(image)[None])
        assert torch.allclose(got, expected, atol=1e-4)
        # The previous behaviour (medfm's 0.5 / 0.5 whatever the source) feeds the source other inputs.
        half = run_config(
            tiny, tmp_path, method, hub_folder, **NO_RANDOMNESS, **{"augment.mean": "[0.5]", "augment.std": "[0.5]"}
        )
        assert not torch.allclose(student.forward_features(augment_from_config(half)(image)[None]), expected, atol=1e-2)


def test_a_gray_run_of_an_rgb_source_takes_the_channel_average(hub_folder, tiny, tmp_path):
    cfg = run_config(tiny, tmp_path, "mae", hub_folder, **{"data.in_chans": 1})
    assert cfg.augment.mean == pytest.approx([sum(IMAGENET[0]) / 3]) and cfg.augment.std == pytest.approx(
        [sum(IMAGENET[1]) / 3]
    )
    assert "averaged over channels" in cfg.derived.normalization


def test_a_bare_weights_file_takes_timms_pretrained_cfg_of_the_architecture(tmp_path):
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(b"")  # only the name is looked at: the normalisation is read before any weights
    found = source_normalization(str(path), "vit_small_patch14_dinov2")
    assert (found.mean, found.std) == IMAGENET and "vit_small_patch14_dinov2.lvd142m" in found.origin
    assert source_normalization(str(path), "vit_base_patch16_224.mae").mean == IMAGENET[0]
    unknown = source_normalization(str(path), "a_model_timm_does_not_know")
    assert (unknown.mean, unknown.std) == ([0.5], [0.5]) and "default" in unknown.origin
    random_init = source_normalization(None, ARCH)
    assert (random_init.mean, random_init.std) == ([0.5], [0.5])


def test_a_normalisation_the_config_sets_is_kept(hub_folder, tiny, tmp_path):
    cfg = run_config(tiny, tmp_path, "mae", hub_folder, **{"augment.mean": "[0.2]", "augment.std": "[0.3]"})
    assert (list(cfg.augment.mean), list(cfg.augment.std)) == ([0.2], [0.3])
    assert cfg.derived.normalization == "the config (augment.mean / std)"
    with pytest.raises(ConfigError, match=r"'augment.mean': is set without augment.std"):
        run_config(tiny, tmp_path, "mae", hub_folder, **{"augment.mean": "[0.2]"})


def test_the_release_records_the_sources_normalisation_and_a_resume_keeps_it(hub_folder, tiny, tmp_path):
    overrides = tiny(
        "mae",
        tmp_path / "run",
        **{
            "model.init": str(hub_folder),
            "data.img_size": 32,
            "model.backbone_kwargs.patch_size": 8,
            "model.backbone_kwargs.depth": 1,
        },
    )
    assert pretrain(None, overrides) == 0
    release = json.loads((tmp_path / "run" / "release" / "config.json").read_text())
    expected_mean = pytest.approx([sum(IMAGENET[0]) / 3])
    assert release["pretrained_cfg"]["mean"] == expected_mean  # one gray channel: the RGB average
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert "averaged over channels" in saved.derived.normalization
    # The source's config changes after the run started; the resumed run keeps what it was trained with.
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "model.safetensors").symlink_to(hub_folder / "model.safetensors")
    config = json.loads((hub_folder / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.1, 0.1, 0.1], std=[0.9, 0.9, 0.9])
    (changed / "config.json").write_text(json.dumps(config))
    longer = [o for o in overrides if not o.startswith(("model.init=", "schedule.epochs="))]
    assert pretrain(None, [*longer, f"model.init={changed}", "schedule.epochs=2"]) == 0
    resumed = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert list(resumed.augment.mean) == expected_mean and resumed.derived.normalization == saved.derived.normalization
    release = json.loads((tmp_path / "run" / "release" / "config.json").read_text())
    assert release["pretrained_cfg"]["mean"] == expected_mean
