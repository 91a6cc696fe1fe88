"""DICOM readers: one file (single- or multi-frame), a series of single-frame files read as a volume,
and the grouping of a folder's files into those units.

The intensity pipeline follows DICOM PS3.4 Annex N.2 (Grayscale Transformations): stored values ->
Modality LUT (PS3.3 C.11.1, rescale to HU for CT) -> VOI LUT or window (PS3.3 C.11.2) -> [0, 1], with
MONOCHROME1 inverted last so that every image has bright bone. pydicom does the decoding and the LUTs;
this module only picks the parameters (including the Enhanced multi-frame functional groups, PS3.3
C.7.6.16, which pydicom's LUT functions do not read) and maps errors to :class:`SkipInput` reasons.

Only an allowlist of header fields reaches ``Image2D.meta``: patient identifiers never leave this module.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.tag import Tag

from medfm.data_shards.errors import ConfigError

from .records import Image2D, ReadOptions, SkipInput, SkippedPart, check_pixel_budget, relative_source
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
_FrameLoader = Callable[[], tuple[Dataset, int]]


def is_dicom(path: Path) -> bool:
    """True for a ``.dcm``/``.dicom`` suffix or the "DICM" magic at byte 128 (PS3.10 7.1); reads 4 bytes."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomFile:
    """One DICOM file: one :class:`Image2D` per frame (``meta["frame"]`` for multi-frame files).

    Pixels: grayscale (H, W), or (H, W, C) for C > 1 windows, uint16 when BitsStored > 8 else uint8;
    colour (H, W, 3) uint8. H, W are the stored size, shrunk to ``options.max_side`` when given.
    """

    path: Path
    source: str
    label: int | tuple[int, ...] | None = None

    def read(self, options: ReadOptions) -> Iterator[Image2D]:
        _check_windows(options.windows)
        ds = _read_dataset(self.path)
        num_frames = _declared_frames(ds)
        check_pixel_budget(_declared_values(ds), options.max_pixels, f"the file ({num_frames:,} frames)")
        loaders = [lambda i=i: (ds, i) for i in range(num_frames)]
        names = [f"frame {i}" for i in range(num_frames)] if num_frames > 1 else [""]
        label = list(self.label) if isinstance(self.label, tuple) else self.label
        for index, image in _read_frames(loaders, names, self.source, options):
            if num_frames > 1:
                image.meta["frame"] = index
            image.label = label
            yield image


@dataclass(frozen=True)
class DicomSeries:
    """Single-frame files of one series, sorted along the slice normal: one :class:`Image2D` per slice.

    Near-empty slices are dropped. A slice that cannot be read (corrupt, truncated, over the pixel budget) is
    yielded as a :class:`SkippedPart` naming it and the other slices are kept; ``slice_index`` stays the
    position in the whole sorted series, so the gap shows in the metadata. Only a series without any
    readable slice is a :class:`SkipInput`.
    """

    paths: tuple[Path, ...]
    source: str

    def read(self, options: ReadOptions) -> Iterator[Image2D | SkippedPart]:
        _check_windows(options.windows)

        def load(path: Path) -> tuple[Dataset, int]:
            ds = _read_dataset(path)
            check_pixel_budget(_declared_values(ds), options.max_pixels, "the slice")
            return ds, 0

        loaders = [lambda p=p: load(p) for p in self.paths]
        names = [path.name for path in self.paths]
        for index, item in _read_frames(loaders, names, self.source, options, keep_going=True):
            if isinstance(item, SkippedPart):
                yield item
                continue
            item.meta.update(slice_index=index, num_slices=len(self.paths))
            yield item


_Facts = tuple[Path, str | None, tuple | None, float, int, str]
# The header elements planning reads. pydicom keeps only these, and the read stops at the first element after the
# last of them (Columns, 0028,0011: elements are stored in tag order, PS3.5 7.1): the private groups, sequences
# and overlays after it are never parsed (1,031 -> ~1,300 files/s per core on MR headers, bench_shard_scale.py).
_PLANNING_TAGS = [Tag(keyword) for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber",
                  "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames", "Rows", "Columns")]  # fmt: skip
_LAST_PLANNING_TAG = int(max(_PLANNING_TAGS))


def _after_planning_tags(tag: int, vr: str | None, length: int) -> bool:
    return int(tag) > _LAST_PLANNING_TAG


def _read_planning_header(path: Path) -> Dataset:
    """The planning elements of ``path``'s header (pydicom's ``read_partial``, what ``dcmread`` runs, with a stop)."""
    try:
        with open(path, "rb") as handle:
            return read_partial(handle, stop_when=_after_planning_tags, specific_tags=_PLANNING_TAGS)
    except Exception as err:
        raise _skip_reason(err) from None


def _facts(path: Path) -> _Facts:
    """(path, skip reason, stack key, position, InstanceNumber, SOPInstanceUID) from the header alone."""
    try:
        ds = _read_planning_header(path)
    except SkipInput as skip:
        return path, skip.reason, None, 0.0, 0, ""
    try:
        key, position, instance = _stack_key(ds)
        return path, None, key, position, instance, str(ds.get("SOPInstanceUID") or path)
    except Exception:  # a malformed value (unknown VR, bad number) can fail on access: read the file alone
        return path, None, None, 0.0, 0, ""


def header_facts(paths: list[Path]) -> list[_Facts]:
    """``_facts`` of every path, in order (what one planning task of a reader process runs)."""
    return [_facts(path) for path in paths]


def group_dicom_files(paths: list[Path], root: Path) -> tuple[list[DicomFile | DicomSeries], list[tuple[str, str]]]:
    """:func:`group_dicom_facts` of ``paths``, named relative to ``root`` (headers read in this process)."""
    return group_dicom_facts(header_facts(sorted(paths)), lambda path: relative_source(path, root))


def group_dicom_facts(
    facts: Iterable[_Facts], name: Callable[[Path], str]
) -> tuple[list[DicomFile | DicomSeries], list[tuple[str, str]]]:
    """Group files into units from their headers alone (pixels are not read); ``name(path)`` is a file's source.

    Single-frame files of one folder that share SeriesInstanceUID, Rows/Columns and ImageOrientationPatient and
    have an ImagePositionPatient form one :class:`DicomSeries` when there are 2 or more of them (files in other
    folders claiming the same UID are stacked on their own, never merged into it). A series whose
    files disagree in size or orientation (a localizer inside it) is split into one stack per
    size/orientation rather than failed. Slices are sorted by position along the normal (row x column
    direction cosines, PS3.3 C.7.6.2.1.1), then InstanceNumber, then path. Several stacks in one folder
    get sources "folder#1", "folder#2", ... in path order. Copies of one instance (same SOPInstanceUID)
    are not slices of a volume: each is read as its own :class:`DicomFile` (the writer's dedup drops the
    duplicate images). Everything else is a :class:`DicomFile`.

    Returns (units sorted by source, [(source, reason)] for files that are not parsable DICOM).
    """
    units: list[DicomFile | DicomSeries] = []
    skipped: list[tuple[str, str]] = []
    # Members sort by (position, InstanceNumber, path); the SOPInstanceUID (last) tells copies apart.
    stacks: dict[tuple, list[tuple[float, int, str, Path, str]]] = defaultdict(list)
    for path, reason, key, position, instance, uid in facts:
        if reason is not None:
            skipped.append((name(path), reason))
            continue
        if key is None:
            units.append(DicomFile(path, name(path)))
        else:  # one folder per stack: a file elsewhere that claims the series' UID is not merged into it
            stacks[(str(path.parent), *key)].append((position, instance, str(path), path, uid))
    series: dict[str, list[tuple[Path, ...]]] = defaultdict(list)
    for members in stacks.values():
        copies = Counter(uid for *_, uid in members)
        slices = sorted(member for member in members if copies[member[4]] == 1)
        in_series = {member[3] for member in slices} if len(slices) >= 2 else set()
        units.extend(DicomFile(m[3], name(m[3])) for m in members if m[3] not in in_series)
        if in_series:
            ordered = tuple(member[3] for member in slices)
            folder = name(ordered[0]).rpartition("/")[0] or "."  # the stack's folder: its files share it
            series[folder].append(ordered)
    for folder, stacks_in_folder in series.items():
        stacks_in_folder.sort(key=lambda ordered: str(min(ordered)))
        for number, ordered in enumerate(stacks_in_folder, start=1):
            units.append(DicomSeries(ordered, folder if len(stacks_in_folder) == 1 else f"{folder}#{number}"))
    units.sort(key=lambda unit: unit.source)
    return units, skipped


def _stack_key(ds: Dataset) -> tuple[tuple | None, float, int]:
    """(series/size/orientation key, position along the slice normal, InstanceNumber); key None if the
    file is not a stackable slice (multi-frame, no series UID, no or malformed geometry)."""
    try:
        if _declared_frames(ds) != 1 or not ds.get("SeriesInstanceUID"):
            return None, 0.0, 0
        orientation = _decimal_strings(ds, _ORIENTATION)
        position = _decimal_strings(ds, _POSITION)
        instance = _decimal_strings(ds, _INSTANCE_NUMBER) if _INSTANCE_NUMBER in ds else []
        rows, columns, instance = int(ds.Rows), int(ds.Columns), int(instance[0]) if instance else 0
        series = str(ds.SeriesInstanceUID)
    except Exception:  # missing, malformed or unknown-VR geometry (pydicom raises many types): not stackable
        return None, 0.0, 0
    if len(orientation) != 6 or len(position) != 3 or not all(map(math.isfinite, orientation + position)):
        return None, 0.0, 0
    row, column = orientation[:3], orientation[3:]
    normal = (row[1] * column[2] - row[2] * column[1], row[2] * column[0] - row[0] * column[2],
              row[0] * column[1] - row[1] * column[0])  # fmt: skip
    key = (series, rows, columns, tuple(round(value, 3) for value in orientation))
    return key, sum(p * n for p, n in zip(position, normal, strict=True)), instance


_ORIENTATION, _POSITION, _INSTANCE_NUMBER = Tag(0x0020, 0x0037), Tag(0x0020, 0x0032), Tag(0x0020, 0x0013)


def _decimal_strings(ds: Dataset, tag: Tag) -> list[float]:
    """A DS / IS element's numbers. Read from the raw bytes while pydicom has not converted them yet: its DSfloat
    conversion is ~20 % of planning time per file. Empty: []. Raises on a malformed value, as pydicom would."""
    value = ds.get_item(tag).value
    if isinstance(value, bytes):
        value = value.rstrip(b" \x00")  # DS / IS are padded to even length with a space, some writers use NUL
        return [float(number) for number in value.split(b"\\")] if value.strip() else []
    if value is None or value == "":
        return []
    return [float(number) for number in (value if isinstance(value, MultiValue | list | tuple) else [value])]


def _declared_frames(ds: Dataset) -> int:
    """NumberOfFrames as the header states it (1 when absent or malformed; >= 1)."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except Exception:  # a malformed IS value
        return 1


def _declared_values(ds: Dataset) -> int:
    """Pixel values the header declares: Rows x Columns x SamplesPerPixel x NumberOfFrames (before decoding)."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except Exception:
        raise SkipInput("malformed Rows / Columns / SamplesPerPixel in the header") from None
    return rows * columns * max(samples, 1) * _declared_frames(ds)


def _check_windows(windows: Sequence[str]) -> None:
    """Fail fast (ValueError, not SkipInput) on a misspelled window: it is a configuration error."""
    if not windows:
        raise ConfigError("ReadOptions.windows is empty: give at least one window")
    for name in windows:
        parse_window(name)


def _read_dataset(path: Path) -> Dataset:
    """pydicom.dcmread with every failure turned into a SkipInput reason."""
    try:
        return pydicom.dcmread(path)
    except Exception as err:
        raise _skip_reason(err) from None


def _skip_reason(err: Exception) -> SkipInput:
    """The SkipInput for a failed header read."""
    if isinstance(err, InvalidDicomError):
        return SkipInput("not a DICOM file (no 'DICM' marker at byte 128, PS3.10 7.1)")
    if isinstance(err, OSError):
        return SkipInput(f"unreadable file: {err.strerror or err}")
    # corrupt bytes reach pydicom's parser, which can raise almost anything. The message is left out: a parser
    # error can quote a header value, i.e. patient data.
    return SkipInput(f"unreadable DICOM header ({type(err).__name__})")


@contextmanager
def _naming(where: str) -> Iterator[None]:
    """Prefix SkipInput reasons raised inside with the frame or slice they concern."""
    try:
        yield
    except SkipInput as skip:
        raise SkipInput(f"{where}: {skip.reason}" if where else skip.reason) from None


def _read_frames(
    loaders: Sequence[_FrameLoader],
    names: Sequence[str],
    source: str,
    options: ReadOptions,
    keep_going: bool = False,
) -> Iterator[tuple[int, Image2D | SkippedPart]]:
    """Yield (frame index, image) for every frame kept; near-empty frames of a volume are dropped.

    ``keep_going``: a frame that cannot be read is yielded as a SkippedPart and the others are still read
    (series); otherwise it ends the unit with SkipInput (one file's frames).
    """
    is_volume = len(loaders) > 1
    volume_window: tuple[float, float] | None = None

    def percentile_window(values: np.ndarray) -> tuple[float, float]:
        nonlocal volume_window
        if not is_volume:
            return _percentile_window(values, options.percentiles)
        if volume_window is None:
            picks = np.unique(np.linspace(0, len(loaders) - 1, min(len(loaders), _SAMPLE_FRAMES)).round())
            sample = [values[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE].ravel()]
            for pick in picks.astype(int):
                try:
                    with _naming(names[pick]):
                        frame_values = _modality_values(*loaders[pick]())
                except SkipInput:
                    if not keep_going:
                        raise
                    continue  # an unreadable slice is reported when its turn comes
                sample.append(frame_values[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE].ravel())
            volume_window = _percentile_window(np.concatenate(sample), options.percentiles)
        return volume_window

    kept, unreadable = 0, []
    for index, loader in enumerate(loaders):
        try:
            with _naming(names[index]):
                ds, frame = loader()
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
    if kept == 0 and len(unreadable) == len(loaders):
        raise SkipInput(f"none of the {len(loaders)} slices could be read (first: {unreadable[0]})")
    if kept == 0:
        raise SkipInput(f"all {len(loaders)} frames are near-empty (foreground < {options.min_foreground:g})")


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
