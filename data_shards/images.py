"""Readers for 2D image sources: image files, MedMNIST-style ``.npz`` arrays, ImageFolder trees and CSVs.

- :class:`ImageFile`: one PNG / JPEG / TIFF / BMP (8- or 16-bit, gray or colour) -> one :class:`Image2D`.
- :class:`NpzChunk`: rows ``[start, stop)`` of one split of a MedMNIST ``.npz``; :func:`npz_units` plans them.
- :func:`imagefolder_units`: a torchvision ``ImageFolder`` tree (optionally with split folders) -> ImageFiles;
  :func:`scan_imagefolder` also names the class folders left out for holding no image.
- :func:`csv_units`: a CSV of paths, labels and an optional split column -> ImageFile / DicomFile / NiftiFile
  units; :func:`csv_rows` keeps each unit's line and split.

A labeled source defines the task, so its labels are checked here, where the file and line are known: a missing
label (empty, ``nan``, ``NA``, ...) is an error naming the lines, never a class of its own; class indices are
contiguous (an empty class folder is left out, not a phantom class); CSV paths stay under the CSV's folder.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medfm.data_shards.errors import InputError
from medfm.data_shards.records import Image2D, InputUnit, ReadOptions, SkipInput, check_pixel_budget, relative_source
from medfm.data_shards.windows import to_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPZ_SPLITS = ("train", "val", "test")
# Split folder names an ImageFolder tree may use, normalised to train / val / test.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
CSV_PATH_COLUMNS = ("path", "image", "file")
CSV_SPLIT_COLUMN = "split"  # train / val / test, with the aliases of SPLIT_FOLDERS
CSV_SITE_COLUMN = "site"  # the centre / scanner a row comes from (the robustness index groups by it); never a label
# Cells that mean "no label": pandas' default ``na_values`` (what ``read_csv`` turns into NaN), compared in lower
# case. ``None`` and ``nan`` are what ``str()`` writes for a missing value; as class names they would add a class.
MISSING_LABELS = frozenset(
    ["", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan", "<na>", "n/a", "na", "nan",
     "null", "none"]
)  # fmt: skip
# Set to 1 to let a CSV name files outside its own folder (absolute paths, ``../``): refused by default, so that a
# CSV cannot make medfm read (and write into shards) any file the user can read, such as ../../etc/passwd.
ALLOW_OUTSIDE_ENV = "MEDFM_CSV_ALLOW_OUTSIDE"
_SHOWN_LINES = 5  # lines named in a message about several rows


class CsvError(InputError):
    """A CSV of paths and labels that cannot be used as it is (the message names the file and lines)."""


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _as_record_label(label: int | tuple[int, ...] | None) -> int | list[int] | None:
    return list(label) if isinstance(label, tuple) else label


@dataclass(frozen=True)
class ImageFile:
    """One 2D image file read with Pillow; label / class_name / split come from its folder or CSV."""

    path: Path
    source: str
    label: int | tuple[int, ...] | None = None
    class_name: str | None = None
    split: str | None = None

    def read(self, options: ReadOptions) -> Iterator[Image2D]:
        """Yield exactly one image (the first frame of a multi-frame TIFF).

        pixels: (H, W) uint16 for 16-bit / 32-bit gray sources, stretched to the full range between the
        image's own min and max (window "minmax"); (H, W) uint8 for 8-bit gray, unchanged (window "none");
        (H, W, 3) uint8 for colour, or (H, W) uint8 when all three channels are equal (gray stored as RGB,
        common for MRI JPEGs). EXIF orientation is applied. Raises SkipInput for a missing, truncated or
        non-image file.
        """
        with self._opened(options) as image:
            try:
                image.load()  # decode now: a truncated file fails here (LOAD_TRUNCATED_IMAGES stays False)
                unit, bits, window, photometric = _image_to_unit(ImageOps.exif_transpose(image))
            except (OSError, SyntaxError, ValueError) as exc:  # Pillow reports broken data with all three
                raise SkipInput(f"cannot decode image (truncated or corrupt?): {exc}") from exc
        pixels = to_pixels(unit, bits, options.max_side)
        meta = {
            "modality": "OT",
            "photometric": photometric,
            "window": window,
            "bits": bits,
            "source": self.source,
            "orig_size": [int(unit.shape[0]), int(unit.shape[1])],
        }
        if self.split is not None:
            meta["split"] = self.split
        if self.class_name is not None:
            meta["class_name"] = self.class_name
        yield Image2D(pixels=pixels, meta=meta, label=_as_record_label(self.label))

    def check_header(self, options: ReadOptions) -> None:
        """Raise SkipInput (as :meth:`read` would) when the file is missing, not an image, or declares more pixels
        than ``options.max_pixels`` or Pillow's decompression-bomb limit; only the header is read."""
        with self._opened(options):
            pass

    @contextmanager
    def _opened(self, options: ReadOptions) -> Iterator[Image.Image]:
        """The image opened (header parsed, pixel budget checked, nothing decoded yet)."""
        try:
            image = Image.open(self.path)
        except FileNotFoundError as exc:
            raise SkipInput(f"file not found: {self.path}") from exc
        except UnidentifiedImageError as exc:
            raise SkipInput(f"not an image file Pillow can identify: {self.path.name}") from exc
        except Image.DecompressionBombError as exc:  # Pillow's guard, raised from the header alone
            raise SkipInput(f"image too large: {exc}") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise SkipInput(f"cannot decode image (truncated or corrupt?): {exc}") from exc
        with image:
            width, height = image.size  # from the header: checked before decoding
            check_pixel_budget(width * height * len(image.getbands()), options.max_pixels, "the image")
            yield image


def _image_to_unit(image: Image.Image) -> tuple[np.ndarray, int, str, str]:
    """Decoded Pillow image -> ([0, 1] float32 (H, W) or (H, W, 3), bits, window, photometric)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(values)  # only float ("F") TIFFs can hold NaN / inf
        if not finite.all():
            if not finite.any():
                raise SkipInput("all pixels are NaN (or infinite)")
            values[~finite] = values[finite].min()
        lo, hi = float(values.min()), float(values.max())
        unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        return unit.astype(np.float32), 16, "minmax", "MONOCHROME2"
    if image.mode in ("1", "L", "LA", "La"):
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return gray, 8, "none", "MONOCHROME2"
    rgb = np.asarray(image.convert("RGB"))  # P, RGBA, CMYK, YCbCr, ... (alpha is dropped)
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].astype(np.float32) / 255.0, 8, "none", "MONOCHROME2"
    return rgb.astype(np.float32) / 255.0, 8, "none", "RGB"


@dataclass(frozen=True)
class NpzChunk:
    """Rows ``[start, stop)`` of ``{split}_images`` / ``{split}_labels`` in a MedMNIST-style ``.npz``.

    ``{split}_images``: (N, H, W) or (N, H, W, 3) uint8; ``{split}_labels``: (N,) or (N, 1) class indices,
    or (N, K) 0/1 multi-label. Only the chunk's rows are read from the archive, not the whole array.
    """

    path: Path
    source: str
    split: str
    start: int
    stop: int

    def read(self, options: ReadOptions) -> Iterator[Image2D]:
        """Yield one image per row: (H, W) or (H, W, 3) uint8 (bits 8), label int or list of 0/1 ints."""
        images_key, labels_key = f"{self.split}_images", f"{self.split}_labels"
        try:
            with zipfile.ZipFile(self.path) as archive:
                images = _read_npy_rows(archive, images_key, self.start, self.stop, options.max_pixels)
                labels = _read_npy_rows(archive, labels_key, self.start, self.stop)
        except FileNotFoundError as exc:
            raise SkipInput(f"file not found: {self.path}") from exc
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
            raise SkipInput(f"cannot read npz: {exc}") from exc
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise SkipInput(
                f"{images_key}: expected (N, H, W) or (N, H, W, 3) uint8, got {images.dtype} {images.shape}"
            )
        if labels.shape[0] != images.shape[0] or labels.ndim > 2:
            raise SkipInput(f"{labels_key}: shape {labels.shape} does not match {images_key} {images.shape}")
        multi_label = labels.ndim == 2 and labels.shape[1] > 1
        photometric = "RGB" if images.ndim == 4 else "MONOCHROME2"
        for offset, (pixels, label) in enumerate(zip(images, labels.reshape(len(labels), -1), strict=True)):
            meta = {
                "modality": "OT",
                "photometric": photometric,
                "bits": 8,
                "source": self.source,
                "split": self.split,
                "index": self.start + offset,
                "orig_size": [int(pixels.shape[0]), int(pixels.shape[1])],
            }
            if options.max_side is not None:
                pixels = to_pixels(pixels.astype(np.float32) / 255.0, 8, options.max_side)
            record_label = [int(v) for v in label] if multi_label else int(label[0])
            yield Image2D(pixels=np.array(pixels), meta=meta, label=record_label)


def _npy_header(member: io.BufferedIOBase) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an ``.npy`` stream, leaving it at the first data byte."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise InputError(f"unsupported .npy format version {version}")


def _member(archive: zipfile.ZipFile, key: str) -> str:
    name = f"{key}.npy"
    if name not in archive.namelist():
        keys = sorted(n.removesuffix(".npy") for n in archive.namelist())
        raise SkipInput(f"missing key {key!r} (keys: {keys})")
    return name


def _read_npy_rows(
    archive: zipfile.ZipFile, key: str, start: int, stop: int, max_values: int | None = None
) -> np.ndarray:
    """Rows ``[start, stop)`` of the C-ordered array ``key`` in an npz, seeking past the rows before them;
    SkipInput when the rows declare more than ``max_values`` values (checked before reading them)."""
    with archive.open(_member(archive, key)) as member:
        shape, fortran_order, dtype = _npy_header(member)
        if dtype.hasobject or (fortran_order and len(shape) > 1):
            raise InputError(f"{key}: object or Fortran-ordered arrays are not supported")
        if not shape or stop > shape[0]:
            raise InputError(f"{key}: rows [{start}, {stop}) out of range for shape {shape}")
        row_values = math.prod(int(n) for n in shape[1:])
        if max_values is not None:
            check_pixel_budget((stop - start) * row_values, max_values, f"{key} rows [{start}, {stop})")
        row_bytes = dtype.itemsize * row_values
        member.seek(start * row_bytes, io.SEEK_CUR)  # a deflated member decompresses forward, never whole
        data = member.read((stop - start) * row_bytes)
    if len(data) != (stop - start) * row_bytes:
        raise InputError(f"{key}: truncated data")
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))


def npz_units(path: Path, root: Path, chunk_size: int = 2048, source: str | None = None) -> list[NpzChunk]:
    """Chunks of at most ``chunk_size`` rows for every split present (train, val, test order); their source is
    ``source``, else the path relative to ``root``.

    Only the ``.npy`` headers are read. Raises SkipInput naming the problem when the file is not an npz, is
    truncated or corrupt, has no ``{split}_images`` key, or holds no image at all.
    """
    if chunk_size < 1:
        raise InputError(f"npz_units: chunk_size must be >= 1, got {chunk_size}")
    source = relative_source(path, root) if source is None else source
    units = []
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            present = [split for split in NPZ_SPLITS if f"{split}_images.npy" in names]
            if not present:
                raise SkipInput(
                    f"not a MedMNIST-style npz: no train_images / val_images / test_images key (keys: {sorted(names)[:8]})"
                )
            for split in present:
                with archive.open(f"{split}_images.npy") as member:
                    shape, _, _ = _npy_header(member)
                if not shape:
                    raise SkipInput(f"{split}_images is a scalar, not an array of images")
                units += [
                    NpzChunk(path, source, split, start, min(start + chunk_size, shape[0]))
                    for start in range(0, shape[0], chunk_size)
                ]
    except zipfile.BadZipFile:
        raise SkipInput("not an npz (zip) file, or a truncated one") from None
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # a cut or corrupt member header
        raise SkipInput(f"corrupt npz: {type(exc).__name__}: {exc}") from None
    if not units:
        raise SkipInput("npz holds no image (every *_images array is empty)")
    return units


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class ImageFolderTree:
    """An ImageFolder tree as read: its ImageFiles, and the class folders left out for holding no image."""

    units: list[ImageFile]
    empty_class_folders: list[str]  # relative to the tree, e.g. "train/effusion"


def imagefolder_units(folder: Path) -> list[ImageFile]:
    """ImageFiles of a torchvision ImageFolder tree (see :func:`scan_imagefolder`)."""
    return scan_imagefolder(folder).units


def scan_imagefolder(folder: Path) -> ImageFolderTree:
    """ImageFiles of a torchvision ImageFolder tree: ``folder/{class}/...`` or ``folder/{split}/{class}/...``.

    The split layout is used when every first-level folder is a split name (train, training, val, valid,
    validation, test, testing; any case), normalised to train / val / test. The class index is the position
    of the class name in the sorted union of the class names that hold an image in some split, so it is the same
    in every split and contiguous: a class folder without an image (torchvision would count it, giving labels 0
    and 2 and a phantom class 1) is left out and named in ``empty_class_folders`` for the caller to report.
    Files are found recursively below each class folder (as torchvision does), in train, val, test order,
    then sorted by class folder and path. Hidden files and folders (``.*``) are ignored; ``source`` is the
    path relative to ``folder``.
    Raises InputError when there is no class folder, or no image in any of them.
    """
    first_level = _subfolders(folder)
    if first_level and all(p.name.lower() in SPLIT_FOLDERS for p in first_level):
        groups = [(SPLIT_FOLDERS[p.name.lower()], c) for p in first_level for c in _subfolders(p)]
        groups.sort(key=lambda group: NPZ_SPLITS.index(group[0]))  # train, val, test; stable within a split
    else:
        groups = [(None, c) for c in first_level]
    if not groups:
        raise InputError(f"{folder}: no class folders (expected {folder}/CLASS/*.jpg or {folder}/SPLIT/CLASS/...)")
    found = [
        (split, class_dir, sorted(p for p in class_dir.rglob("*") if _is_image(p) and not _hidden_below(p, class_dir)))
        for split, class_dir in groups
    ]
    empty = [relative_source(class_dir, folder) for _, class_dir, files in found if not files]
    classes = sorted({class_dir.name for _, class_dir, files in found if files})
    if not classes:
        raise InputError(f"{folder}: no image in any class folder ({', '.join(empty[:_SHOWN_LINES])})")
    class_index = {name: i for i, name in enumerate(classes)}
    units = [
        ImageFile(
            path=p,
            source=relative_source(p, folder),
            label=class_index[class_dir.name],
            class_name=class_dir.name,
            split=split,
        )
        for split, class_dir, files in found
        for p in files
    ]
    return ImageFolderTree(units, empty)


def _hidden_below(path: Path, top: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(top).parts)


@dataclass(frozen=True)
class CsvRow:
    """One row of a CSV of paths and labels: its line in the file (the header is line 1), unit and split."""

    line: int
    unit: InputUnit
    split: str | None  # train / val / test from the split column; None without one
    site: str | None = None  # the site column's value; None without one


def csv_units(csv_path: Path, *, allow_outside: bool | None = None) -> list[InputUnit]:
    """Units (ImageFile / DicomFile / NiftiFile by file type) for the rows of a CSV (see :func:`csv_rows`)."""
    return [row.unit for row in csv_rows(csv_path, allow_outside=allow_outside)]


def csv_rows(csv_path: Path, *, allow_outside: bool | None = None) -> list[CsvRow]:
    """The rows of a CSV with a header, as units with their line and split.

    The path column is ``path``, ``image`` or ``file`` (first found, any case); paths are relative to the
    CSV's folder, or absolute inside it. A path that leaves the folder (``../``, an absolute path elsewhere) is
    refused unless ``allow_outside`` (default: the environment variable ``MEDFM_CSV_ALLOW_OUTSIDE=1``). A
    ``split`` column (train / val / test and their aliases, any case) sets each row's split (kept on ImageFiles);
    a ``site`` column (any case) names the centre or scanner of each row (``CsvRow.site``). Other columns are labels: none -> unlabeled; one -> single-label, integers (0 or more) kept as they are,
    anything else mapped to its index among the sorted unique values (and kept as class_name for images);
    several -> a multi-label tuple of 0/1 in column order. Rows whose file is missing are kept (their reader
    raises SkipInput). Files are typed by suffix: image suffixes -> ImageFile, .nii/.nii.gz -> NiftiFile,
    anything else -> DicomFile (DICOM files often have no suffix; that reader rejects non-DICOM).

    Raises CsvError naming the file and lines for: no path column, an empty path, a path outside the folder, a
    missing label (empty or ``nan`` / ``NA`` / ``None`` ..., see MISSING_LABELS: a missing label is never read
    as a class), a negative class index, a non-0/1 multi-label value, a split value other than train/val/test.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel writes a BOM
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        path_column = next((c for c in columns if c.strip().lower() in CSV_PATH_COLUMNS), None)
        if path_column is None:
            raise CsvError(f"{csv_path}: no path column (one of {CSV_PATH_COLUMNS}) in header {columns}")
        split_column = next((c for c in columns if c.strip().lower() == CSV_SPLIT_COLUMN), None)
        site_column = next((c for c in columns if c.strip().lower() == CSV_SITE_COLUMN), None)
        label_columns = [c for c in columns if c not in (path_column, split_column, site_column)]
        rows = [(reader.line_num, row) for row in reader]

    _refuse_lines(
        csv_path,
        [(line, "") for line, row in rows if not _cell(row, path_column)],
        f"empty path in column {path_column!r}",
    )
    base = csv_path.parent
    if allow_outside is None:
        allow_outside = os.environ.get(ALLOW_OUTSIDE_ENV, "") == "1"
    if not allow_outside:
        outside = [(line, _cell(row, path_column)) for line, row in rows if not _inside(_cell(row, path_column), base)]
        _refuse_lines(
            csv_path,
            outside,
            f"path outside the CSV's folder {os.path.abspath(base)} (refused; set "
            f"{ALLOW_OUTSIDE_ENV}=1 to allow absolute and ../ paths)",
        )
    for column in label_columns:
        missing = [(line, _cell(row, column)) for line, row in rows if _cell(row, column).lower() in MISSING_LABELS]
        _refuse_lines(csv_path, missing, f"no label in column {column!r} (give every row a label, or remove the row)")
    splits = [_split_of(csv_path, line, row, split_column) for line, row in rows]

    labels: list = [None] * len(rows)
    class_names: list = [None] * len(rows)
    if len(label_columns) == 1:
        column = label_columns[0]
        values = [_cell(row, column) for _, row in rows]
        if all(_is_int(v) for v in values):
            labels = [int(v) for v in values]
            negative = [(line, v) for (line, _), v in zip(rows, values, strict=True) if int(v) < 0]
            _refuse_lines(csv_path, negative, f"negative class index in column {column!r} (classes are 0, 1, ...)")
        else:
            index = {name: i for i, name in enumerate(sorted(set(values)))}
            labels = [index[v] for v in values]
            class_names = values
    elif len(label_columns) > 1:
        labels = [tuple(_binary(row[c], c, csv_path, line) for c in label_columns) for line, row in rows]

    table = []
    for (line, row), label, class_name, split in zip(rows, labels, class_names, splits, strict=True):
        path = Path(_cell(row, path_column))
        path = path if path.is_absolute() else base / path
        unit = _unit_for(path, relative_source(path, base), label, class_name)
        if split is not None and isinstance(unit, ImageFile):
            unit = dataclasses.replace(unit, split=split)
        table.append(CsvRow(line, unit, split, _cell(row, site_column) or None if site_column else None))
    return table


def _cell(row: dict, column: str) -> str:
    return (row.get(column) or "").strip()


def _inside(path: str, base: Path) -> bool:
    """Whether ``path`` (relative to ``base``, or absolute) names something below ``base``, judged on the names
    alone (``os.path`` normalisation): a symlink the folder's owner put inside the folder is followed."""
    top = os.path.abspath(base)
    full = os.path.normpath(os.path.join(top, path))
    return os.path.commonpath([top, full]) == top


def _split_of(csv_path: Path, line: int, row: dict, column: str | None) -> str | None:
    if column is None:
        return None
    value = _cell(row, column)
    split = SPLIT_FOLDERS.get(value.lower())
    if split is None:
        raise CsvError(f"{csv_path}:{line}: column {column!r} has {value!r}; expected train/val/test")
    return split


def _refuse_lines(csv_path: Path, lines: list[tuple[int, str]], problem: str) -> None:
    """CsvError naming the first lines with ``problem`` (and how many more), when there is any."""
    if not lines:
        return
    shown = ", ".join(f"{line} ({value!r})" if value else str(line) for line, value in lines[:_SHOWN_LINES])
    more = f" and {len(lines) - _SHOWN_LINES} more" if len(lines) > _SHOWN_LINES else ""
    noun = "line" if len(lines) == 1 else "lines"
    raise CsvError(f"{csv_path}: {noun} {shown}{more}: {problem}")


def _unit_for(path: Path, source: str, label: int | tuple[int, ...] | None, class_name: str | None) -> InputUnit:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageFile(path=path, source=source, label=label, class_name=class_name)
    # Lazy imports: the volume readers pull in nibabel / pydicom only when a CSV lists such files.
    from medfm.data_shards.nifti import NiftiFile, is_nifti

    if is_nifti(path):
        return NiftiFile(path=path, source=source, label=label)
    from medfm.data_shards.dicom import DicomFile

    return DicomFile(path=path, source=source, label=label)


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def _binary(value: str, column: str, csv_path: Path, line: int) -> int:
    """A multi-label cell: 0 or 1 (also written 0.0 / 1.0, as pandas does for float columns)."""
    try:
        number = float(value)
    except ValueError:
        number = None
    if number not in (0.0, 1.0):
        raise CsvError(f"{csv_path}:{line}: column {column!r} has {value!r}; multi-label values must be 0 or 1")
    return int(number)
