"""The pixel pipeline of a DICOM frame: decode, Modality LUT, VOI LUT or window, [0, 1], MONOCHROME1 inverted; and
the allowlisted metadata of the frame. Used by the units of ``medfm.data_shards.dicom``.

The intensity pipeline follows DICOM PS3.4 Annex N.2 (Grayscale Transformations): stored values ->
Modality LUT (PS3.3 C.11.1, rescale to HU for CT) -> VOI LUT or window (PS3.3 C.11.2) -> [0, 1], with
MONOCHROME1 inverted last so that every image has bright bone. pydicom does the decoding and the LUTs;
this module only picks the parameters (including the Enhanced multi-frame functional groups, PS3.3
C.7.6.16, which pydicom's LUT functions do not read) and maps errors to :class:`SkipInput` reasons.

Only an allowlist of header fields reaches ``Image2D.meta``: patient identifiers never leave this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from medfm.data_shards.errors import ConfigError

from .records import Image2D, ReadOptions, SkipInput, SkippedPart
from .windows import (
    NAMED_WINDOWS,
    apply_window,
    foreground_fraction,
    parse_window,
    percentile_scale,
    to_pixels,
    window_label,
)

CODECS_HINT = 'pip install "medfm[codecs]"'


_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


# pixel_array returns these as RGB: pydicom converts YBR_FULL(_422), the JPEG 2000 decoders YBR_ICT/RCT.
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# Header attributes of the Modality LUT, VOI LUT and pixel measures modules copied into a frame's view.
_FRAME_ATTRIBUTES = (
    "PhotometricInterpretation", "BitsStored", "ModalityLUTSequence", "RescaleSlope", "RescaleIntercept",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "PixelSpacing", "ImagerPixelSpacing",
    "SliceThickness",
)  # fmt: skip


# Enhanced multi-frame functional group macros (PS3.3 C.7.6.16.2) and the attributes each carries.
_FUNCTIONAL_GROUPS = {
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


# Body Part Examined defined terms (DICOM PS3.16 Annex L, "Correspondence of Anatomic Region Codes and Body
# Part Examined Defined Terms"). The attribute is free text in practice and can carry anything a technologist
# typed, patient names included: only a value in this vocabulary is copied (normalised), anything else is dropped.
BODY_PARTS = frozenset(
    """ABDOMEN ABDOMENPELVIS ACJOINT ADRENAL AMNIOTICFLUID ANKLE ANUS AORTA APPENDIX ARM AXILLA BACK BILEDUCT
    BLADDER BRAIN BRAINSTEM BREAST BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST
    CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE CTSPINE
    DUODENUM EAR ELBOW ENDOMETRIUM ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER FOOT FOREARM GALLBLADDER
    HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE
    LSSPINE LUNG MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY
    PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RECTUM RIB SACRUM SCALP SCAPULA SCLERA SCROTUM
    SHOULDER SKULL SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH THORAX THUMB THYMUS THYROID
    TIBIA TLSPINE TMJ TOE TONGUE TRACHEA TSPINE UPRARM URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY WRIST
    ZYGOMA""".split()  # noqa: SIM905
)


# Modality (PS3.3 C.7.3.1.1.1) and View Position (PS3.3 C.8.11.5.1.1, C.8.32.2.1 for mammography) defined terms:
# the other free-text-able header values that reach a shard, mapped the same way (unknown modality -> "OT").
MODALITIES = frozenset(
    """AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS
    MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTPLAN
    RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC""".split()  # noqa: SIM905
)


VIEW_POSITIONS = frozenset(
    """AP PA LL RL RLD LLD RLO LLO LAT LATERAL CC MLO ML LM LMO XCCL XCCM FB SIO ISO RCC LCC RMLO LMLO""".split()  # noqa: SIM905
)


def defined_term(value: object, vocabulary: frozenset[str]) -> str | None:
    """``value`` normalised (upper case, only letters and digits) when it is in ``vocabulary``, else None."""
    term = "".join(ch for ch in str(value or "").upper() if ch.isalnum())
    return term if term in vocabulary else None


def body_part(value: object) -> str | None:
    """The Body Part Examined defined term of a header value (case, spaces, ``_`` and ``-`` ignored), or None
    when it is not one: free text never reaches a shard."""
    return defined_term(value, BODY_PARTS)


# Percentile scaling of a volume uses a strided sample of this many evenly spaced frames, so that all
# slices share one mapping (per-slice percentiles would stretch the noise of empty slices to full range).
_SAMPLE_FRAMES, _SAMPLE_STRIDE = 16, 4


# Loads one frame: (dataset holding it, frame index in that dataset).


def check_windows(windows: Sequence[str]) -> None:
    """Fail fast (ValueError, not SkipInput) on a misspelled window: it is a configuration error."""
    if not windows:
        raise ConfigError("ReadOptions.windows is empty: give at least one window")
    for name in windows:
        parse_window(name)


def read_dataset(path: Path) -> Dataset:
    """pydicom.dcmread with every failure turned into a SkipInput reason."""
    try:
        return pydicom.dcmread(path)
    except Exception as err:
        raise skip_reason(err) from None


def skip_reason(err: Exception) -> SkipInput:
    """The SkipInput for a failed header read."""
    if isinstance(err, InvalidDicomError):
        return SkipInput("not a DICOM file (no 'DICM' marker at byte 128, PS3.10 7.1)")
    if isinstance(err, OSError):
        return SkipInput(f"unreadable file: {err.strerror or err}")
    # corrupt bytes reach pydicom's parser, which can raise almost anything. The message is left out: a parser
    # error can quote a header value, i.e. patient data.
    return SkipInput(f"unreadable DICOM header ({type(err).__name__})")


@contextmanager
def naming(where: str) -> Iterator[None]:
    """Prefix SkipInput reasons raised inside with the frame or slice they concern."""
    try:
        yield
    except SkipInput as skip:
        raise SkipInput(f"{where}: {skip.reason}" if where else skip.reason) from None


@dataclass(frozen=True)
class FrameSource:
    """One frame to read: frame ``index`` of the dataset that ``load()`` returns (a multi-frame file's dataset is
    read once and shared; a series slice's file is read when its turn comes); ``name`` prefixes its skip reasons."""

    load: Callable[[], Dataset]
    index: int
    name: str

    def read(self) -> tuple[Dataset, int]:
        with naming(self.name):
            return self.load(), self.index


class VolumeWindow:
    """The percentile window (``ReadOptions.percentiles``) of the frames of one unit: a single frame gets its own;
    the frames of a volume share one, from up to ``_SAMPLE_FRAMES`` frames spread through it (every
    ``_SAMPLE_STRIDE``-th pixel), so that intensities compare across slices. Computed on first use."""

    def __init__(self, frames: Sequence[FrameSource], percentiles: tuple[float, float], keep_going: bool):
        self.frames, self.percentiles, self.keep_going = frames, percentiles, keep_going
        self.shared: tuple[float, float] | None = None

    def __call__(self, values: np.ndarray) -> tuple[float, float]:
        if len(self.frames) == 1:
            return _percentile_window(values, self.percentiles)
        if self.shared is None:
            self.shared = _percentile_window(self._sample(values), self.percentiles)
        return self.shared

    def _sample(self, first: np.ndarray) -> np.ndarray:
        picks = np.unique(np.linspace(0, len(self.frames) - 1, min(len(self.frames), _SAMPLE_FRAMES)).round())
        sample = [first[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE].ravel()]
        for pick in picks.astype(int):
            try:
                values = _modality_values(*self.frames[pick].read())
            except SkipInput:
                if not self.keep_going:
                    raise
                continue  # an unreadable slice is reported when its turn comes
            sample.append(values[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE].ravel())
        return np.concatenate(sample)


def read_frames(
    frames: Sequence[FrameSource], source: str, options: ReadOptions, keep_going: bool = False
) -> Iterator[tuple[int, Image2D | SkippedPart]]:
    """Yield (frame index, image) for every frame kept; near-empty frames of a volume are dropped.

    ``keep_going``: a frame that cannot be read is yielded as a SkippedPart and the others are still read
    (series); otherwise it ends the unit with SkipInput (one file's frames).
    """
    is_volume = len(frames) > 1
    percentile_window = VolumeWindow(frames, options.percentiles, keep_going)
    names = [frame.name for frame in frames]
    kept, unreadable = 0, []
    for index, frame_source in enumerate(frames):
        try:
            with naming(names[index]):
                ds, frame = frame_source.load(), frame_source.index
                header = _frame_header(ds, frame)
                if str(header.get("PhotometricInterpretation", "")) in _GRAYSCALE:
                    values = _modality_values(ds, frame, header)
                    unit, window = _map_intensity(values, header, options, percentile_window)
                    bits = 16 if int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8) > 8 else 8
                else:
                    unit, window, bits = _color_unit(ds, frame), None, 8
        except SkipInput as skip:
            if not keep_going:
                raise
            unreadable.append(skip.reason.removeprefix(f"{names[index]}: "))
            yield index, SkippedPart((Path(source) / names[index]).as_posix(), unreadable[-1])
            continue
        except Exception as err:  # a fuzzed header can fail anywhere in the LUT code
            if not keep_going:
                raise
            unreadable.append(f"unreadable slice ({type(err).__name__})")
            yield index, SkippedPart((Path(source) / names[index]).as_posix(), unreadable[-1])
            continue
        if is_volume and foreground_fraction(unit) < options.min_foreground:
            continue
        pixels = to_pixels(unit, bits, options.max_side)
        meta = _meta(ds, header, source, unit.shape[:2], pixels.shape[:2])
        meta["bits"] = bits
        if window is not None:
            meta["window"] = window
        kept += 1
        yield index, Image2D(pixels=pixels, meta=meta)
    if kept == 0 and len(unreadable) == len(frames):
        raise SkipInput(f"none of the {len(frames)} slices could be read (first: {unreadable[0]})")
    if kept == 0:
        raise SkipInput(f"all {len(frames)} frames are near-empty (foreground < {options.min_foreground:g})")


def _frame_header(ds: Dataset, frame: int) -> Dataset:
    """The Modality LUT / VOI LUT / pixel measures attributes that apply to ``frame``.

    Top-level attributes first, then the Shared Functional Groups, then the frame's Per-Frame Functional
    Groups: a later source overrides an earlier one (PS3.3 C.7.6.16).
    """
    header = Dataset()
    header.file_meta = ds.file_meta  # pydicom reads OW LUT data with the file's byte order
    for keyword in _FRAME_ATTRIBUTES:
        if keyword in ds:
            header[keyword] = ds[keyword]
    groups = list(ds.get("SharedFunctionalGroupsSequence") or [])[:1]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:
        for sequence, keywords in _FUNCTIONAL_GROUPS.items():
            for item in list(group.get(sequence) or [])[:1]:
                for keyword in keywords:
                    if keyword in item:
                        header[keyword] = item[keyword]
    return header


def _decode(ds: Dataset, frame: int) -> np.ndarray:
    """Stored pixel values of one frame, (H, W) or (H, W, 3); decoding failures become SkipInput."""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        # pydicom stops silently where a file is cut short: mid-header it keeps the elements read so far,
        # inside encapsulated pixel data it drops the whole dataset (with a warning).
        if len(ds) == 0 or "Rows" in ds:
            raise SkipInput("truncated DICOM: the header describes an image but the file has no Pixel Data")
        sop_class = ds.get("SOPClassUID")
        kind = f" ({sop_class.name})" if sop_class else ""
        raise SkipInput(f"DICOM without pixel data (e.g. a structured report){kind}")
    if photometric not in _GRAYSCALE + _COLOR:
        raise SkipInput(f"unsupported photometric interpretation {photometric!r}")
    try:
        return pixel_array(ds, index=frame)
    except Exception as err:  # the decoder plugins raise their own exception types
        raise SkipInput(_decode_failure(ds, err)) from None


def _decode_failure(ds: Dataset, err: Exception) -> str:
    """Reason for a pixel-data decoding failure; names the transfer syntax when it is compressed.

    pydicom raises RuntimeError both when no plugin for the syntax is installed and when every installed
    plugin failed (e.g. Pillow on 12-bit JPEG); the decoder's own availability tells the two apart.
    """
    detail = " ".join(line.strip() for line in str(err).splitlines()) or type(err).__name__
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return f"cannot decode pixel data (truncated or corrupt file?): {detail}"
    named = f"{syntax.name} ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"pixel data in {named} cannot be decoded: pydicom has no decoder for this transfer syntax"
    if not decoder.is_available:
        return f"no decoder installed for {named} pixel data: {CODECS_HINT}"
    if any(missing.startswith("pylibjpeg") for missing in decoder.missing_dependencies):
        return f"installed decoders failed on {named} pixel data ({detail}); try {CODECS_HINT}"
    return f"cannot decode {named} pixel data (truncated or corrupt file?): {detail}"


def _modality_values(ds: Dataset, frame: int, header: Dataset | None = None) -> np.ndarray:
    """Modality LUT output of one frame as float32 (H, W): HU for CT (PS3.3 C.11.1)."""
    header = _frame_header(ds, frame) if header is None else header
    return np.asarray(apply_modality_lut(_decode(ds, frame), header), dtype=np.float32)


def _percentile_window(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(center, width) of the window spanning two percentiles of ``values`` (see percentile_scale)."""
    _, (low, high) = percentile_scale(values, *percentiles)
    return (low + high) / 2, high - low


def _map_intensity(
    values: np.ndarray,
    header: Dataset,
    options: ReadOptions,
    percentile_window: Callable[[np.ndarray], tuple[float, float]],
) -> tuple[np.ndarray, str]:
    """Map modality values to [0, 1], one channel per window: (H, W) or (H, W, C) float32 and its label."""
    channels, labels = [], []
    for name in options.windows:
        window = parse_window(name)
        if name == "header" and header.get("VOILUTSequence"):
            channels.append(_apply_voi_lut_sequence(values, header))
            labels.append("header(voi-lut)")
            continue
        if name == "header" and (header_window := _header_window(header)) is not None:
            center, width, function = header_window
            channels.append(apply_window(values, center, width, function))
            labels.append(window_label("header", center, width))
        elif window is None:  # "auto", or "header" without a VOI in the file
            # LINEAR_EXACT over [lo, hi] is exactly (x - lo) / (hi - lo), clipped: percentile scaling.
            center, width = percentile_window(values)
            channels.append(apply_window(values, center, width, "LINEAR_EXACT"))
            labels.append("p{:g}-{:g}".format(*options.percentiles))
        else:
            channels.append(apply_window(values, *window))
            labels.append(window_label(name if name in NAMED_WINDOWS else "window", *window))
    unit = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    if header.PhotometricInterpretation == "MONOCHROME1":  # inverted after the VOI, PS3.3 C.7.6.3.1.2
        unit = 1.0 - unit
    return unit, "+".join(labels)


def _apply_voi_lut_sequence(values: np.ndarray, header: Dataset) -> np.ndarray:
    """First VOI LUT of the VOI LUT Sequence (PS3.3 C.11.2.1.1), normalised by the LUT's output range."""
    count, first, _ = (int(v) for v in header.VOILUTSequence[0].LUTDescriptor)
    count = count or 65536
    inputs = np.clip(np.rint(values), first, first + count - 1).astype(np.int64)
    table = apply_voi_lut(np.arange(first, first + count), header).astype(np.float32)
    low, high = float(table.min()), float(table.max())
    mapped = apply_voi_lut(inputs, header).astype(np.float32)
    return np.clip((mapped - low) / max(high - low, 1.0), 0.0, 1.0)


def _color_unit(ds: Dataset, frame: int) -> np.ndarray:
    """RGB in [0, 1], (H, W, 3): pydicom already converted YBR to RGB; palettes go through their LUT."""
    rgb = _decode(ds, frame)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(rgb, ds)
        return rgb.astype(np.float32) / np.iinfo(rgb.dtype).max
    return rgb.astype(np.float32) / float(2 ** int(ds.get("BitsStored") or 8) - 1)


def _header_window(header: Dataset) -> tuple[float, float, str] | None:
    """The first (center, width, VOI LUT Function) of the header (PS3.3 C.11.2.1.2); None if absent
    or malformed, so that "header" falls back to percentile scaling instead of failing the file."""
    try:
        center, width = (
            float(v[0] if isinstance(v, MultiValue) else v) for v in (header.WindowCenter, header.WindowWidth)
        )
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return (center, width, str(header.get("VOILUTFunction") or "LINEAR")) if width > 0 else None


def _meta(
    ds: Dataset, header: Dataset, source: str, size: tuple[int, ...], stored_size: tuple[int, ...]
) -> dict[str, Any]:
    """The allowlisted header fields (records.ALLOWED_META_KEYS); pixel spacing follows any resize."""
    meta: dict[str, Any] = {
        "modality": defined_term(ds.get("Modality"), MODALITIES) or "OT",
        "photometric": str(ds.PhotometricInterpretation),
        "source": source,
        "orig_size": [int(size[0]), int(size[1])],
    }
    if (term := body_part(ds.get("BodyPartExamined"))) is not None:
        meta["body_part"] = term
    if (view_position := defined_term(ds.get("ViewPosition"), VIEW_POSITIONS)) is not None:
        meta["view_position"] = view_position
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
    if spacing is not None and len(spacing) == 2:
        meta["pixel_spacing"] = [
            float(spacing[0]) * size[0] / stored_size[0],
            float(spacing[1]) * size[1] / stored_size[1],
        ]
    if header.get("SliceThickness") not in (None, ""):
        meta["slice_thickness"] = float(header.SliceThickness)
    for key, keyword in (("manufacturer", "Manufacturer"), ("manufacturer_model", "ManufacturerModelName")):
        if (text := device_text(ds.get(keyword))) is not None:
            meta[key] = text
    return meta


def device_text(value: Any) -> str | None:
    """A device field (LO, at most 64 characters) as printable text with spaces collapsed; None when empty.
    Bounded and printable so that a malformed header cannot put control characters or a long blob into a shard."""
    if value is None:
        return None
    text = " ".join("".join(c if c.isprintable() else " " for c in str(value)[:64]).split())
    return text or None
