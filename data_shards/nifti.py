"""NIfTI reader: a 3D or 4D ``.nii`` / ``.nii.gz`` volume -> 2D slices in radiological display orientation.

Orientation. Every 3D volume is reoriented to the closest canonical RAS+ voxel order, the same transform as
``nibabel.as_closest_canonical`` (``io_orientation`` of the affine, then ``apply_orientation``), but applied
to one 3D volume at a time so that a 4D file is never loaded whole. In RAS+ the voxel index ``i`` grows to
the patient's Right, ``j`` to Anterior and ``k`` to Superior. The slicing axis is ``i`` (sagittal), ``j``
(coronal) or ``k`` (axial). The slice ``s`` keeps the two other axes in RAS order, ``s[a, b]``, and is
displayed as ``s[::-1, ::-1].T``: rows follow ``b`` reversed, columns follow ``a`` reversed. This gives

- axial (``s = vol[:, :, k]``, a=R, b=A): anterior at the top, patient's right on the image's left;
- coronal (``s = vol[:, j, :]``, a=R, b=S): superior at the top, patient's right on the image's left;
- sagittal (``s = vol[i, :, :]``, a=A, b=S): superior at the top, anterior on the image's left;

i.e. the radiological convention used by DICOM viewers. ``pixel_spacing`` is [row, col] in that grid.

Intensity (per 3D volume, i.e. per time point of a 4D file, so that all its slices share one mapping):

- CT (``nifti_intensity="ct"``, or "auto" and at least 1 % of the voxels below -500, i.e. air in HU):
  one channel per entry of ``options.windows``. Named and "CENTER/WIDTH" windows are applied in HU;
  "header"/"auto" (a NIfTI has no window) use percentile scaling over the voxels above -500 HU, so that
  the air outside the body does not set the low end.
- MR (everything else): percentile scaling with ``options.percentiles`` over the non-zero voxels, one
  channel whatever ``options.windows`` says (HU windows mean nothing for MR).

"auto" asks for 1 % of the voxels below -500 rather than the minimum alone because interpolated MR
volumes can hold a few large negative voxels (``anatomical.nii``, an SPM-normalised T1, reaches -610).

Non-finite voxels: a volume with no finite voxel is skipped; otherwise NaN / inf voxels are replaced by the
smallest finite value of the volume, silently (no metadata key records it), and slicing goes on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from medfm.data_shards.errors import ConfigError
from medfm.data_shards.records import Image2D, ReadOptions, SkipInput, check_pixel_budget
from medfm.data_shards.windows import (
    NAMED_WINDOWS,
    apply_window,
    foreground_fraction,
    parse_window,
    to_pixels,
    window_label,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Index of the slicing axis in RAS+ voxel order.
_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
_INTENSITIES = ("auto", "ct", "mr")
_HU_AIR_BOUND = -500.0
# Fraction of voxels below -500 that makes "auto" call a volume CT (see the module docstring).
_CT_AIR_FRACTION = 0.01
# Errors nibabel / numpy / gzip raise on truncated or corrupt voxel data.
_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, zlib.error)


def is_nifti(path: Path) -> bool:
    """True for a ``.nii`` or ``.nii.gz`` file name (any case); the content is not checked."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class NiftiFile:
    """One NIfTI-1/2 file, 3D (X, Y, Z) or 4D (X, Y, Z, T); yields its slices, time point by time point."""

    path: Path
    source: str
    label: int | tuple[int, ...] | None = None

    def read(self, options: ReadOptions) -> Iterator[Image2D]:
        """Yield the kept slices as :class:`Image2D`.

        pixels: (H, W) for MR or a single CT window, (H, W, C) for C CT windows; uint8 when the file stores
        uint8 voxels (the source holds no more precision than that), uint16 otherwise. Slices are taken every
        ``options.nifti_stride`` along ``options.nifti_axis`` (index order inferior -> superior, posterior ->
        anterior, left -> right); slices with a foreground fraction below ``options.min_foreground`` are left
        out. Raises SkipInput when the file cannot be read or no slice is kept; ValueError for bad options.
        """
        axis = _check_options(options)
        image = _load(self.path)
        shape = image.shape
        if len(shape) < 3:
            raise SkipInput(f"{len(shape)}D NIfTI data {shape}: expected a 3D or 4D volume")
        if len(shape) > 4:
            raise SkipInput(f"{len(shape)}D NIfTI data {shape}: only 3D and 4D volumes are supported")
        # one 3D volume is in memory at a time (4D files are read time point by time point)
        check_pixel_budget(
            math.prod(int(n) for n in shape[:3]), options.max_pixels, f"a {'x'.join(map(str, shape[:3]))} volume"
        )
        # A 4D file with a single time point is a 3D volume with a trailing singleton axis.
        time_points = [None] if len(shape) == 3 or shape[3] == 1 else list(range(shape[3]))

        orientation = nib.io_orientation(image.affine)
        zooms = np.empty(3)
        zooms[orientation[:, 0].astype(int)] = image.header.get_zooms()[:3]
        bits = 8 if image.get_data_dtype() == np.uint8 else 16
        label = list(self.label) if isinstance(self.label, tuple) else self.label

        kept = 0
        for time_index in time_points:
            # No local name for the volume: only _volume_slices holds it, so it is freed before the next time
            # point is read and at most one float32 volume is in memory.
            volume_slices = _volume_slices(_read_volume(image, time_index), orientation, zooms, axis, bits, options)
            for record in volume_slices:
                record.meta["source"] = self.source
                if time_index is not None:
                    record.meta["time_index"] = time_index
                record.label = label
                kept += 1
                yield record
        if kept == 0:
            raise SkipInput(f"all slices near-empty (foreground fraction < {options.min_foreground:g})")


def _volume_slices(
    volume: np.ndarray, orientation: np.ndarray, zooms: np.ndarray, axis: int, bits: int, options: ReadOptions
) -> Iterator[Image2D]:
    """Kept slices of one (X, Y, Z) float32 volume in file voxel order (meta without source / time_index)."""
    volume = _fill_non_finite(nib.apply_orientation(volume, orientation))
    modality, channels = _intensity_mapping(volume, options)
    window = "+".join(name for name, _ in channels)  # the DICOM reader's convention
    for slice_index in range(0, volume.shape[axis], options.nifti_stride):
        # Basic indexing gives a view (np.take would gather the slice element by element).
        display = volume[(slice(None),) * axis + (slice_index,)][::-1, ::-1].T
        mapped = [to_unit(display) for _, to_unit in channels]
        unit = mapped[0] if len(mapped) == 1 else np.stack(mapped, axis=-1)
        if foreground_fraction(unit) < options.min_foreground:
            continue
        pixels = to_pixels(unit, bits, options.max_side)
        meta = {
            "modality": modality,
            "axis": options.nifti_axis,
            "slice_index": slice_index,
            "num_slices": volume.shape[axis],
            "pixel_spacing": _pixel_spacing(zooms, axis, display.shape, pixels.shape),
            "slice_thickness": round(float(zooms[axis]), 6),
            "window": window,
            "bits": bits,
            "orig_size": [int(display.shape[0]), int(display.shape[1])],
        }
        yield Image2D(pixels=pixels, meta=meta)


def _check_options(options: ReadOptions) -> int:
    """Validate the NIfTI options (a configuration error, not a bad input) and return the axis index."""
    if options.nifti_axis not in _AXES:
        raise ConfigError(f"nifti_axis {options.nifti_axis!r}: use one of {sorted(_AXES)}")
    if options.nifti_stride < 1:
        raise ConfigError(f"nifti_stride must be >= 1, got {options.nifti_stride}")
    if options.nifti_intensity not in _INTENSITIES:
        raise ConfigError(f"nifti_intensity {options.nifti_intensity!r}: use one of {list(_INTENSITIES)}")
    for name in options.windows:
        parse_window(name)  # raises ValueError naming an unknown window
    return _AXES[options.nifti_axis]


def _load(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Open the header; voxel data stay on disk until :func:`_read_volume`."""
    try:
        # keep_file_open: one file handle for all time points, so reading a 4D .nii.gz time point after
        # time point seeks forward instead of decompressing from the start for every time point.
        image = nib.load(path, keep_file_open=True)
    except FileNotFoundError as exc:
        raise SkipInput(f"file not found: {path}") from exc
    except ImageFileError as exc:
        raise SkipInput(f"not a NIfTI file: {exc}") from exc
    except (*_READ_ERRORS, HeaderDataError) as exc:
        raise SkipInput(f"unreadable NIfTI header (truncated or corrupt file?): {exc}") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise SkipInput(f"not a NIfTI file: nibabel reads it as {type(image).__name__}")
    return image


def _read_volume(image: nib.Nifti1Image, time_index: int | None) -> np.ndarray:
    """(X, Y, Z) float32 voxel values (scl_slope / scl_inter applied) in the file's voxel order."""
    try:
        if len(image.shape) == 3:
            return image.get_fdata(dtype=np.float32, caching="unchanged")
        return np.asarray(image.dataobj[..., 0 if time_index is None else time_index], dtype=np.float32)
    except _READ_ERRORS as exc:
        raise SkipInput(f"cannot read the NIfTI voxel data (truncated or corrupt file?): {exc}") from exc


def _fill_non_finite(volume: np.ndarray) -> np.ndarray:
    """Replace NaN / inf by the smallest finite value, in place; SkipInput when no voxel is finite."""
    finite = np.isfinite(volume)
    if finite.all():
        return volume
    if not finite.any():
        raise SkipInput("all voxels are NaN (or infinite)")
    volume[~finite] = volume[finite].min()
    return volume


def _intensity_mapping(volume: np.ndarray, options: ReadOptions):
    """Decide CT or MR for this volume and return (modality, [(window label, slice -> [0, 1] float32)]).

    The functions map a displayed (H, W) slice; percentile ranges are computed here, once for the volume.
    """
    if options.nifti_intensity == "auto":
        air_fraction = np.count_nonzero(volume < _HU_AIR_BOUND) / volume.size
        is_ct = air_fraction >= _CT_AIR_FRACTION
    else:
        is_ct = options.nifti_intensity == "ct"
    low, high = options.percentiles
    if not is_ct:
        return "MR", [_percentile_channel(volume, volume != 0, low, high)]
    channels = []
    for name in options.windows:
        center_width = parse_window(name)
        if center_width is None:  # "header" / "auto": a NIfTI carries no window
            channels.append(_percentile_channel(volume, volume > _HU_AIR_BOUND, low, high))
            continue
        center, width = center_width
        label = window_label(name if name in NAMED_WINDOWS else "window", center, width)
        channels.append((label, lambda values, c=center, w=width: apply_window(values, c, w)))
    return "CT", channels


def _percentile_channel(volume: np.ndarray, mask: np.ndarray, low: float, high: float):
    """A channel scaling linearly between two percentiles of ``volume[mask]`` (of all voxels if none).

    windows.percentile_scale takes the percentiles of the array it scales; here they must come from the
    whole volume so that every slice of it gets the same mapping.
    """
    sample = volume[mask] if mask.any() else volume.ravel().copy()
    lo, hi = (float(v) for v in np.percentile(sample, [low, high], overwrite_input=True))
    del sample
    if hi <= lo:
        hi = lo + 1.0
    # LINEAR_EXACT over [lo, hi] is exactly (x - lo) / (hi - lo), clipped to [0, 1] (as in the DICOM reader).
    center, width = (lo + hi) / 2, hi - lo
    return f"p{low:g}-{high:g}", lambda values: apply_window(values, center, width, "LINEAR_EXACT")


def _pixel_spacing(zooms: np.ndarray, axis: int, display_shape, stored_shape) -> list[float]:
    """[row, col] spacing in mm of the stored image: rows follow the later RAS axis, columns the earlier."""
    first, second = (a for a in range(3) if a != axis)
    row = zooms[second] * display_shape[0] / stored_shape[0]
    col = zooms[first] * display_shape[1] / stored_shape[1]
    return [round(float(row), 6), round(float(col), 6)]
