"""DICOM readers: one file (single- or multi-frame), a series of single-frame files read as a volume, and the
grouping of a folder's files into those units from a partial read of their headers (planning). Each frame's
pixels and metadata: ``medfm.data_shards.dicom_pixels``. Only an allowlist of header fields reaches
``Image2D.meta``: patient identifiers never leave these modules.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from .dicom_pixels import (
    FrameSource,
    check_windows,
    read_dataset,
    read_frames,
    skip_reason,
)
from .records import Image2D, ReadOptions, SkipInput, SkippedPart, check_pixel_budget, relative_source


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
        check_windows(options.windows)
        ds = read_dataset(self.path)
        num_frames = _declared_frames(ds)
        check_pixel_budget(_declared_values(ds), options.max_pixels, f"the file ({num_frames:,} frames)")
        names = [f"frame {i}" for i in range(num_frames)] if num_frames > 1 else [""]
        frames = [FrameSource(partial(_already_read, ds), i, name) for i, name in enumerate(names)]
        label = list(self.label) if isinstance(self.label, tuple) else self.label
        for index, image in read_frames(frames, self.source, options):
            if num_frames > 1:
                image.meta["frame"] = index
            image.label = label
            yield image


def _already_read(ds: Dataset) -> Dataset:
    return ds


def _read_slice(path: Path, max_pixels: int) -> Dataset:
    """One single-frame file of a series, within the pixel budget."""
    ds = read_dataset(path)
    check_pixel_budget(_declared_values(ds), max_pixels, "the slice")
    return ds


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
        check_windows(options.windows)
        frames = [FrameSource(partial(_read_slice, path, options.max_pixels), 0, path.name) for path in self.paths]
        for index, item in read_frames(frames, self.source, options, keep_going=True):
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
        raise skip_reason(err) from None


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


_ORIENTATION, _POSITION, _INSTANCE_NUMBER = Tag(0x0020, 0x0037), Tag(0x0020, 0x0032), Tag(0x0020, 0x0013)


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
    normal = (
        row[1] * column[2] - row[2] * column[1],
        row[2] * column[0] - row[0] * column[2],
        row[0] * column[1] - row[1] * column[0],
    )
    key = (series, rows, columns, tuple(round(value, 3) for value in orientation))
    return key, sum(p * n for p, n in zip(position, normal, strict=True)), instance


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
