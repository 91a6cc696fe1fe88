"""The record every reader yields, the options that steer reading, and the error for a bad input.

A reader turns one input unit (a file, a DICOM series, a chunk of an ``.npz``) into a stream of
:class:`Image2D`. Everything downstream of the readers (writer, dedup, stream) only sees these records.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# Metadata keys a record may carry. Anything else is dropped by the writer, so a reader that copies a
# header field by mistake cannot leak it into a shard (patient identifiers live in DICOM headers).
ALLOWED_META_KEYS = frozenset(
    {
        "modality",  # "CT", "MR", "DX", "US", ... ("OT" when unknown)
        "body_part",  # DICOM BodyPartExamined, upper case
        "view_position",  # DICOM ViewPosition (PA, AP, LAT) for radiographs
        "photometric",  # photometric interpretation of the source (MONOCHROME1/2, RGB, ...)
        "pixel_spacing",  # [row, col] in mm, in the stored image's pixel grid
        "slice_thickness",  # mm
        "slice_index",  # index of the slice in its sorted volume / series
        "num_slices",  # number of slices in that volume / series
        "frame",  # frame index in a multi-frame DICOM
        "time_index",  # time point in a 4D NIfTI
        "axis",  # slicing axis of a volume (axial, coronal, sagittal)
        "window",  # intensity mapping used, e.g. "lung(-600/1500)", "header(40/400)", "p0.5-99.5"
        "bits",  # 8 or 16: precision of the stored pixels
        "source",  # path relative to the input root (or a salted hash of it with --hash-paths)
        "split",  # train / val / test when the source defines splits
        "class_name",  # label name when the source has named classes
        "index",  # index of the image inside its container (npz)
        "orig_size",  # [H, W] before any resize
        # The acquiring device (DICOM Manufacturer / ManufacturerModelName): no patient data, and the scanner is a
        # site signature the robustness index (``medfm eval`` protocol robustness_index) groups by.
        "manufacturer",
        "manufacturer_model",
    }
)


@dataclass(frozen=True)
class SkippedPart:
    """Yielded by a reader, between images, for a part of its unit that could not be read (a slice of a
    series): the writer lists it in the manifest's skip list and keeps the unit's other images."""

    source: str
    reason: str


class SkipInput(Exception):
    """An input that cannot be read. The writer records ``reason`` in the manifest and moves on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Image2D:
    """One 2D image ready to be stored.

    pixels: (H, W) or (H, W, C) array, ``uint8`` or ``uint16``, intensity already mapped
        (windowed / scaled) so that 0 is black and the dtype maximum is white.
    meta: allowlisted metadata (see ``ALLOWED_META_KEYS``).
    label: class index, a list of 0/1 for multi-label, or None for unlabeled data.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    label: int | list[int] | None = None


@dataclass(frozen=True)
class ReadOptions:
    """How readers map stored intensities to images. Saved in the manifest of every shard set."""

    # Intensity windows, one output channel each: "header" (the file's VOI LUT / window, falling back
    # to percentile scaling), "auto" (percentile scaling), or a name from ``windows.NAMED_WINDOWS``
    # ("lung", "mediastinum", "brain", "bone", ...), or "CENTER/WIDTH" in HU such as "-600/1500".
    windows: tuple[str, ...] = ("header",)
    # Percentiles used by percentile scaling (MR, images without a window).
    percentiles: tuple[float, float] = (0.5, 99.5)
    # NIfTI: slicing axis in canonical RAS orientation, stride between kept slices, and how to map
    # intensities ("auto" treats a volume with values below -500 as CT in HU).
    nifti_axis: str = "axial"
    nifti_stride: int = 1
    nifti_intensity: str = "auto"  # auto | ct | mr
    # Slices (NIfTI, DICOM series) whose foreground fraction is below this are skipped as near-empty.
    min_foreground: float = 0.02
    # Resize so that the longer side is at most this many pixels (None keeps the native size).
    max_side: int | None = None
    # Largest number of pixel values (rows x columns x frames x samples) an input may declare; checked from the
    # header before any pixel is decoded, so a file claiming 2e9 frames is skipped, not allocated.
    max_pixels: int = 2**30


def check_pixel_budget(declared: int, limit: int, what: str) -> None:
    """SkipInput when a header declares more pixel values than ``limit`` (``ReadOptions.max_pixels``)."""
    if declared > limit:
        raise SkipInput(f"{what} declares {declared:,} pixel values, over the budget of {limit:,} (--max-pixels)")


def relative_source(path: Path, root: Path) -> str:
    """Path of ``path`` relative to ``root`` in POSIX form (the file name alone if outside root, or when a
    symlink loop or a broken link makes it unresolvable)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, RuntimeError, OSError):  # RuntimeError: "Symlink loop" (Python < 3.13)
        try:
            return path.absolute().relative_to(root.absolute()).as_posix()
        except ValueError:
            return path.name


class InputUnit(Protocol):
    """One unit of work for the writer: a file, a DICOM series, a chunk of an ``.npz``.

    Units are small frozen dataclasses (picklable, sent to worker processes). ``source`` is the path
    relative to the input root, used in the manifest and in each sample's metadata. ``read`` yields the
    unit's images in a deterministic order and raises :class:`SkipInput` when nothing can be read.
    """

    source: str

    def read(self, options: ReadOptions) -> Iterator[Image2D]: ...
