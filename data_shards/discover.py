"""Turn ``medfm shard`` SOURCE arguments into an ordered list of input units.

A SOURCE is a file, a folder (walked recursively, files typed by content/suffix, DICOM files grouped into
series), ``medmnist:FILE.npz``, ``imagefolder:DIR`` (labels from class folders), ``csv:FILE`` (paths and
labels), or ``sample:`` (real images shipped inside the pydicom and nibabel wheels, for demos).
The order is deterministic (sorted paths), so the same inputs always give the same shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfm.data_shards.dicom import DicomFile, DicomSeries, group_dicom_facts, group_dicom_files, header_facts, is_dicom
from medfm.data_shards.errors import ConfigError, MissingInputError, ShardError
from medfm.data_shards.images import IMAGE_SUFFIXES, ImageFile, NpzChunk, csv_units, npz_units, scan_imagefolder
from medfm.data_shards.nifti import NiftiFile, is_nifti
from medfm.data_shards.records import InputUnit, SkipInput, relative_source
from medfm.data_shards.workers import init_worker


@dataclass(frozen=True)
class Part:
    """``--part K/N``: this machine's share of the inputs, disjoint from the other N - 1 and the same on every
    machine. Inputs are assigned by a hash of their folder (a DICOM series never straddles parts, and a machine
    reads only the headers of its own folders) or, for npz / image-folder / CSV entries, of their own name."""

    index: int  # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        index, sep, count = text.partition("/")
        try:
            part = cls(int(index), int(count))
        except ValueError:
            raise ConfigError(f"--part {text!r}: expected K/N with integers, e.g. 3/8") from None
        if not sep or not 1 <= part.index <= part.count:
            raise ConfigError(f"--part {text!r}: expected K/N with 1 <= K <= N")
        return part

    def owns(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def sample_files() -> list[Path]:
    """Real CT, MR, JPEG 2000 CT, ultrasound and NIfTI images that ship inside the pydicom and nibabel wheels."""
    import nibabel
    import pydicom

    dicom_dir = Path(pydicom.__file__).parent / "data" / "test_files"
    nifti_dir = Path(nibabel.__file__).parent / "tests" / "data"
    names = [dicom_dir / n for n in ("CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm", "examples_ybr_color.dcm")]
    names += [nifti_dir / n for n in ("anatomical.nii", "example4d.nii.gz")]
    missing = [str(p) for p in names if not p.is_file()]
    if missing:
        raise MissingInputError(f"embedded sample images missing from the installed wheels: {missing}")
    return names


def _parse_source(source: str) -> tuple[str, Path | None]:
    """(kind, path) of a SOURCE argument: kind "" for a plain file or folder, path None for ``sample:``.
    Raises MissingInputError naming a SOURCE whose path does not exist."""
    kind, sep, rest = source.partition(":")
    if not (sep and kind in ("medmnist", "imagefolder", "csv", "sample") and len(kind) > 1):
        kind, rest = "", source
    if kind == "sample":
        return kind, None
    path = Path(rest).expanduser()
    if not path.exists():
        raise MissingInputError(f"SOURCE {source!r}: {path} does not exist")
    return kind, path


def check_sources(sources: list[str]) -> None:
    """Raise MissingInputError naming the first SOURCE whose path does not exist (before anything is written)."""
    for source in sources:
        _parse_source(source)


def plan_sources(sources: list[str], sink: PlanWriter, part: Part | None = None, workers: int = 1) -> None:
    """Expand SOURCE arguments into units written to ``sink`` as they are found (only ``part``'s share when
    given; DICOM headers read by ``workers`` processes). An image folder's class folders without an image are
    listed as skips. Raises MissingInputError / InputError naming a bad SOURCE (a CSV's file and lines)."""
    with _HeaderScan(workers) as scan:
        for source in sources:
            kind, path = _parse_source(source)
            if kind == "sample":
                files = sample_files()
                plan_files(sink, files, root=files[0].parent.parent, origin="sample", part=part)
            elif kind:
                if kind == "medmnist":
                    try:
                        units = npz_units(path, path.parent)
                    except SkipInput as skip:
                        units = []
                        if part is None or part.owns(path.name):
                            sink.skip(path.name, skip.reason)
                elif kind == "imagefolder":
                    tree = scan_imagefolder(path)
                    units = tree.units
                    for folder in tree.empty_class_folders:  # left out of the class indices: say so
                        if part is None or part.owns(folder):
                            sink.skip(f"{folder}/", "empty class folder (no image): not a class")
                else:
                    units = csv_units(path)
                sink.add([u for u in units if part is None or part.owns(_unit_key(u))], source)
            elif path.is_dir():
                plan_folder(sink, path, origin=source, scan=scan, part=part)
            else:
                plan_files(sink, [path], root=path.parent, origin=source, part=part)


def _unit_key(unit: InputUnit) -> str:
    """What ``Part.owns`` hashes for an entry of an npz / image folder / CSV: its name (and rows)."""
    return f"{unit.source}:{getattr(unit, 'split', '')}:{getattr(unit, 'start', '')}"


def plan_folder(sink: PlanWriter, folder: Path, origin: str, scan: _HeaderScan, part: Part | None = None) -> None:
    """Walk ``folder`` one directory at a time (depth first, in name order) and write each directory's units to
    ``sink`` as soon as its DICOM headers are read: memory holds the directories in flight, never the archive's
    file list. Sources are named relative to the folder's parent, so that they start with the folder's name.
    With ``part``, only the directories it owns are listed (the others' headers are never read)."""
    pending: deque[_Directory] = deque()
    in_flight = 0
    for directory in _walk(folder, relative_source(folder, folder.parent), part):
        if not directory.empty and not directory.unreadable:
            directory.classify()
        directory.facts = scan.submit(directory.dicom)  # written in walk order, skips included
        pending.append(directory)
        in_flight += len(directory.dicom)
        # the oldest directory is written once its headers are in; the look-ahead keeps the readers busy
        while pending and (in_flight > scan.look_ahead or len(pending) > 256 or scan.ready(pending[0].facts)):
            in_flight -= pending[0].write(sink, origin, scan)
            pending.popleft()
    while pending:
        pending.popleft().write(sink, origin, scan)


@dataclass
class _Directory:
    """One directory of a walked folder: its files by kind, then (from the header scan) its DICOM units."""

    path: Path
    name: str  # relative to the walked folder's parent
    files: list[str]  # visible file names, sorted
    empty: bool = False
    unreadable: str = ""  # why the directory could not be listed
    units: list[InputUnit] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dicom: list[Path] = field(default_factory=list)
    facts: Any = None

    def source(self, file: str) -> str:
        return _joined(self.name, file)

    def classify(self) -> None:
        for file in self.files:
            unit, reason, is_dicom_file = _classify(self.path / file, self.source(file))
            if unit is not None:
                self.units.extend(unit)
            elif reason is not None:
                self.skipped.append((self.source(file), reason))
            elif is_dicom_file:
                self.dicom.append(self.path / file)

    def write(self, sink: PlanWriter, origin: str, scan: _HeaderScan) -> int:
        """Group the DICOM files, write every unit and skip; returns how many headers it waited for."""
        if self.empty or self.unreadable:
            sink.skip(self.name + "/", self.unreadable or "empty folder")
            return 0
        dicom_units, dicom_skipped = group_dicom_facts(scan.result(self.facts), lambda path: self.source(path.name))
        self.units.extend(dicom_units)
        self.units.sort(key=lambda unit: unit.source)
        sink.add(self.units, origin)
        for source, reason in self.skipped + dicom_skipped:
            sink.skip(source, reason)
        return len(self.dicom)


def _walk(folder: Path, name: str, part: Part | None) -> Iterator[_Directory]:
    """``os.walk`` of ``folder`` in name order (symlinked directories are not followed; hidden files are left out,
    hidden directories are walked) as :class:`_Directory` records named from ``name``; a directory that cannot
    be listed comes with the reason."""

    def named(path: str) -> str:
        relative = os.path.relpath(path, folder)
        return name if relative == "." else _joined(name, Path(relative).as_posix())

    unreadable: list[OSError] = []

    def listed_unreadable() -> Iterator[_Directory]:  # os.walk reports a folder it cannot list to onerror
        while unreadable:
            error = unreadable.pop(0)
            directory = named(error.filename)
            if part is None or part.owns(directory):
                reason = f"unreadable folder: {error.strerror or type(error).__name__}"
                yield _Directory(Path(error.filename), directory, [], unreadable=reason)

    for path, subdirs, names in os.walk(folder, onerror=unreadable.append):
        yield from listed_unreadable()
        subdirs.sort()  # os.walk descends in the order left here
        directory = named(path)
        if part is not None and not part.owns(directory):
            continue
        files = sorted(n for n in names if not n.startswith("."))
        yield _Directory(Path(path), directory, files, empty=not files and not subdirs)
    yield from listed_unreadable()


def _joined(folder: str, name: str) -> str:
    """``folder/name``; just ``name`` in the SOURCE folder itself when it has no name of its own (``.``, ``/``)."""
    return name if folder in (".", "/", "") else f"{folder}/{name}"


def _classify(path: Path, source: str) -> tuple[list[InputUnit] | None, str | None, bool]:
    """(units, skip reason, is DICOM) of one listed file: the non-DICOM units are made here, DICOM files wait
    for the header scan."""
    name = path.name.lower()
    if (reason := not_regular_reason(path)) is not None:
        return None, reason, False
    if is_nifti(path):
        return [NiftiFile(path, source)], None, False
    if name.endswith(IMAGE_SUFFIXES):
        return [ImageFile(path, source)], None, False
    if name.endswith(".npz"):
        try:
            return npz_units(path, path.parent, source=source), None, False
        except SkipInput as skip:
            return None, skip.reason, False
    if is_dicom(path):
        return None, None, True
    return None, f"not a supported image file ({path.suffix or 'no suffix'})", False


def not_regular_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file without blocking or looping (None for a regular file): a named
    pipe would block the first read forever, a symlink loop or a dangling link has nothing behind it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:  # ELOOP (symlink loop), ENOENT (dangling link), EACCES
        return f"unreadable: {err.strerror or type(err).__name__}"
    if stat.S_ISFIFO(mode):
        return "not a regular file: a named pipe"
    if not stat.S_ISREG(mode):
        return "not a regular file (socket or device)"
    return None


def plan_files(sink: PlanWriter, files: list[Path], root: Path, origin: str, part: Part | None = None) -> None:
    """Plan explicitly listed files (a file SOURCE, ``sample:``), named relative to ``root``."""
    units: list[InputUnit] = []
    dicom_files: list[Path] = []
    if part is not None:
        files = [path for path in files if part.owns(relative_source(path.parent, root))]
    for path in files:
        source = relative_source(path, root)
        unit, reason, is_dicom_file = _classify(path, source)
        if unit is not None:
            units.extend(unit)
        elif reason is not None:
            sink.skip(source, reason)
        elif is_dicom_file:
            dicom_files.append(path)
    dicom_units, dicom_skipped = group_dicom_files(dicom_files, root)
    for source, reason in dicom_skipped:
        sink.skip(source, reason)
    sink.add(sorted(units + dicom_units, key=lambda unit: unit.source), origin)


class _HeaderScan:
    """DICOM header reads for planning: in ``workers`` reader processes (started at the first header, dying with
    this one), in chunks, results taken in submission order; in this process for one worker."""

    CHUNK = 64

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.look_ahead = max(workers, 1) * 1024  # headers in flight before the oldest directory is waited for

    def __enter__(self) -> _HeaderScan:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def submit(self, paths: list[Path]) -> list:
        """A handle on the ``_Facts`` of ``paths``: the facts themselves, or futures of chunks of them."""
        if self.workers <= 1 or not paths:
            return header_facts(paths)
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, initializer=init_worker, initargs=(os.getpid(), None))
        return [self.pool.submit(header_facts, paths[i : i + self.CHUNK]) for i in range(0, len(paths), self.CHUNK)]

    def ready(self, handle: list) -> bool:
        return all(not isinstance(item, Future) or item.done() for item in handle)

    def result(self, handle: list) -> list:
        return [facts for item in handle for facts in (item.result() if isinstance(item, Future) else [item])]


# --- the plan on disk: `--resume` reads it instead of scanning every header again ---------------------------------
_UNIT_TYPES = {cls.__name__: cls for cls in (DicomFile, DicomSeries, NiftiFile, ImageFile, NpzChunk)}


def _unit_record(unit: InputUnit) -> dict:
    record = {"type": type(unit).__name__}
    for item in dataclasses.fields(unit):
        value = getattr(unit, item.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        record[item.name] = value
    return record


def _unit_from(record: dict) -> InputUnit:
    cls = _UNIT_TYPES[record.pop("type")]
    values = {}
    for item in dataclasses.fields(cls):
        value = record[item.name]
        if item.name == "path":
            value = Path(value)
        elif item.name == "paths":
            value = tuple(Path(v) for v in value)
        elif isinstance(value, list):  # a multi-label label
            value = tuple(value)
        values[item.name] = value
    return cls(**values)


class PlanWriter:
    """Streams the plan to ``path`` (JSON lines) while it is made: a header line (what the plan is made from),
    one line per unit and per listing skip, and an ``end`` line with the totals. Written as ``path.tmp`` and
    renamed by :meth:`close`, so a plan cut by a crash is never taken for a whole one. With ``splits``, units of
    other splits are left out (units without a split are kept)."""

    def __init__(self, path: Path, header: dict, splits: tuple[str, ...] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.splits = splits
        self.units = self.skipped = self.left_out = 0
        self.has_dicom = False
        self.origins: set[str] = set()
        self._digest = hashlib.sha256()
        self._handle = open(self.tmp, "w")  # noqa: SIM115 (closed in close)
        self._handle.write(json.dumps({"header": header}) + "\n")

    def add(self, units: list[InputUnit], origin: str) -> None:
        for unit in units:
            if self.splits is not None and getattr(unit, "split", None) not in (None, *self.splits):
                self.left_out += 1
                continue
            self._handle.write(json.dumps({"unit": _unit_record(unit), "origin": origin}) + "\n")
            self._digest.update(_unit_identity(unit).encode() + b"\n")
            self.units += 1
            self.has_dicom |= isinstance(unit, (DicomFile, DicomSeries))
            self.origins.add(origin)

    def skip(self, source: str, reason: str) -> None:
        self._handle.write(json.dumps({"skipped": [source, reason]}) + "\n")
        self.skipped += 1

    def close(self) -> PlanFile:
        end = {
            "units": self.units,
            "skipped": self.skipped,
            "left_out": self.left_out,
            "has_dicom": self.has_dicom,
            "origins": sorted(self.origins),
            "digest": self._digest.hexdigest(),
        }
        self._handle.write(json.dumps({"end": end}) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.tmp, self.path)
        return PlanFile(self.path, **end)

    def abandon(self) -> None:
        self._handle.close()
        self.tmp.unlink(missing_ok=True)


def _unit_identity(unit: InputUnit) -> str:
    """What the shard writer's resume fingerprint covers of a unit: its type, source and npz rows."""
    return f"{type(unit).__name__}:{unit.source}:{getattr(unit, 'start', '')}"


@dataclass(frozen=True)
class PlanFile:
    """A complete plan on disk (see :class:`PlanWriter`); units and skips are read from it lazily."""

    path: Path
    units: int
    skipped: int
    left_out: int
    has_dicom: bool
    origins: list[str]
    digest: str  # over every unit's identity, in order

    @classmethod
    def open(cls, path: Path, header: dict) -> PlanFile | None:
        """The plan at ``path`` when it is complete and was made from the same ``header``; None otherwise."""
        try:
            with open(path, "rb") as handle:
                if json.loads(handle.readline()).get("header") != json.loads(json.dumps(header)):
                    return None
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - 2**20))
                end = json.loads(handle.read().rstrip(b"\n").rpartition(b"\n")[2])["end"]
            return cls(path, **end)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a plan from another version, or damaged: scan again

    def iter_units(self, start: int = 0) -> Iterator[tuple[int, InputUnit, str]]:
        """(index, unit, SOURCE argument it came from) from the ``start``-th unit on."""
        index = 0
        with open(self.path) as handle:
            next(handle)
            for line in handle:
                if not line.startswith('{"unit"'):
                    continue
                if index >= start:
                    entry = json.loads(line)
                    yield index, _unit_from(entry["unit"]), entry["origin"]
                index += 1
        if index != self.units:  # the journal's unit indexes would point at the wrong inputs
            raise ShardError(
                f"{self.path}: {index} units where the plan ends with {self.units}: damaged; rerun with --overwrite"
            )

    def iter_skipped(self) -> Iterator[tuple[str, str]]:
        """(source, reason) of every input skipped while listing."""
        with open(self.path) as handle:
            for line in handle:
                if line.startswith('{"skipped"'):
                    source, reason = json.loads(line)["skipped"]
                    yield source, reason
