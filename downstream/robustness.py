"""Corrupted copies of a test set, after MedMNIST-C (Di Salvo et al. 2024) and ImageNet-C (Hendrycks and
Dietterich 2019): clinical images come from other scanners and centres, so report the metric drop.

Each corruption takes a (C, H, W) image in [0, 1] and a severity 1-5 and is deterministic: the noise of an image
is seeded by its content, so cached features of a corrupted split stay valid. Severities follow ImageNet-C's
constants; blur sigmas are given for a 224-px image and scaled to the image side, with a floor of 0.5-1.4 px so
that 28-px images blur too.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from medfm.pretrain.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)
_NOISE_STD = (0.04, 0.06, 0.08, 0.10, 0.12)
_BLUR_SIGMA_224 = (1.0, 2.0, 3.0, 4.0, 6.0)
_BLUR_SIGMA_MIN = (0.5, 0.7, 0.9, 1.1, 1.4)  # pixels: 28-px MedMNIST images still blur
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_JPEG_QUALITY = (25, 18, 15, 10, 7)


def _content_seed(image: Tensor, salt: str) -> int:
    digest = hashlib.blake2b(
        image.detach().cpu().contiguous().numpy().tobytes(), digest_size=8, person=salt.encode()[:16]
    )
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def gaussian_noise(image: Tensor, severity: int) -> Tensor:
    generator = torch.Generator().manual_seed(_content_seed(image, f"noise{severity}"))
    noise = torch.randn(image.shape, generator=generator) * _NOISE_STD[severity - 1]
    return (image + noise).clamp(0, 1)


def gaussian_blur(image: Tensor, severity: int) -> Tensor:
    sigma = max(_BLUR_SIGMA_224[severity - 1] * image.shape[-1] / 224, _BLUR_SIGMA_MIN[severity - 1])
    size = max(3, 2 * int(np.ceil(3 * sigma)) + 1)
    size = min(size, image.shape[-1] - (1 - image.shape[-1] % 2))  # odd and not larger than the image
    return TF.gaussian_blur(image, [size, size], [sigma, sigma])


def contrast(image: Tensor, severity: int) -> Tensor:
    mean = image.mean(dim=(-2, -1), keepdim=True)
    return ((image - mean) * _CONTRAST[severity - 1] + mean).clamp(0, 1)


def jpeg(image: Tensor, severity: int) -> Tensor:
    """8-bit JPEG round trip at ImageNet-C's qualities (gray stays gray)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=_JPEG_QUALITY[severity - 1])
    decoded = np.asarray(Image.open(buffer))
    decoded = decoded[..., None] if decoded.ndim == 2 else decoded
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255


CORRUPTIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "jpeg": jpeg,
}


@dataclass(frozen=True)
class Corruption:
    """A named corruption at one severity; its repr is part of the feature-cache key."""

    name: str
    severity: int

    def __post_init__(self) -> None:
        if self.name not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {self.name!r} (known: {', '.join(CORRUPTIONS)})")
        if self.severity not in SEVERITIES:
            raise ConfigError(f"corruption severity must be in {SEVERITIES}, got {self.severity}")

    def __call__(self, image: Tensor) -> Tensor:
        """(C, H, W) in [0, 1] -> corrupted (C, H, W) in [0, 1]."""
        return CORRUPTIONS[self.name](image, self.severity)


def corruption_rows(
    robustness: Any, clean: dict[str, float], test_on: Callable[[Corruption], dict[str, float]]
) -> list[dict[str, Any]]:
    """The one corruption loop (frozen protocols and fine-tuning): each corruption x severity of the
    ``robustness`` config section, ``test_on(corruption) -> test summary`` and its drop from ``clean``."""
    rows = []
    for name in robustness.corruptions:
        for severity in robustness.severities:
            metrics = test_on(Corruption(name, severity))
            drop = {k: clean[k] - metrics[k] for k in metrics if k in clean}
            rows.append({"corruption": name, "severity": severity, "test": metrics, "drop": drop})
    return rows
