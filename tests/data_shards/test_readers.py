"""Readers on real files from ../shared/data (see its SOURCES.md) and small files built in tmp_path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medfm.data_shards.images import ImageFile, NpzChunk, csv_rows, csv_units, imagefolder_units, npz_units
from medfm.data_shards.nifti import NiftiFile, is_nifti
from medfm.data_shards.records import ALLOWED_META_KEYS, ReadOptions, SkipInput
from medfm.data_shards.windows import apply_window, quantize

BRAIN_FOLDER = Path("imagefolder/brain_tumor_mri_4class")


def read_all(unit, **options) -> list:
    return list(unit.read(ReadOptions(**options)))


def nifti_unit(path: Path) -> NiftiFile:
    return NiftiFile(path=path, source=path.name)


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def reoriented(image: nib.Nifti1Image, axcodes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same volume stored in another voxel order (data and affine both changed)."""
    transform = nib.orientations.ornt_transform(
        nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(axcodes)
    )
    return image.as_reoriented(transform)


def assert_same_records(records, expected):
    """Same pixels and metadata, except the source (the files differ)."""
    assert len(records) == len(expected)
    for got, want in zip(records, expected, strict=True):
        np.testing.assert_array_equal(got.pixels, want.pixels)
        assert {**got.meta, "source": None} == {**want.meta, "source": None}


# ----------------------------------------------------------------------------------------------- NIfTI


def test_is_nifti():
    assert is_nifti(Path("a/b.nii")) and is_nifti(Path("b.NII.GZ"))
    assert not is_nifti(Path("b.gz")) and not is_nifti(Path("b.nii.zip"))


def test_nifti_display_orientation_is_radiological(tmp_path):
    """A block in the patient's right-anterior-superior corner shows at the top-left of every view."""
    volume = np.full((10, 12, 14), 10.0, dtype=np.float32)  # RAS voxel order: i->R, j->A, k->S
    volume[6:, 8:, 10:] = 100.0
    affine = np.diag([2.0, 3.0, 4.0, 1.0])  # anisotropic so that row / col spacing cannot be swapped
    path = save_nifti(volume, affine, tmp_path / "ras.nii")
    expected = {
        # axis: (slice index inside the block, image shape, [row, col] spacing, slice thickness)
        "axial": (12, (12, 10), [3.0, 2.0], 4.0),  # rows A->P, cols R->L
        "coronal": (10, (14, 10), [4.0, 2.0], 3.0),  # rows S->I, cols R->L
        "sagittal": (8, (14, 12), [4.0, 3.0], 2.0),  # rows S->I, cols A->P
    }
    for axis, (index, shape, spacing, thickness) in expected.items():
        records = read_all(nifti_unit(path), nifti_axis=axis, nifti_intensity="mr", min_foreground=0.0)
        record = next(r for r in records if r.meta["slice_index"] == index)
        want = np.zeros(shape, dtype=np.uint16)
        want[:4, :4] = 65535
        np.testing.assert_array_equal(record.pixels, want, err_msg=axis)
        assert record.meta["pixel_spacing"] == spacing
        assert record.meta["slice_thickness"] == thickness
        assert record.meta["orig_size"] == list(shape)


def test_nifti_slices_do_not_depend_on_stored_orientation(shared_data, tmp_path):
    """anatomical.nii (LAS) restored as LPS and as a permuted PSR order gives identical slices."""
    original = nib.load(shared_data / "nifti" / "anatomical.nii")
    # Anisotropic voxels, so that a wrong permutation of the zooms shows in the metadata.
    base = nib.Nifti1Image(np.asanyarray(original.dataobj), original.affine @ np.diag([1.0, 1.5, 2.0, 1.0]))
    base_path = tmp_path / "las.nii"
    nib.save(base, base_path)
    for codes in (("L", "P", "S"), ("P", "S", "R")):
        other = reoriented(base, codes)
        assert nib.aff2axcodes(other.affine) == codes
        other_path = tmp_path / f"{''.join(codes)}.nii"
        nib.save(other, other_path)
        for axis in ("axial", "coronal", "sagittal"):
            want = read_all(nifti_unit(base_path), nifti_axis=axis)
            assert want
            assert_same_records(read_all(nifti_unit(other_path), nifti_axis=axis), want)


def test_nifti_mr_volume_meta(shared_data):
    """chris_t1 (uint8 T1 brain, RAS, 0.88 mm): 8-bit MR slices with allowlisted metadata only."""
    records = read_all(nifti_unit(shared_data / "nifti" / "chris_t1.nii.gz"), nifti_stride=10)
    assert 15 <= len(records) <= 19  # 19 slices at stride 10, the outermost near-empty ones dropped
    for record in records:
        assert set(record.meta) <= ALLOWED_META_KEYS
        assert record.pixels.shape == (256, 188) and record.pixels.dtype == np.uint8
        assert record.meta["slice_index"] % 10 == 0
    meta = records[0].meta
    assert meta["modality"] == "MR" and meta["bits"] == 8 and meta["window"] == "p0.5-99.5"
    assert meta["axis"] == "axial" and meta["num_slices"] == 190 and "time_index" not in meta
    assert meta["pixel_spacing"] == [0.88, 0.88] and meta["slice_thickness"] == 0.88


def test_nifti_stride_and_auto_modality(shared_data):
    path = shared_data / "nifti" / "anatomical.nii"  # 33 x 41 x 25, big-endian int16, a few voxels < -500
    axial = read_all(nifti_unit(path), nifti_stride=2, min_foreground=0.0)
    assert [r.meta["slice_index"] for r in axial] == list(range(0, 25, 2))
    assert all(r.meta["num_slices"] == 25 for r in axial)
    coronal = read_all(nifti_unit(path), nifti_axis="coronal", nifti_stride=2, min_foreground=0.0)
    assert len(coronal) == 21
    # Its minimum is -610, but two voxels of interpolation undershoot do not make an MR volume CT.
    assert axial[0].meta["modality"] == "MR" and axial[0].pixels.dtype == np.uint16


def test_nifti_near_empty_slices_skipped(shared_data, tmp_path):
    original = nib.load(shared_data / "nifti" / "anatomical.nii")
    data = np.asanyarray(original.dataobj)
    padded = np.pad(data, ((0, 0), (0, 0), (5, 5)))  # 5 empty axial slices below and above
    shift = np.eye(4)
    shift[2, 3] = -5
    padded_path = save_nifti(padded, original.affine @ shift, tmp_path / "padded.nii")
    want = read_all(nifti_unit(shared_data / "nifti" / "anatomical.nii"))
    got = read_all(nifti_unit(padded_path))
    assert [r.meta["slice_index"] for r in got] == [r.meta["slice_index"] + 5 for r in want]
    assert {r.meta["num_slices"] for r in got} == {35}
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.pixels, w.pixels)
    # Kept when the threshold is off; an all-empty volume is skipped as a whole.
    assert len(read_all(nifti_unit(padded_path), min_foreground=0.0)) == 35
    empty_path = save_nifti(np.zeros((8, 8, 4), np.int16), np.eye(4), tmp_path / "empty.nii")
    with pytest.raises(SkipInput, match="near-empty"):
        read_all(nifti_unit(empty_path))


def test_nifti_4d_time_points(shared_data):
    records = read_all(nifti_unit(shared_data / "nifti" / "example4d.nii.gz"), min_foreground=0.0)
    assert [r.meta["time_index"] for r in records] == [0] * 24 + [1] * 24
    assert [r.meta["slice_index"] for r in records] == list(range(24)) * 2
    first = records[0]
    assert first.pixels.shape == (96, 128) and first.pixels.dtype == np.uint16
    assert first.meta["bits"] == 16 and first.meta["pixel_spacing"] == [2.0, 2.0]


def test_nifti_ct_windows(shared_data):
    """CT_AVM: stored as uint8 with scl_slope (values 0..563, not HU), windowed as forced CT."""
    path = shared_data / "nifti" / "CT_AVM.nii.gz"
    bone = read_all(nifti_unit(path), nifti_intensity="ct", windows=("bone",), nifti_stride=50)
    canonical = nib.as_closest_canonical(nib.load(path)).get_fdata()
    for record in bone:
        display = canonical[:, :, record.meta["slice_index"]][::-1, ::-1].T
        np.testing.assert_array_equal(record.pixels, quantize(apply_window(display, 400, 1800), 8))
        assert record.meta["modality"] == "CT" and record.meta["window"] == "bone(400/1800)"
        assert record.meta["bits"] == 8  # the file stores uint8
    stacked = read_all(nifti_unit(path), nifti_intensity="ct", windows=("bone", "-600/1500"), nifti_stride=50)
    assert [r.meta["slice_index"] for r in stacked] == [r.meta["slice_index"] for r in bone]
    assert stacked[0].pixels.shape == (*bone[0].pixels.shape, 2)
    np.testing.assert_array_equal(stacked[0].pixels[..., 0], bone[0].pixels)
    assert stacked[0].meta["window"] == "bone(400/1800)+window(-600/1500)"
    # "auto" sees no air below -500 in these values, so it treats the volume as MR.
    assert read_all(nifti_unit(path), nifti_stride=50)[0].meta["modality"] == "MR"


def test_nifti_auto_detects_hu(shared_data, tmp_path):
    """CT_AVM with its zero background set to -1024 (air in HU) is detected as CT.

    "header" then scales between percentiles of the voxels above -500, i.e. of the head, not the air.
    """
    canonical = nib.as_closest_canonical(nib.load(shared_data / "nifti" / "CT_AVM.nii.gz"))
    values = canonical.get_fdata(dtype=np.float32)[:, :, ::20]
    hu = np.where(values > 0, values, np.float32(-1024.0))
    path = save_nifti(hu, canonical.affine @ np.diag([1.0, 1.0, 20.0, 1.0]), tmp_path / "hu.nii")
    records = read_all(nifti_unit(path), windows=("header", "brain"))
    assert records and all(r.meta["modality"] == "CT" for r in records)
    record = records[len(records) // 2]
    assert record.pixels.dtype == np.uint16 and record.pixels.shape == (242, 256, 2)
    assert record.meta["window"] == "p0.5-99.5+brain(40/80)" and record.meta["slice_thickness"] == 20.0
    lo, hi = np.percentile(hu[hu > -500], [0.5, 99.5])
    display = hu[:, :, record.meta["slice_index"]][::-1, ::-1].T
    want = quantize(np.clip((display - lo) / (hi - lo), 0, 1), 16)
    np.testing.assert_allclose(record.pixels[..., 0].astype(int), want.astype(int), atol=1)


def test_nifti_nan_voxels(shared_data, tmp_path):
    original = nib.load(shared_data / "nifti" / "anatomical.nii")
    data = np.asanyarray(original.dataobj).astype(np.float32)
    with pytest.raises(SkipInput, match="NaN"):
        read_all(nifti_unit(save_nifti(np.full_like(data, np.nan), original.affine, tmp_path / "nan.nii")))
    holes = data.copy()
    holes[10:20, 10:20, 5:15] = np.nan
    filled = data.copy()
    assert data[10:20, 10:20, 5:15].min() > data.min()  # so the finite minimum is the same in both
    filled[10:20, 10:20, 5:15] = data.min()
    got = read_all(nifti_unit(save_nifti(holes, original.affine, tmp_path / "holes.nii")))
    want = read_all(nifti_unit(save_nifti(filled, original.affine, tmp_path / "filled.nii")))
    assert len(got) == 25
    assert_same_records(got, want)


def test_nifti_bad_inputs(shared_data, tmp_path):
    raw = (shared_data / "nifti" / "example4d.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(SkipInput, match="truncated or corrupt"):
        read_all(nifti_unit(truncated))
    not_nifti = tmp_path / "text.nii"
    not_nifti.write_text("not a volume\n" * 50)
    with pytest.raises(SkipInput, match="not a NIfTI"):
        read_all(nifti_unit(not_nifti))
    flat = save_nifti(np.ones((8, 8), np.float32), np.eye(4), tmp_path / "flat.nii")
    with pytest.raises(SkipInput, match="2D"):
        read_all(nifti_unit(flat))
    with pytest.raises(SkipInput, match="not found"):
        read_all(nifti_unit(tmp_path / "missing.nii.gz"))
    with pytest.raises(ValueError, match="nifti_axis"):
        read_all(nifti_unit(flat), nifti_axis="transverse")


# ----------------------------------------------------------------------------------------------- images


def test_png_16bit_keeps_precision(tmp_path):
    gradient = np.tile(np.round(np.linspace(0, 65535, 1024)).astype(np.uint16), (16, 1))
    path = tmp_path / "gradient.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    (record,) = read_all(ImageFile(path=path, source="gradient.png"))
    assert record.pixels.dtype == np.uint16 and len(np.unique(record.pixels)) > 256
    np.testing.assert_array_equal(record.pixels, gradient)  # full range already: min/max stretch is identity
    assert record.meta["bits"] == 16 and record.meta["window"] == "minmax"
    assert record.meta["photometric"] == "MONOCHROME2" and record.meta["orig_size"] == [16, 1024]


def test_jpeg_gray_and_rgb(shared_data):
    folder = shared_data / BRAIN_FOLDER / "test"
    cases = {
        "glioma/Te-gl_0074.jpg": "L",  # stored as 8-bit gray
        "glioma/Te-glTr_0000.jpg": "RGB",  # stored as RGB with three equal channels
        "notumor/Te-no_0110.jpg": "RGB",  # a real colour image
    }
    records = {}
    for name, mode in cases.items():
        with Image.open(folder / name) as image:
            assert image.mode == mode
            decoded = np.asarray(image)
        (records[name],) = read_all(ImageFile(path=folder / name, source=name, label=2, class_name="x"))
        assert records[name].label == 2 and records[name].meta["class_name"] == "x"
        assert set(records[name].meta) <= ALLOWED_META_KEYS
        want = decoded if decoded.ndim == 2 or name.startswith("notumor") else decoded[..., 0]
        np.testing.assert_array_equal(records[name].pixels, want)
    assert records["glioma/Te-gl_0074.jpg"].meta["photometric"] == "MONOCHROME2"
    assert records["glioma/Te-glTr_0000.jpg"].pixels.shape == (224, 224)
    assert records["notumor/Te-no_0110.jpg"].pixels.shape == (224, 224, 3)
    assert records["notumor/Te-no_0110.jpg"].meta["photometric"] == "RGB"
    (small,) = read_all(ImageFile(path=folder / "notumor/Te-no_0110.jpg", source="x"), max_side=112)
    assert small.pixels.shape == (112, 112, 3) and small.meta["orig_size"] == [224, 224]


def test_image_bad_inputs(tmp_path):
    png = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    with pytest.raises(SkipInput, match="truncated"):
        read_all(ImageFile(path=truncated, source="truncated.png"))
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    with pytest.raises(SkipInput, match="not an image"):
        read_all(ImageFile(path=text, source="text.jpg"))
    with pytest.raises(SkipInput, match="not found"):
        read_all(ImageFile(path=tmp_path / "missing.png", source="missing.png"))


def test_imagefolder_brain_tumor(shared_data):
    units = imagefolder_units(shared_data / BRAIN_FOLDER)
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    assert {(u.class_name, u.label) for u in units} == {(name, i) for i, name in enumerate(classes)}
    assert Counter(u.split for u in units) == {"train": 800, "test": 1281}
    assert Counter(u.class_name for u in units if u.split == "train") == dict.fromkeys(classes, 200)
    first = units[0]
    assert first.source == f"{first.split}/{first.class_name}/{first.path.name}"


def test_imagefolder_layouts(tmp_path):
    def touch_image(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)

    # Split layout with "Valid" -> val; a class missing from one split keeps its index.
    for rel in ("train/cat/1.png", "train/dog/2.png", "Valid/dog/3.png", "train/dog/.hidden.png"):
        touch_image(tmp_path / "split" / rel)
    (tmp_path / "split/train/cat/notes.txt").write_text("not an image")
    units = imagefolder_units(tmp_path / "split")
    assert [(u.split, u.class_name, u.label, u.source) for u in units] == [
        ("train", "cat", 0, "train/cat/1.png"),
        ("train", "dog", 1, "train/dog/2.png"),
        ("val", "dog", 1, "Valid/dog/3.png"),
    ]
    # Flat layout: "train" next to a non-split name is just a class.
    for rel in ("b/1.png", "a/sub/2.jpg", "train/3.png"):
        touch_image(tmp_path / "flat" / rel)
    units = imagefolder_units(tmp_path / "flat")
    assert [(u.split, u.class_name, u.label) for u in units] == [(None, "a", 0), (None, "b", 1), (None, "train", 2)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        imagefolder_units(tmp_path / "empty")


def test_npz_pneumoniamnist(shared_data):
    path = shared_data / "medmnist" / "pneumoniamnist.npz"
    units = npz_units(path, shared_data)
    assert [(u.split, u.start, u.stop) for u in units] == [
        ("train", 0, 2048),
        ("train", 2048, 4096),
        ("train", 4096, 4708),
        ("val", 0, 524),
        ("test", 0, 624),
    ]
    assert {u.source for u in units} == {"medmnist/pneumoniamnist.npz"}
    records = [r for u in units for r in u.read(ReadOptions())]
    counts = Counter((r.meta["split"], r.label) for r in records)
    assert counts == {
        ("train", 0): 1214,
        ("train", 1): 3494,
        ("val", 0): 135,
        ("val", 1): 389,
        ("test", 0): 234,
        ("test", 1): 390,
    }
    # Rows read by seeking into the compressed member match a full load.
    with np.load(path) as arrays:
        train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    middle = [r for r in records if r.meta["split"] == "train"][2048:4096]
    assert [r.meta["index"] for r in middle] == list(range(2048, 4096))
    np.testing.assert_array_equal(np.stack([r.pixels for r in middle]), train_images[2048:4096])
    assert [r.label for r in middle] == train_labels[2048:4096, 0].tolist()
    assert middle[0].pixels.dtype == np.uint8 and middle[0].meta["bits"] == 8
    assert set(middle[0].meta) <= ALLOWED_META_KEYS


def test_npz_multilabel_rgb_and_missing_key(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, (5, 3), dtype=np.uint8)
    path = tmp_path / "multi.npz"
    np.savez_compressed(path, train_images=images, train_labels=labels, test_images=images[:2])
    units = npz_units(path, tmp_path, chunk_size=2)
    assert [(u.split, u.start, u.stop) for u in units] == [
        ("train", 0, 2),
        ("train", 2, 4),
        ("train", 4, 5),
        ("test", 0, 2),
    ]
    records = [r for u in units[:3] for r in u.read(ReadOptions())]
    assert [r.label for r in records] == labels.tolist()
    np.testing.assert_array_equal(np.stack([r.pixels for r in records]), images)
    assert records[0].meta["photometric"] == "RGB"
    with pytest.raises(SkipInput, match="test_labels"):
        list(units[3].read(ReadOptions()))
    np.savez(tmp_path / "nosplit.npz", images=images)
    with pytest.raises(SkipInput, match="no train_images"):
        npz_units(tmp_path / "nosplit.npz", tmp_path)
    with pytest.raises(SkipInput, match="not found"):
        list(NpzChunk(tmp_path / "gone.npz", "gone.npz", "train", 0, 1).read(ReadOptions()))


# ----------------------------------------------------------------------------------------------- CSV


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(folder / name)


def test_csv_multilabel(tmp_path):
    write_images(tmp_path / "img", ["a.png", "b.png"])
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        f"path,effusion,nodule,mass\nimg/a.png,1,0,1\nimg/b.png,0.0,0.0,1.0\nimg/gone.png,0,1,0\n{tmp_path}/img/a.png,0,0,0\n"
    )
    units = csv_units(csv_path)
    assert [u.label for u in units] == [(1, 0, 1), (0, 0, 1), (0, 1, 0), (0, 0, 0)]
    assert [u.source for u in units] == ["img/a.png", "img/b.png", "img/gone.png", "img/a.png"]
    assert all(isinstance(u, ImageFile) for u in units)
    (record,) = units[0].read(ReadOptions())
    assert record.label == [1, 0, 1]
    with pytest.raises(SkipInput, match="not found"):  # the missing file is kept as a unit
        list(units[2].read(ReadOptions()))
    csv_path.write_text("path,effusion,nodule\nimg/a.png,1,0\nimg/b.png,0,2\n")
    with pytest.raises(ValueError, match=r"labels.csv:3: column 'nodule' has '2'"):
        csv_units(csv_path)


def test_csv_single_label(shared_data, tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    csv_path = tmp_path / "diagnosis.csv"
    csv_path.write_text("image,diagnosis\na.jpg,pneumonia\nb.jpg,normal\nc.jpg,pneumonia\n")
    units = csv_units(csv_path)
    assert [(u.label, u.class_name) for u in units] == [(1, "pneumonia"), (0, "normal"), (1, "pneumonia")]
    (record,) = units[1].read(ReadOptions())
    assert record.meta["class_name"] == "normal" and record.label == 0
    nifti_path = shared_data / "nifti" / "anatomical.nii"
    csv_path.write_text(f"File,grade\na.jpg,3\n{nifti_path},7\nunlabeled.jpg,\n")
    with pytest.raises(ValueError, match="line 4: no label in column 'grade'"):
        csv_units(csv_path, allow_outside=True)
    csv_path.write_text(f"File,grade\na.jpg,3\n{nifti_path},7\n")
    with pytest.raises(ValueError, match=r"line 3 .*anatomical.nii.*: path outside the CSV's folder"):
        csv_units(csv_path)  # an absolute path elsewhere needs the explicit switch
    image_unit, nifti = csv_units(csv_path, allow_outside=True)
    assert (image_unit.label, image_unit.class_name) == (3, None)
    assert isinstance(nifti, NiftiFile) and nifti.label == 7 and nifti.source == "anatomical.nii"
    csv_path.write_text("name,label\na.jpg,1\n")
    with pytest.raises(ValueError, match="no path column"):
        csv_units(csv_path)


def test_csv_dicom_rows(tmp_path):
    dicom = pytest.importorskip("medfm.data_shards.dicom")
    csv_path = tmp_path / "series.csv"
    csv_path.write_text("path\nscan/IM0001\nscan/slice.dcm\n")
    units = csv_units(csv_path)
    assert all(isinstance(u, dicom.DicomFile) for u in units)
    assert [u.label for u in units] == [None, None]


def test_csv_split_column_is_read_not_taken_for_a_label(tmp_path):
    write_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,finding,Split\nimg/a.png,effusion,train\nimg/b.png,normal,Valid\nimg/c.png,normal,test\n")
    rows = csv_rows(csv_path)
    assert [(r.line, r.split, r.unit.split, r.unit.label) for r in rows] == [
        (2, "train", "train", 0),
        (3, "val", "val", 1),
        (4, "test", "test", 1),
    ]
    csv_path.write_text("path,finding,split\nimg/a.png,effusion,holdout\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: column 'split' has 'holdout'; expected train/val/test"):
        csv_units(csv_path)
