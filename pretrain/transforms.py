"""Medical-image augmentations on float tensors (C, H, W) in [0, 1], and the multi-view wrappers.

Deliberately absent: colour jitter, solarization and random grayscale (the natural-image recipes of SimCLR,
DINO and MoCo), which are meaningless or harmful on gray-level modalities. In their place an intensity jitter
(brightness / contrast / gamma, applied equally to all channels) mimics acquisition and windowing differences.
Blur sigmas are given at the references' 224-px images and scaled to the image size (``scale_blur_sigma``): a fixed
0.1-2 px would blur a 28-px image 8x more, relative to its content, than SimCLR / DINO blur ImageNet.
Randomness comes from torch's global generator only, so seeding it per sample makes a view reproducible
(see ``medfm.pretrain.data``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


class RandomIntensity(nn.Module):
    """Random gamma, contrast and brightness jitter of an image in [0, 1], with probability ``p``.

    gamma: exponent drawn log-uniformly in [1 / (1 + gamma), 1 + gamma]; contrast: factor in
    [1 - contrast, 1 + contrast] around the image mean; brightness: additive shift in [-brightness, brightness].
    Output clamped to [0, 1]; the same draw applies to every channel (no hue change).
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, gamma: float = 0.2, p: float = 0.8):
        super().__init__()
        self.brightness, self.contrast, self.gamma, self.p = brightness, contrast, gamma, p

    def forward(self, image: Tensor) -> Tensor:
        """(C, H, W) in [0, 1] -> (C, H, W) in [0, 1]."""
        if self.p <= 0 or float(torch.rand(())) >= self.p:
            return image
        x = image.clamp(0.0, 1.0)
        if self.gamma > 0:
            log_g = math.log1p(self.gamma)
            x = x.pow(math.exp(_uniform(-log_g, log_g)))
        if self.contrast > 0:
            mean = x.mean()
            x = (x - mean) * _uniform(1.0 - self.contrast, 1.0 + self.contrast) + mean
        if self.brightness > 0:
            x = x + _uniform(-self.brightness, self.brightness)
        return x.clamp(0.0, 1.0)


# The image side at which a configured blur sigma is given: the references' (SimCLR, DINO, DINOv2) 224-px crops.
BLUR_REFERENCE_SIZE = 224
# DINO / DINOv2's asymmetric global crops (DataAugmentationDINO, dinov2 DataAugmentationDINO, lightly's
# DINOTransform): the first always blurred, the second rarely. Their solarization of the second (p=0.2) is left
# out: gray, intensity-calibrated medical images.
ASYMMETRIC_GLOBAL_BLUR_PROBS = (1.0, 0.1)


def scale_blur_sigma(
    sigma: Sequence[float], image_size: int, reference_size: int = BLUR_REFERENCE_SIZE
) -> tuple[float, float]:
    """A [low, high] sigma range given at ``reference_size`` px, in pixels of an ``image_size``-px image: the same
    blur relative to the image (0.1-2 px at 224 -> 0.0125-0.25 px at 28)."""
    factor = image_size / reference_size
    return float(sigma[0]) * factor, float(sigma[1]) * factor


def blur_kernel_size(max_sigma: float, image_size: int) -> int:
    """Odd kernel covering +-3 sigma, smaller than the image (reflect padding needs that)."""
    size = 2 * math.ceil(3 * max_sigma) + 1
    largest = image_size - 1 if image_size % 2 == 0 else image_size - 2
    return max(3, min(size, largest))


class MedicalAugment(nn.Module):
    """One view: random resized crop -> flips -> intensity jitter -> gaussian blur -> normalize.

    Args:
        size: output side in pixels.
        scale, ratio: random-resized-crop area fraction and aspect-ratio ranges.
        hflip, vflip: flip probabilities (hflip=0 for modalities with laterality, e.g. chest X-ray).
        intensity: a ``RandomIntensity`` or None.
        blur_prob, blur_sigma: probability and sigma range (pixels of this view) of the gaussian blur.
        mean, std: per-channel normalisation (one value broadcasts to all channels).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        intensity: RandomIntensity | None = None,
        blur_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ):
        super().__init__()
        ops: list[Callable[[Tensor], Tensor]] = [
            v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)
        ]
        if hflip > 0:
            ops.append(v2.RandomHorizontalFlip(hflip))
        if vflip > 0:
            ops.append(v2.RandomVerticalFlip(vflip))
        if intensity is not None:
            ops.append(intensity)
        if blur_prob > 0:
            blur = v2.GaussianBlur(blur_kernel_size(blur_sigma[1], size), sigma=tuple(blur_sigma))
            ops.append(v2.RandomApply([blur], p=blur_prob))
        self.ops = v2.Compose(ops)
        self.mean, self.std = list(mean), list(std)

    def forward(self, image: Tensor) -> Tensor:
        """(C, H, W) float in [0, 1] -> (C, size, size), normalised."""
        x = self.ops(image)
        channels = x.shape[0]
        mean = self.mean * channels if len(self.mean) == 1 else self.mean
        std = self.std * channels if len(self.std) == 1 else self.std
        return v2.functional.normalize(x, mean, std)


class MultiView(nn.Module):
    """Several independently augmented views of one image: ``[t(image) for t in transforms]``.

    Two equal transforms give the SimCLR pair; DINO's multi-crop is ``multi_crop(global, local, n_local)``.
    """

    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]]):
        super().__init__()
        self.transforms = list(transforms)

    def forward(self, image: Tensor) -> list[Tensor]:
        """(C, H, W) -> list of len(transforms) views."""
        return [t(image) for t in self.transforms]


def multi_crop(
    global_transforms: Sequence[Callable[[Tensor], Tensor]], local_transform: Callable[[Tensor], Tensor], n_local: int
) -> MultiView:
    """DINO multi-crop (Caron et al. 2021): the global views first, then ``n_local`` local views."""
    return MultiView([*global_transforms, *([local_transform] * n_local)])


def augment_from_section(
    aug: Any,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] | None = None,
    *,
    blur_prob: float | None = None,
    blur_sigma: Sequence[float] | None = None,
) -> MedicalAugment:
    """One view's augmentation from an ``augment:`` config section (pretraining's or fine-tuning's: crop_scale,
    crop_ratio, hflip, vflip, intensity_prob, brightness, contrast, gamma, blur_prob, blur_sigma). ``scale``,
    ``blur_prob`` and ``blur_sigma`` (in pixels of the view) override the section's (DINO's local crops and
    asymmetric global crops, pretraining's size-scaled sigma)."""
    return MedicalAugment(
        size=size,
        scale=tuple(scale if scale is not None else aug.crop_scale),
        ratio=tuple(aug.crop_ratio),
        hflip=aug.hflip,
        vflip=aug.vflip,
        intensity=RandomIntensity(aug.brightness, aug.contrast, aug.gamma, p=aug.intensity_prob),
        blur_prob=aug.blur_prob if blur_prob is None else blur_prob,
        blur_sigma=tuple(aug.blur_sigma if blur_sigma is None else blur_sigma),
        mean=tuple(mean),
        std=tuple(std),
    )
