"""``auto`` teacher settings of the DINO family, derived from the data size, the global batch and the run length.

The references' numbers (65,536 prototypes, teacher temperature 0.04 -> 0.07, EMA momentum 0.996 / 0.992) are
tuned on ImageNet-1k (1.28 M images, global batch 1024, 100+ epochs). Hospital pools are often 10^3-10^5 images
and one GPU's batch is 64-256. ``auto`` (the default) follows LightlyTrain's ``resolve_auto`` of its DINOv2 method
for the data size: linear in the image count between 20k images and ImageNet's 1M, clamped at both ends:

- ``head_output_dim``: 1024 prototypes below 20k images, 2048 below 50k, 4096 below 100k, 16,384 below 200k,
  32,768 below 500k, else 65,536;
- ``teacher_temp`` (after the warm-up): 0.02 -> 0.07; ``warmup_teacher_temp``: 0.02 -> 0.04 (never above the end);
- ``warmup_teacher_temp_epochs``: 30 % of the epochs, at most 30 (the reference's 30 of 100+);
- ``momentum_teacher`` (the start of its cosine to 1): 0.99 -> 0.996,

then, for the momentum, DINO's advice for small batches ("0.9995 with batch size 256"): the EMA averages the
same number of images as at batch 1024, ``m ** (global_batch / 1024)`` (0.996 -> 0.999 at 256), but never more
than a tenth of the run's steps (nor fewer than 10), so that a short run's teacher still follows its student. What was chosen is
written into the run's config and ``derived.auto``.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

AUTO = "auto"
SMALL_DATA = 20_000  # images: at or below, the small-data end of every rule
IMAGENET_SIZE = 1_000_000  # images: at or above, the references' settings
REFERENCE_BATCH = 1024  # the global batch the references' EMA momentum is tuned for
MAX_EMA_FRACTION = 0.1  # the EMA averages at most this fraction of the run's optimizer steps
MIN_EMA_STEPS = 10  # ... and at least this many (a smoke run of a few steps: momentum 0.9, not 0)
# (upper bound on the image count, prototypes): LightlyTrain's buckets
PROTOTYPE_BUCKETS = ((20_000, 1024), (50_000, 2048), (100_000, 4096), (200_000, 16_384), (500_000, 32_768))
MAX_PROTOTYPES = 65_536


def by_data_size(images: int, small: float, large: float) -> float:
    """``small`` at <= 20k images, ``large`` at >= 1M, linear in between."""
    fraction = min(max((images - SMALL_DATA) / (IMAGENET_SIZE - SMALL_DATA), 0.0), 1.0)
    return small + fraction * (large - small)


def prototypes(images: int) -> int:
    return next((count for bound, count in PROTOTYPE_BUCKETS if images < bound), MAX_PROTOTYPES)


def teacher_temperatures(images: int) -> tuple[float, float]:
    """(warm-up start, end) of the teacher temperature."""
    end = by_data_size(images, 0.02, 0.07)
    return min(end, by_data_size(images, 0.02, 0.04)), end


def warmup_epochs(epochs: float) -> float:
    return min(30.0, 0.3 * epochs)


def teacher_momentum(images: int, global_batch: int, total_steps: int) -> float:
    """The EMA momentum at the first step (see the module docstring)."""
    momentum = by_data_size(images, 0.99, 0.996) ** (global_batch / REFERENCE_BATCH)
    horizon = max(MAX_EMA_FRACTION * total_steps, MIN_EMA_STEPS)  # steps: a tenth of the run, at least 10
    return round(min(momentum, 1.0 - 1.0 / horizon), 6)


def resolve_teacher_auto(cfg: DictConfig, section: str, images: int) -> list[str]:
    """Replace ``auto`` values of ``cfg.<section>`` (after ``derive_steps``); returns ``key=value`` for each."""
    d, derived = cfg[section], cfg.derived
    warmup_temp, temp = teacher_temperatures(images)
    rules: dict[str, Callable[[], float | int]] = {
        "head_output_dim": lambda: prototypes(images),
        "teacher_temp": lambda: round(temp, 6),
        "warmup_teacher_temp": lambda: round(warmup_temp, 6),
        "warmup_teacher_temp_epochs": lambda: round(warmup_epochs(cfg.schedule.epochs), 6),
        "momentum_teacher": lambda: teacher_momentum(images, derived.global_batch, derived.total_steps),
    }
    chosen = []
    for key, rule in rules.items():
        if d[key] == AUTO:
            d[key] = rule()
            chosen.append(f"{section}.{key}={d[key]}")
    return chosen


def check_auto_numbers(section: DictConfig, need: Callable[[bool, str, str], None]) -> None:
    """Each ``auto``-able key is ``auto`` or a number in its range."""
    ranges = {
        "head_output_dim": (1, None),
        "teacher_temp": (0, None),
        "warmup_teacher_temp": (0, None),
        "warmup_teacher_temp_epochs": (0, None),
        "momentum_teacher": (0, 1),
    }
    for key, (low, high) in ranges.items():
        value = section[key]
        if value == AUTO:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        need(
            number and value >= low and (high is None or value <= high),
            key,
            f"must be 'auto' or a number in [{low}, {'inf' if high is None else high}]",
        )
        if key == "head_output_dim":
            need(float(value).is_integer(), key, "must be 'auto' or a whole number of prototypes")
