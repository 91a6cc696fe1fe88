"""Medical augmentations: shapes, ranges, determinism under a seed, flips off when asked, no colour ops."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from pretrain.config import load_config
from pretrain.methods import METHODS
from pretrain.transforms import MedicalAugment, MultiView, RandomIntensity, blur_kernel_size, multi_crop


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
