"""Intensity mapping: named CT windows, DICOM VOI windowing, percentile scaling, quantisation.

All functions map to float32 in [0, 1]; :func:`quantize` turns that into the stored integer image.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_windowing

from medfm.data_shards.errors import ConfigError

# Common radiology windows as (center, width) in Hounsfield units.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (80.0, 150.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "bone": (400.0, 1800.0),
}

_WINDOW_OUTPUT_MAX = 65535.0


def parse_window(name: str) -> tuple[float, float] | None:
    """Return (center, width) for a named or "CENTER/WIDTH" window; None for "header"/"auto".

    Raises ValueError naming the window when it is neither.
    """
    if name in ("header", "auto"):
        return None
    if name in NAMED_WINDOWS:
        return NAMED_WINDOWS[name]
    parts = name.split("/")
    if len(parts) == 2:
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            if width <= 0:
                raise ConfigError(f"window {name!r}: width must be > 0")
            return center, width
    known = ", ".join(sorted(NAMED_WINDOWS))
    raise ConfigError(f"unknown window {name!r}: use header, auto, one of [{known}] or CENTER/WIDTH")


def window_label(name: str, center: float, width: float) -> str:
    return f"{name}({center:g}/{width:g})"


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window ``values`` (e.g. HU) to [0, 1] following DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID).

    pydicom implements the standard's formulas; we hand it a minimal VOI module whose output range
    is [0, 65535] so that the result can be rescaled to [0, 1] exactly, whatever the source's bit depth.
    """
    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored = 16
    voi.PixelRepresentation = 0
    voi.WindowCenter = float(center)
    voi.WindowWidth = max(float(width), 1.0) if function.upper() == "LINEAR" else float(width)
    voi.VOILUTFunction = function.upper()
    out = apply_windowing(np.asarray(values, dtype=np.float64), voi)
    return (out / _WINDOW_OUTPUT_MAX).astype(np.float32)


def percentile_scale(values: np.ndarray, low: float = 0.5, high: float = 99.5, mask: np.ndarray | None = None):
    """Scale to [0, 1] between two percentiles (of ``values[mask]`` when a mask is given).

    Returns (scaled float32 array, (lo, hi)). A constant image maps to zeros.
    """
    sample = values[mask] if mask is not None and mask.any() else values
    lo, hi = np.percentile(sample, [low, high]) if sample.size else (0.0, 0.0)
    if hi <= lo:
        hi = lo + 1.0
    scaled = (values.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(scaled, 0.0, 1.0, out=scaled), (float(lo), float(hi))


def quantize(unit: np.ndarray, bits: int) -> np.ndarray:
    """Map [0, 1] floats to uint8 (bits=8) or uint16 (bits=16), rounding to nearest."""
    if bits not in (8, 16):
        raise ConfigError(f"bits must be 8 or 16, got {bits}")
    top = 255.0 if bits == 8 else 65535.0
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.rint(np.clip(unit, 0.0, 1.0) * top).astype(dtype)


def foreground_fraction(unit: np.ndarray, threshold: float = 0.05) -> float:
    """Fraction of pixels brighter than ``threshold`` (of full scale): near-empty slices score ~0."""
    gray = unit if unit.ndim == 2 else unit.mean(axis=-1)
    return float((gray > threshold).mean())


def resize_max_side(unit: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale (H, W) or (H, W, C) float images so the longer side is at most ``max_side`` (antialiased)."""
    height, width = unit.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return unit
    from PIL import Image

    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    channels = [unit] if unit.ndim == 2 else [unit[..., c] for c in range(unit.shape[2])]
    resized = [
        np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32), mode="F").resize(size, Image.BILINEAR))
        for c in channels
    ]
    return resized[0] if unit.ndim == 2 else np.stack(resized, axis=-1)


def to_pixels(unit: np.ndarray, bits: int, max_side: int | None = None) -> np.ndarray:
    """The stored image: resize a [0, 1] float image to ``max_side`` and quantise it to ``bits``."""
    return quantize(resize_max_side(unit, max_side), bits)
