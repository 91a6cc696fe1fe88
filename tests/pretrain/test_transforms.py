"""Medical augmentations: shapes, ranges, determinism under a seed, flips off when asked, no colour ops, blur
scaled to the image size, DINO's asymmetric global crops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from medfm.pretrain.config import load_config
from medfm.pretrain.methods import METHODS
from medfm.pretrain.methods.base import augment_from_config
from medfm.pretrain.transforms import (
    MedicalAugment,
    MultiView,
    RandomIntensity,
    blur_kernel_size,
    multi_crop,
    scale_blur_sigma,
)


def ramp(channels: int = 1, size: int = 28) -> torch.Tensor:
    """A left-to-right ramp: a horizontal flip reverses it."""
    return torch.linspace(0, 1, size).expand(channels, size, size).clone()


def test_view_shape_and_normalisation():
    view = MedicalAugment(24, intensity=RandomIntensity(), mean=(0.5,), std=(0.5,))(ramp())
    assert view.shape == (1, 24, 24) and view.dtype == torch.float32
    assert float(view.min()) >= -1.0 - 1e-5 and float(view.max()) <= 1.0 + 1e-5


def test_three_channel_images_keep_three_channels():
    view = MedicalAugment(16, intensity=RandomIntensity(), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))(ramp(3))
    assert view.shape == (3, 16, 16)


def test_same_seed_same_view():
    augment = MedicalAugment(20, intensity=RandomIntensity(p=1.0), blur_prob=0.5)
    image = torch.rand(1, 28, 28)
    torch.manual_seed(3)
    first = augment(image)
    torch.manual_seed(3)
    assert torch.equal(first, augment(image))


@pytest.mark.parametrize(("hflip", "flipped"), [(0.0, False), (1.0, True)])
def test_horizontal_flip_can_be_turned_off(hflip, flipped):
    augment = MedicalAugment(28, scale=(1, 1), ratio=(1, 1), hflip=hflip, blur_prob=0.0, mean=(0,), std=(1,))
    image = ramp()
    for seed in range(10):
        torch.manual_seed(seed)
        expected = image.flip(-1) if flipped else image
        assert torch.allclose(augment(image), expected, atol=1e-5)


def test_intensity_jitter_stays_in_range_and_keeps_gray_gray():
    jitter = RandomIntensity(brightness=0.5, contrast=0.5, gamma=1.0, p=1.0)
    gray_rgb = torch.rand(1, 16, 16).expand(3, -1, -1)
    for seed in range(20):
        torch.manual_seed(seed)
        out = jitter(gray_rgb)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # no hue / colour change
    assert torch.equal(RandomIntensity(p=0.0)(gray_rgb), gray_rgb)


def test_blur_kernel_fits_small_images():
    assert blur_kernel_size(2.0, 224) == 13
    assert blur_kernel_size(2.0, 12) == 11 and blur_kernel_size(2.0, 7) == 5


def test_multi_crop_order_and_sizes():
    views = multi_crop([MedicalAugment(28)] * 2, MedicalAugment(12, scale=(0.05, 0.4)), n_local=3)(
        torch.rand(1, 28, 28)
    )
    assert [tuple(v.shape) for v in views] == [(1, 28, 28)] * 2 + [(1, 12, 12)] * 3
    assert len(MultiView([MedicalAugment(16)] * 2)(torch.rand(1, 28, 28))) == 2


COLOUR_OPS = (v2.ColorJitter, v2.RandomGrayscale, v2.RandomSolarize, v2.Grayscale, v2.RandomEqualize)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_colour_jitter_solarize_or_grayscale_in_any_method(method):
    cfg = load_config(None, [f"method={method}", "data.spec=x", "train.run_dir=x", "dino.local_crop_size=96"])
    transform = METHODS[method].build_transform(cfg)
    ops = [op for view in transform.transforms for op in view.ops.transforms]
    ops += [inner for op in ops if isinstance(op, v2.RandomApply) for inner in op.transforms]
    assert ops and not any(isinstance(op, COLOUR_OPS) for op in ops)


REPO = Path(__file__).resolve().parents[2]


def blur_of(view: MedicalAugment) -> tuple[float, v2.GaussianBlur] | None:
    """(probability, the GaussianBlur op) of a view, or None when it has no blur."""
    for op in view.ops.transforms:
        if isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], v2.GaussianBlur):
            return op.p, op.transforms[0]
    return None


def impulse_spread(view: MedicalAugment, size: int) -> float:
    """Standard deviation (px) of one bright pixel's spread along the rows after the view."""
    image = torch.zeros(1, size, size)
    image[0, size // 2, size // 2] = 1.0
    profile = view(image)[0].sum(0).double()
    profile = profile / profile.sum()
    x = torch.arange(size, dtype=torch.float64)
    mean = (profile * x).sum()
    return float((profile * (x - mean) ** 2).sum().sqrt())


@pytest.mark.parametrize(("img_size", "sigma", "kernel"), [(224, (0.1, 2.0), 13), (28, (0.0125, 0.25), 3)])
def test_blur_sigma_is_given_at_224_px_and_scaled_to_the_image(img_size, sigma, kernel):
    cfg = load_config(None, ["method=simclr", "data.spec=x", "train.run_dir=x", f"data.img_size={img_size}"])
    prob, blur = blur_of(augment_from_config(cfg))
    assert prob == 0.5 and blur.sigma == pytest.approx(sigma) and blur.kernel_size == (kernel, kernel)
    assert scale_blur_sigma((0.1, 2.0), 96) == pytest.approx((0.1 * 96 / 224, 2.0 * 96 / 224))


def test_blur_spreads_an_impulse_by_the_scaled_sigma():
    """A fixed sigma of 8 px at 224 spreads a point 8 px at 224 and 1 px at 28: the same blur relative to the image."""
    keep_geometry = [
        "augment.crop_scale=[1,1]",
        "augment.crop_ratio=[1,1]",
        "augment.hflip=0",
        "augment.intensity_prob=0",
    ]
    blur_only = [
        *keep_geometry,
        "augment.blur_prob=1",
        "augment.blur_sigma=[8,8]",
        "augment.mean=[0]",
        "augment.std=[1]",
    ]
    spreads = {}
    for size in (224, 28):
        cfg = load_config(
            None, ["method=simclr", "data.spec=x", "train.run_dir=x", f"data.img_size={size}", *blur_only]
        )
        spreads[size] = impulse_spread(augment_from_config(cfg), size)
    assert spreads[224] == pytest.approx(8.0, rel=0.05) and spreads[28] == pytest.approx(1.0, rel=0.05)


def multi_crop_config(method: str, *overrides: str):
    return load_config(
        None, [f"method={method}", "data.spec=x", "train.run_dir=x", "dino.local_crop_size=96", *overrides]
    )


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_dino_global_crops_are_blurred_asymmetrically(method):
    views = METHODS[method].build_transform(multi_crop_config(method)).transforms
    blurs = [blur_of(view) for view in views]
    assert [prob for prob, _ in blurs] == [1.0, 0.1] + [0.5] * (len(views) - 2)
    # the local crops resample the image at about its pixel scale: the global crops' sigma in pixels, as DINO
    assert all(blur.sigma == pytest.approx([0.1, 2.0]) for _, blur in blurs)
    symmetric = METHODS[method].build_transform(multi_crop_config(method, "augment.asymmetric_blur=false"))
    assert [blur_of(view)[0] for view in symmetric.transforms] == [0.5] * len(views)


def test_simclr_blurs_its_views_alike_and_moco_v3_asymmetrically_as_their_references():
    views = METHODS["simclr"].build_transform(multi_crop_config("simclr")).transforms
    assert [blur_of(view)[0] for view in views] == [0.5, 0.5]  # SimCLR: p = 0.5 on both views
    views = METHODS["moco"].build_transform(multi_crop_config("moco")).transforms
    assert [blur_of(view)[0] for view in views] == [1.0, 0.1]  # MoCo v3 main_moco.py: augmentation1 / 2
    views = METHODS["moco"].build_transform(multi_crop_config("moco", "augment.asymmetric_blur=false")).transforms
    assert [blur_of(view)[0] for view in views] == [0.5, 0.5]


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_asymmetric_multi_crop_is_the_same_under_the_same_seed(method):
    transform = METHODS[method].build_transform(multi_crop_config(method))
    image = torch.rand(1, 224, 224)
    torch.manual_seed(5)
    first = transform(image)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(first, transform(image), strict=True))


@pytest.mark.parametrize("recipe", sorted((REPO / "configs/pretrain").glob("*28.yaml")), ids=lambda p: p.stem)
def test_28_px_recipes_do_not_blur(recipe):
    """SimCLR's 32-px CIFAR recipe turns blur off; at 28 px the scaled sigma (<= 0.25 px) would barely move a pixel."""
    cfg = load_config(recipe, ["train.run_dir=x"])
    views = METHODS[cfg.method].build_transform(cfg).transforms
    assert cfg.data.img_size == 28 and all(blur_of(view) is None for view in views)
