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
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.dicom import DicomFile, DicomSeries, group_dicom_files, is_dicom
from data_shards.images import IMAGE_SUFFIXES, ImageFile, NpzChunk, csv_units, imagefolder_units, npz_units
from data_shards.nifti import NiftiFile, is_nifti
from data_shards.records import InputUnit, SkipInput, relative_source


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
            raise ValueError(f"--part {text!r}: expected K/N with integers, e.g. 3/8") from None
        if not sep or not 1 <= part.index <= part.count:
            raise ValueError(f"--part {text!r}: expected K/N with 1 <= K <= N")
        return part

    def owns(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class Plan:
    """What the writer will read: ``units[i]`` came from the SOURCE argument ``origins[i]``."""

    units: list[InputUnit] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)

    def add(self, units: list, origin: str) -> None:
        self.units.extend(units)
        self.origins.extend([origin] * len(units))

    def has_dicom(self) -> bool:
        """Whether any unit is DICOM (whose paths are hashed by default: folder names carry patient names)."""
        return any(isinstance(unit, (DicomFile, DicomSeries)) for unit in self.units)

    def keep_splits(self, splits: tuple[str, ...]) -> int:
        """Drop units of a split not in ``splits`` (units without a split are kept); returns how many went.

        How a pretraining pool is built from labeled sources without their val / test images leaking into it.
        """
        kept = [i for i, unit in enumerate(self.units) if getattr(unit, "split", None) in (None, *splits)]
        dropped = len(self.units) - len(kept)
        self.units = [self.units[i] for i in kept]
        self.origins = [self.origins[i] for i in kept]
        return dropped


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
        raise FileNotFoundError(f"embedded sample images missing from the installed wheels: {missing}")
    return names


def plan_sources(sources: list[str], part: Part | None = None, workers: int = 1) -> Plan:
    """Expand SOURCE arguments into units (only ``part``'s share when given; DICOM headers read by ``workers``
    processes). Raises FileNotFoundError / ValueError naming a bad SOURCE."""
    plan = Plan()
    for source in sources:
        kind, sep, rest = source.partition(":")
        if sep and kind in ("medmnist", "imagefolder", "csv", "sample") and len(kind) > 1:
            if kind == "sample":
                files = sample_files()
                plan_files(plan, files, root=files[0].parent.parent, origin="sample", part=part, workers=workers)
                continue
            path = _existing(Path(rest).expanduser(), source)
            if kind == "medmnist":
                try:
                    units = npz_units(path, path.parent)
                except SkipInput as skip:
                    units = []
                    if part is None or part.owns(path.name):
                        plan.skipped.append((path.name, skip.reason))
            elif kind == "imagefolder":
                units = imagefolder_units(path)
            else:
                units = csv_units(path)
            plan.add([u for u in units if part is None or part.owns(_unit_key(u))], source)
            continue
        path = _existing(Path(source).expanduser(), source)
        if path.is_dir():
            plan_folder(plan, path, origin=source, part=part, workers=workers)
        else:
            plan_files(plan, [path], root=path.parent, origin=source, part=part, workers=workers)
    return plan


def _unit_key(unit: InputUnit) -> str:
    """What ``Part.owns`` hashes for an entry of an npz / image folder / CSV: its name (and rows)."""
    return f"{unit.source}:{getattr(unit, 'split', '')}:{getattr(unit, 'start', '')}"


def _existing(path: Path, source: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"SOURCE {source!r}: {path} does not exist")
    return path


def plan_folder(plan: Plan, folder: Path, origin: str, part: Part | None = None, workers: int = 1) -> None:
    """Walk ``folder``; sources are named relative to its parent so that they start with the folder's name.
    With ``part``, only the files of the folders it owns are listed (their headers are read in plan_files)."""
    files: list[Path] = []
    for directory, subdirs, names in os.walk(folder):
        subdirs.sort()
        if part is not None and not part.owns(relative_source(Path(directory), folder.parent)):
            continue
        visible = [n for n in names if not n.startswith(".")]
        if not visible and not subdirs:
            plan.skipped.append((relative_source(Path(directory), folder.parent) + "/", "empty folder"))
        files.extend(Path(directory) / n for n in sorted(visible))
    plan_files(plan, files, root=folder.parent, origin=origin, workers=workers)


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


def plan_files(
    plan: Plan, files: list[Path], root: Path, origin: str, part: Part | None = None, workers: int = 1
) -> None:
    dicom_files: list[Path] = []
    units: list[InputUnit] = []
    if part is not None:
        files = [path for path in files if part.owns(relative_source(path.parent, root))]
    for path in files:
        name = path.name.lower()
        if (reason := not_regular_reason(path)) is not None:
            plan.skipped.append((relative_source(path, root), reason))
        elif is_nifti(path):
            units.append(NiftiFile(path, relative_source(path, root)))
        elif name.endswith(IMAGE_SUFFIXES):
            units.append(ImageFile(path, relative_source(path, root)))
        elif name.endswith(".npz"):
            try:
                units.extend(npz_units(path, root))
            except SkipInput as skip:
                plan.skipped.append((relative_source(path, root), skip.reason))
        elif is_dicom(path):
            dicom_files.append(path)
        else:
            plan.skipped.append(
                (relative_source(path, root), f"not a supported image file ({path.suffix or 'no suffix'})")
            )
    dicom_units, dicom_skipped = group_dicom_files(dicom_files, root, workers)
    plan.skipped.extend(dicom_skipped)
    units.extend(dicom_units)
    units.sort(key=lambda unit: unit.source)
    plan.add(units, origin)


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


def write_plan(path: Path, plan: Plan, header: dict) -> None:
    """``path``: a header line (what the plan was made from), then one line per unit and per listing skip."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps({"header": header}) + "\n")
        for unit, origin in zip(plan.units, plan.origins, strict=True):
            handle.write(json.dumps({"unit": _unit_record(unit), "origin": origin}) + "\n")
        for source, reason in plan.skipped:
            handle.write(json.dumps({"skipped": [source, reason]}) + "\n")
    os.replace(tmp, path)


def read_plan(path: Path, header: dict) -> Plan | None:
    """The plan saved by ``write_plan`` when it was made from the same ``header``; None otherwise."""
    try:
        lines = iter(path.read_text().splitlines())
        if json.loads(next(lines)).get("header") != json.loads(json.dumps(header)):
            return None
        plan = Plan()
        for line in lines:
            entry = json.loads(line)
            if "unit" in entry:
                plan.units.append(_unit_from(entry["unit"]))
                plan.origins.append(entry["origin"])
            else:
                plan.skipped.append(tuple(entry["skipped"]))
        return plan
    except (OSError, StopIteration, ValueError, KeyError, TypeError):
        return None  # a plan cut by a crash: scan again
