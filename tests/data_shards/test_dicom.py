"""Contracts of the DICOM readers, pinned on real files (../shared/data/dicom and pydicom's test files)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from medfm.data_shards.dicom import DicomFile, DicomSeries, group_dicom_files, is_dicom
from medfm.data_shards.records import ALLOWED_META_KEYS, ReadOptions, SkipInput, SkippedPart

REPO_ROOT = Path(__file__).resolve().parents[2]
# Bundled with pydicom. get_testdata_file() would try the network for files that are not bundled.
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
COVID_CT = "covid19_ny_sbu_A027284_axial_19000925-116.dcm"  # header window 40/350, HU via -1024/1
AIR = (slice(20, 40), slice(236, 276))  # room air above the patient, about -996 HU
OUTSIDE_FOV = (slice(0, 10), slice(0, 10))  # padding outside the reconstruction circle, -3024 HU


@pytest.fixture
def single(shared_data: Path) -> Path:
    return shared_data / "dicom" / "single"


@pytest.fixture
def series_dir(shared_data: Path) -> Path:
    return shared_data / "dicom" / "series" / "vs_seg_001_t1_mprage"


def pydicom_file(name: str) -> Path:
    path = PYDICOM_TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return path


def read(path: Path, **options) -> list:
    return list(DicomFile(path, path.name).read(ReadOptions(**options)))


def skip_reason(path: Path) -> str:
    with pytest.raises(SkipInput) as caught:
        read(path)
    return caught.value.reason


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Reference: the LINEAR window of PS3.3 C.11.2.1.2.1, written out, mapped to [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_is_dicom_by_suffix_or_magic(single: Path, tmp_path: Path):
    renamed = tmp_path / "scan.bin"
    shutil.copy(single / "CT_small.dcm", renamed)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "X.DICOM").write_text("hello")
    assert is_dicom(single / "CT_small.dcm") and is_dicom(renamed) and is_dicom(tmp_path / "X.DICOM")
    assert not is_dicom(tmp_path / "notes.txt")


def test_ct_rescale_to_hu_and_windows(single: Path):
    path = single / COVID_CT
    (image,) = read(path, windows=("header", "lung"))
    assert image.pixels.shape == (512, 512, 2) and image.pixels.dtype == np.uint16
    assert image.meta["window"] == "header(40/350)+lung(-600/1500)"
    assert image.meta["bits"] == 16 and image.meta["modality"] == "CT"
    header, lung = (image.pixels[..., c].astype(np.float64) / 65535 for c in range(2))
    # Air is -1000 HU: black in the 40/350 window, (-1000 + 600) / 1500 + 0.5 = 0.23 in the lung window.
    # Without the rescale (stored air is about 28) the lung window would put it near 0.92.
    assert header[AIR].max() == 0.0
    assert lung[AIR].mean() == pytest.approx(0.236, abs=0.01)
    assert lung[OUTSIDE_FOV].max() == 0.0
    # Whole-image reference: HU from slope/intercept, then the standard's LINEAR formula.
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(header, linear_window(hu, 40, 350), atol=1e-4)
    (alone,) = read(path)  # the default ("header",) gives the first channel alone
    np.testing.assert_array_equal(alone.pixels, image.pixels[..., 0])


def test_ct_small_without_window_falls_back_to_percentiles(single: Path):
    (image,) = read(single / "CT_small.dcm", windows=("header", "auto", "-600/1500"))
    assert image.pixels.shape == (128, 128, 3)
    assert image.meta["window"] == "p0.5-99.5+p0.5-99.5+window(-600/1500)"
    np.testing.assert_array_equal(image.pixels[..., 0], image.pixels[..., 1])


def test_monochrome1_is_inverted_to_the_polarity_of_monochrome2(single: Path, tmp_path: Path):
    original = single / "nih_chestxray14_DX_nofinding.dcm"
    ds = pydicom.dcmread(original)
    stored = ds.pixel_array
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (stored.max() - stored).astype(stored.dtype).tobytes()
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    (reference,), (image,) = read(original), read(inverted)
    assert image.meta["photometric"] == "MONOCHROME1" and image.meta["bits"] == 8
    assert np.abs(image.pixels.astype(int) - reference.pixels.astype(int)).max() <= 1


def test_enhanced_ct_takes_rescale_and_window_from_functional_groups(single: Path):
    path = single / "eCT_Supplemental.dcm"
    images = read(path, min_foreground=0.0)
    assert [image.meta["frame"] for image in images] == [0, 1]
    ds = pydicom.dcmread(path)
    for image, stored in zip(images, ds.pixel_array, strict=True):
        # Shared group: Pixel Value Transformation -1024/1, Frame VOI LUT 49/102, Pixel Measures 0.39 mm.
        assert image.meta["window"] == "header(49/102)"
        assert image.meta["pixel_spacing"] == pytest.approx([0.388672, 0.388672])
        assert image.meta["slice_thickness"] == 10.0
        expected = linear_window(stored.astype(np.float64) - 1024, 49, 102)
        np.testing.assert_allclose(image.pixels / 65535, expected, atol=1e-4)


def test_per_frame_functional_group_overrides_the_shared_one(single: Path, tmp_path: Path):
    ds = pydicom.dcmread(single / "eCT_Supplemental.dcm")
    window = Dataset()
    window.WindowCenter, window.WindowWidth = 40, 400
    ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence = Sequence([window])
    ds.save_as(tmp_path / "override.dcm")
    images = read(tmp_path / "override.dcm", min_foreground=0.0)
    assert [image.meta["window"] for image in images] == ["header(49/102)", "header(40/400)"]


def test_enhanced_mr_yields_every_frame_with_one_mapping_for_the_volume(single: Path):
    path = single / "emri_small.dcm"
    images = read(path, min_foreground=0.0)
    assert [image.meta["frame"] for image in images] == list(range(10))
    assert all(image.pixels.shape == (64, 64) and image.pixels.dtype == np.uint16 for image in images)
    assert {image.meta["window"] for image in images} == {"p0.5-99.5"}  # no window in the file
    assert images[0].meta["body_part"] == "HEAD"
    # Percentiles of the whole volume, not of each frame: a stored value maps to one output everywhere.
    stored = pydicom.dcmread(path).pixel_array
    pixels = np.stack([image.pixels for image in images])
    lookup = np.zeros(int(stored.max()) + 1, dtype=pixels.dtype)
    lookup[stored] = pixels
    np.testing.assert_array_equal(lookup[stored], pixels)


def test_series_is_grouped_and_read_in_slice_order(series_dir: Path):
    paths = sorted(series_dir.glob("*.dcm"))
    random.Random(0).shuffle(paths)
    units, skipped = group_dicom_files(paths, root=series_dir.parent)
    assert skipped == []
    assert len(units) == 1 and isinstance(units[0], DicomSeries)
    series = units[0]
    assert series.source == series_dir.name and len(series.paths) == 32
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in series.paths]
    assert z == sorted(z) and z[0] == pytest.approx(-26.0, abs=0.01) and z[-1] == pytest.approx(20.5, abs=0.01)
    images = list(series.read(ReadOptions(max_side=128)))
    indices = [image.meta["slice_index"] for image in images]
    assert indices == sorted(indices) and len(images) > 16
    assert {image.meta["num_slices"] for image in images} == {32}
    assert images[0].pixels.shape == (128, 128) and images[0].meta["orig_size"] == [512, 512]
    # max_side shrank 512 -> 128, so each stored pixel covers 4x the native 0.41 mm.
    assert images[0].meta["pixel_spacing"] == pytest.approx([4 * 0.41015625] * 2)


def test_planning_header_read_agrees_with_a_full_pydicom_read(series_dir: Path, single: Path, tmp_path: Path):
    """Planning stops after Columns and reads DS/IS numbers from the raw bytes (its hot path): the stack key must be
    what pydicom's own conversion of the whole header gives, and odd values must not be stackable."""
    from medfm.data_shards.dicom import _read_planning_header, _stack_key

    paths = sorted(series_dir.glob("*.dcm"))[:4] + sorted(single.glob("*.dcm"))
    for path in paths:
        full = pydicom.dcmread(path, stop_before_pixels=True)
        assert _stack_key(_read_planning_header(path)) == _stack_key(full), path.name
    ds = pydicom.dcmread(paths[0])
    for keyword, value, stackable in [
        ("InstanceNumber", "", True),
        ("InstanceNumber", "7\x00", True),
        ("ImagePositionPatient", "0\\0\\2.5\x00", True),  # NUL padding
        ("ImagePositionPatient", "1\\x\\2", False),
        ("ImagePositionPatient", "1\\2", False),
        ("ImageOrientationPatient", "nan", False),
    ]:
        copy, tag, raw = ds.copy(), Tag(keyword), value.encode()
        # a raw element: pydicom refuses to assign a malformed DS value, and writes raw bytes as they are
        copy._dict[tag] = RawDataElement(tag, None, len(raw), raw, 0, ds.original_encoding[0], True)
        copy.save_as(tmp_path / "odd.dcm", implicit_vr=True, little_endian=True)
        key, _, _ = _stack_key(_read_planning_header(tmp_path / "odd.dcm"))
        assert (key is not None) == stackable, (keyword, value)


def test_grouping_splits_odd_sizes_keeps_copies_apart_and_reports_unparsable_files(series_dir: Path, tmp_path: Path):
    folder = tmp_path / "study"
    folder.mkdir()
    slices = sorted(series_dir.glob("*.dcm"))[:4]
    for path in slices:
        shutil.copy(path, folder / path.name)
    odd = pydicom.dcmread(folder / slices[1].name)
    odd.Rows, odd.Columns = 256, 256  # grouping reads headers only, so the pixels may disagree
    odd.save_as(folder / slices[1].name)
    shutil.copy(slices[3], folder / "copy.dcm")  # same SOPInstanceUID: a duplicate, not another slice
    (folder / "x.dcm").write_text("not dicom")
    units, skipped = group_dicom_files(sorted(folder.iterdir()), root=tmp_path)
    assert skipped == [("study/x.dcm", "not a DICOM file (no 'DICM' marker at byte 128, PS3.10 7.1)")]
    assert [(type(unit).__name__, unit.source) for unit in units] == [
        ("DicomSeries", "study"),
        ("DicomFile", f"study/{slices[1].name}"),
        ("DicomFile", f"study/{slices[3].name}"),
        ("DicomFile", "study/copy.dcm"),
    ]
    assert units[0].paths == (folder / slices[0].name, folder / slices[2].name)


def test_near_empty_slices_are_dropped_from_series_but_not_from_single_files(series_dir: Path, tmp_path: Path):
    slices = sorted(series_dir.glob("*.dcm"))[14:17]  # mid-volume slices, all with anatomy
    copies = [tmp_path / path.name for path in slices]
    for path, copy in zip(slices, copies, strict=True):
        shutil.copy(path, copy)
    blank = pydicom.dcmread(copies[1])
    blank.PixelData = np.zeros_like(blank.pixel_array).tobytes()
    blank.save_as(copies[1])
    ((series,), _) = group_dicom_files(copies, root=tmp_path)
    images = list(series.read(ReadOptions(max_side=64)))
    assert [image.meta["slice_index"] for image in images] == [0, 2]
    assert len(read(copies[1], max_side=64)) == 1


def test_an_unreadable_slice_is_listed_and_its_series_keeps_the_good_ones(series_dir: Path, tmp_path: Path):
    slices = sorted(series_dir.glob("*.dcm"))[:3]
    for path in slices:
        shutil.copy(path, tmp_path / path.name)
    data = slices[1].read_bytes()
    (tmp_path / slices[1].name).write_bytes(data[: len(data) - 1000])  # the middle slice is cut short
    ((series,), _) = group_dicom_files(sorted(tmp_path.iterdir()), root=tmp_path)
    items = list(series.read(ReadOptions(min_foreground=0.0)))
    (part,) = [item for item in items if isinstance(item, SkippedPart)]
    assert part.source == slices[1].name and part.reason.startswith("cannot decode pixel data (truncated")
    images = [item for item in items if not isinstance(item, SkippedPart)]
    # the gap shows in the metadata: slice indices are positions in the whole sorted series
    assert [image.meta["slice_index"] for image in images] == [0, 2]
    assert {image.meta["num_slices"] for image in images} == {3}
    for path in slices:  # no readable slice left: the series is skipped as a whole, naming a reason
        (tmp_path / path.name).write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SkipInput, match=r"none of the 3 slices could be read \(first: cannot decode"):
        list(series.read(ReadOptions()))


def test_compressed_transfer_syntaxes_decode():
    (j2k,) = read(pydicom_file("693_J2KI.dcm"))
    assert j2k.pixels.shape == (512, 512) and j2k.pixels.dtype == np.uint16 and j2k.pixels.std() > 0
    (jpeg_ls,), (native,) = read(pydicom_file("MR_small_jpeg_ls_lossless.dcm")), read(pydicom_file("MR_small.dcm"))
    np.testing.assert_array_equal(jpeg_ls.pixels, native.pixels)
    (extended,) = read(pydicom_file("JPGExtended.dcm"))  # 12-bit JPEG: needs pylibjpeg-libjpeg
    assert extended.pixels.shape == (1024, 256) and extended.meta["bits"] == 16 and extended.pixels.std() > 0


# Runs where the codecs extra is not installed: the import of its modules fails, as in a bare install.
_WITHOUT_CODECS = """
import json, sys
from pathlib import Path
for name in ("pylibjpeg", "libjpeg", "openjpeg"):
    sys.modules[name] = None
from medfm.data_shards.dicom import DicomFile
from medfm.data_shards.records import ReadOptions, SkipInput
reasons = {}
for path in map(Path, sys.argv[1:]):
    try:
        list(DicomFile(path, path.name).read(ReadOptions()))
        reasons[path.name] = None
    except SkipInput as skip:
        reasons[path.name] = skip.reason
print(json.dumps(reasons))
"""


def test_missing_decoder_names_the_syntax_and_the_codecs_extra():
    jpeg_ls, jpeg_12bit = pydicom_file("MR_small_jpeg_ls_lossless.dcm"), pydicom_file("JPGExtended.dcm")
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CODECS, str(jpeg_ls), str(jpeg_12bit)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    reasons = json.loads(done.stdout)
    # No plugin at all for JPEG-LS; for 12-bit JPEG Pillow is installed but cannot decode it.
    assert "JPEG-LS Lossless Image Compression" in reasons[jpeg_ls.name]
    assert "JPEG Extended" in reasons[jpeg_12bit.name]
    assert all('pip install "medfm[codecs]"' in reason for reason in reasons.values())


def test_rgb_ultrasound_is_stored_as_rgb_uint8(single: Path):
    path = single / "US1_UNCR.dcm"
    (image,) = read(path, windows=("lung",))  # windows do not apply to colour
    assert image.pixels.shape == (480, 640, 3) and image.pixels.dtype == np.uint8
    np.testing.assert_array_equal(image.pixels, pydicom.dcmread(path).pixel_array)
    assert "window" not in image.meta and image.meta["photometric"] == "RGB"


def test_ybr_multiframe_is_converted_to_rgb():
    images = read(pydicom_file("examples_ybr_color.dcm"), min_foreground=0.0)
    assert len(images) == 30 and images[0].pixels.shape == (240, 320, 3)
    assert images[0].meta["photometric"] == "YBR_FULL_422"


def test_voi_lut_sequence_is_applied_and_normalised(single: Path, tmp_path: Path):
    ds = pydicom.dcmread(single / "CT_small.dcm")
    lut = Dataset()  # -160..240 HU -> 0..4095: the 40/400 soft-tissue window as a table
    lut.add_new("LUTDescriptor", "SS", [401, -160, 12])
    lut.add_new("LUTData", "US", np.round(np.linspace(0, 4095, 401)).astype(int).tolist())
    ds.VOILUTSequence = Sequence([lut])
    path = tmp_path / "voi_lut.dcm"
    ds.save_as(path)
    (image,) = read(path)
    assert image.meta["window"] == "header(voi-lut)"
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(image.pixels / 65535, linear_window(hu, 40, 400), atol=0.01)


def _copy_with(single: Path, tmp_path: Path, name: str, **changes) -> Path:
    ds = pydicom.dcmread(single / "CT_small.dcm")
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # pydicom, on the cut file
def test_bad_inputs_are_skipped_with_a_reason(single: Path, tmp_path: Path):
    data = (single / "CT_small.dcm").read_bytes()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) // 2])
    j2k = pydicom_file("693_J2KI.dcm").read_bytes()
    (tmp_path / "cut_j2k.dcm").write_bytes(j2k[:-1000])  # cut inside the encapsulated frame
    (tmp_path / "x.dcm").write_text("this is a text file\n")
    assert "truncated" in skip_reason(tmp_path / "half.dcm")
    assert "truncated" in skip_reason(tmp_path / "cut_j2k.dcm")
    assert "not a DICOM file" in skip_reason(tmp_path / "x.dcm")
    no_pixels = _copy_with(single, tmp_path, "sr.dcm", PixelData=None, Rows=None, Columns=None)
    assert skip_reason(no_pixels).startswith("DICOM without pixel data (e.g. a structured report)")
    hsv = _copy_with(single, tmp_path, "hsv.dcm", PhotometricInterpretation="HSV")
    assert skip_reason(hsv) == "unsupported photometric interpretation 'HSV'"
    assert "unreadable file" in skip_reason(tmp_path / "missing.dcm")


def test_unknown_window_is_a_configuration_error(single: Path):
    with pytest.raises(ValueError, match="unknown window 'lungs'"):
        read(single / "CT_small.dcm", windows=("lungs",))


def test_patient_identifiers_never_reach_meta(single: Path, tmp_path: Path):
    planted = {
        "PatientName": "Doe^Jane",
        "PatientID": "MRN-123456",
        "PatientBirthDate": "19610203",
        "InstitutionName": "St Example Hospital",
        "ReferringPhysicianName": "House^Gregory",
    }
    path = _copy_with(single, tmp_path, "phi.dcm", **planted)
    (image,) = read(path, windows=("header", "lung"))
    text = str(image.meta)
    for value in [*planted.values(), "Doe", "Jane", "123456", "1961", "Example", "House"]:
        assert value not in text
    assert set(image.meta) <= ALLOWED_META_KEYS
    for image in read(single / "eCT_Supplemental.dcm", min_foreground=0.0):
        assert set(image.meta) <= ALLOWED_META_KEYS


def test_the_scanner_make_and_model_are_kept_as_bounded_printable_text(single, tmp_path):
    """Manufacturer / ManufacturerModelName (no patient data) reach the metadata: the robustness index groups by
    them. A malformed value cannot put control characters or more than 64 characters into a shard."""
    (image,) = read(single / "CT_small.dcm")
    assert (image.meta["manufacturer"], image.meta["manufacturer_model"]) == ("GE MEDICAL SYSTEMS", "RHAPSODE")
    path = _copy_with(
        single, tmp_path, "device.dcm", Manufacturer="ACME\x00\n  Imaging", ManufacturerModelName="X" * 90
    )
    (image,) = read(path)
    assert image.meta["manufacturer"] == "ACME Imaging" and image.meta["manufacturer_model"] == "X" * 64
    (image,) = read(_copy_with(single, tmp_path, "none.dcm", Manufacturer=None, ManufacturerModelName=None))
    assert "manufacturer" not in image.meta and "manufacturer_model" not in image.meta
