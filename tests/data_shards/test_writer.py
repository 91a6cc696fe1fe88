"""`medfm shard`: manifest, privacy, determinism, atomic resume, refusal to overwrite, bad inputs, dedup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medfm.cli import main

REPO = Path(__file__).resolve().parents[2]


def shard(*args: str) -> int:
    return main(["shard", *[str(a) for a in args], "--workers", "1"])


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_mixed_real_inputs_give_shards_and_manifest(shared_data: Path, tmp_path: Path):
    inputs = tmp_path / "archive"
    (inputs / "dicom").mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "emri_small.dcm"):
        shutil.copy(shared_data / "dicom" / "single" / name, inputs / "dicom" / name)
    shutil.copytree(shared_data / "dicom" / "series" / "vs_seg_001_t1_mprage", inputs / "series")
    shutil.copy(shared_data / "nifti" / "anatomical.nii", inputs / "anatomical.nii")
    out = tmp_path / "shards"
    assert shard(inputs, "--out", out, "--max-count", "16") == 0
    manifest = manifest_of(out)
    totals = manifest["totals"]
    assert totals["by_modality"].keys() >= {"CT", "MR", "US"}
    assert totals["inputs_skipped"] == 0 and manifest["skipped"] == []
    assert totals["samples"] == sum(s["count"] for s in manifest["shards"])
    assert all(s["count"] <= 16 for s in manifest["shards"])
    for entry in manifest["shards"]:
        path = out / entry["name"]
        assert path.stat().st_size == entry["bytes"]
        assert len(tar_members(path)) == 2 * entry["count"]  # image + json per sample
    assert "medfm shard" in manifest["command"] and manifest["config"]["dedup"] == "exact"
    assert not list(out.glob("*.tmp")) and not (out / ".progress.jsonl").exists()
    # the 32-slice series comes out as slices with their index in the sorted volume
    with tarfile.open(out / manifest["shards"][0]["name"]) as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {"modality", "source", "sha256", "bits", "window"} <= records[0].keys()


def test_npz_labels_and_splits_travel_with_samples(shared_data: Path, tmp_path: Path):
    out = tmp_path / "breast"
    assert shard(f"medmnist:{shared_data / 'medmnist' / 'breastmnist.npz'}", "--out", out, "--dedup", "none") == 0
    totals = manifest_of(out)["totals"]
    assert totals["by_split"] == {"test": 156, "train": 546, "val": 78}
    assert totals["labeled"] == totals["samples"] == 780


def test_no_patient_identifier_reaches_any_output_byte(shared_data: Path, tmp_path: Path, capfd):
    planted = {
        "PatientName": "Doe^Jane",
        "PatientID": "MRN-8675309",
        "PatientBirthDate": "19230417",
        "OtherPatientIDs": "ALT-554433",
        "InstitutionName": "Saint Nowhere Hospital",
        "ReferringPhysicianName": "House^Gregory",
        "AccessionNumber": "ACC77123",
        "StudyID": "STUDY-4242",
    }
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, name in enumerate(("CT_small.dcm", "MR_small.dcm", "nih_chestxray14_DX_nofinding.dcm")):
        ds = pydicom.dcmread(shared_data / "dicom" / "single" / name)
        for keyword, value in planted.items():
            setattr(ds, keyword, value)
        ds.save_as(inputs / f"image{i}.dcm")
    # a DICOM without pixel data and the same identifiers: it ends in the manifest's skipped list
    ds = pydicom.dcmread(inputs / "image0.dcm")
    del ds.PixelData
    ds.save_as(inputs / "nopixels.dcm")
    out = tmp_path / "out"
    assert shard(inputs, "--out", out) == 0
    assert main(["shard", "inspect", str(out)]) == 0
    captured = capfd.readouterr()
    needles = [v.encode() for v in planted.values()] + [b"Doe", b"Jane", b"8675309", b"Nowhere", b"Gregory"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in files) and any(p.suffix == ".png" for p in files)
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle!r} leaked into {path.name}"
    for needle in needles:
        assert needle.decode() not in captured.out + captured.err


def test_output_is_deterministic_across_worker_counts(shared_data: Path, tmp_path: Path):
    source = shared_data / "dicom" / "series" / "vs_seg_001_t1_mprage"
    first, second = tmp_path / "a", tmp_path / "b"
    assert (
        main(
            [
                "shard",
                str(source),
                "--out",
                str(first),
                "--workers",
                "1",
                "--max-count",
                "7",
                "--max-side",
                "96",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "shard",
                str(source),
                "--out",
                str(second),
                "--workers",
                "2",
                "--max-count",
                "7",
                "--max-side",
                "96",
            ]
        )
        == 0
    )
    assert [s["sha256"] for s in manifest_of(first)["shards"]] == [s["sha256"] for s in manifest_of(second)["shards"]]


def test_existing_output_is_never_overwritten_silently(shared_data: Path, tmp_path: Path, capsys):
    source = shared_data / "dicom" / "single" / "CT_small.dcm"
    out = tmp_path / "out"
    assert shard(source, "--out", out) == 0
    before = (out / "shard-000000.tar").read_bytes()
    assert shard(source, "--out", out) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "shard-000000.tar").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert shard(source, "--out", other) == 1
    assert (other / "notes.txt").read_text() == "mine"
    assert shard(source, "--out", out, "--overwrite") == 0


def test_killed_run_resumes_to_the_same_shards(shared_data: Path, tmp_path: Path, signalled_after):
    npz = f"medmnist:{shared_data / 'medmnist' / 'pneumoniamnist.npz'}"
    common = [npz, "--max-count", "150", "--workers", "1", "--dedup", "exact"]
    reference = tmp_path / "reference"
    assert main(["shard", *common, "--out", str(reference)]) == 0

    out = tmp_path / "killed"
    kill = signalled_after("medfm.data_shards.writer:ShardWriter._close_shard", 3, signal.SIGKILL)  # 3 shards done
    process = subprocess.run([*kill, "shard", *common, "--out", str(out)], cwd=REPO, capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    assert len((out / ".progress.jsonl").read_text().splitlines()) == 4  # header + 3 shards
    assert not (out / "manifest.json").exists()
    # without --resume the partial output is refused, with it the run completes
    assert main(["shard", *common, "--out", str(out)]) == 1
    assert main(["shard", *common, "--out", str(out), "--resume"]) == 0
    got, want = manifest_of(out), manifest_of(reference)
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in want["shards"]]
    assert got["totals"] == want["totals"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_bad_inputs_are_listed_and_do_not_stop_the_run(shared_data: Path, tmp_path: Path):
    inputs = tmp_path / "inputs"
    (inputs / "empty").mkdir(parents=True)
    good = shared_data / "dicom" / "single" / "CT_small.dcm"
    shutil.copy(good, inputs / "good.dcm")
    (inputs / "truncated.dcm").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (inputs / "notes.txt").write_text("not an image")
    (inputs / "fake.dcm").write_text("not a dicom")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(inputs / "nopixels.dcm")
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), inputs / "nan.nii.gz")
    out = tmp_path / "out"
    assert shard(inputs, "--out", out, "--keep-paths") == 0
    manifest = manifest_of(out)
    reasons = {entry["source"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {
        "inputs/empty/",
        "inputs/truncated.dcm",
        "inputs/notes.txt",
        "inputs/fake.dcm",
        "inputs/broken.png",
        "inputs/nopixels.dcm",
        "inputs/nan.nii.gz",
    }, reasons
    assert "empty folder" in reasons["inputs/empty/"]
    assert "pixel data" in reasons["inputs/nopixels.dcm"].lower()
    assert "nan" in reasons["inputs/nan.nii.gz"].lower()
    assert manifest["totals"]["samples"] == 1 and manifest["totals"]["inputs_skipped"] == 7

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(inputs / "fake.dcm", only_bad / "fake.dcm")
    assert shard(only_bad, "--out", tmp_path / "nothing") == 1


def test_duplicates_are_dropped_and_counted(shared_data: Path, tmp_path: Path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for copy in ("a.dcm", "b.dcm"):
        shutil.copy(shared_data / "dicom" / "single" / "CT_small.dcm", inputs / copy)
    shutil.copytree(shared_data / "dicom" / "series" / "vs_seg_001_t1_mprage", inputs / "series")
    exact, near = tmp_path / "exact", tmp_path / "near"
    assert shard(inputs, "--out", exact, "--max-side", "128") == 0
    assert shard(inputs, "--out", near, "--max-side", "128", "--dedup", "near", "--near-threshold", "10") == 0
    exact_totals, near_totals = manifest_of(exact)["totals"], manifest_of(near)["totals"]
    assert exact_totals["duplicates_exact"] == 1
    assert near_totals["duplicates_near"] > 0
    assert near_totals["samples"] == exact_totals["samples"] - near_totals["duplicates_near"]


def test_shards_respect_the_byte_bound(shared_data: Path, tmp_path: Path):
    out = tmp_path / "out"
    source = shared_data / "dicom" / "series" / "vs_seg_001_t1_mprage"
    assert shard(source, "--out", out, "--max-mb", "1.0") == 0
    shards = manifest_of(out)["shards"]
    assert len(shards) > 3
    assert all(s["bytes"] <= 1024**2 for s in shards)


def test_inspect_writes_a_grid_per_modality(shared_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert shard(shared_data / "dicom" / "single", "--out", out, "--max-side", "128") == 0
    assert main(["shard", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "by modality" in text
    grids = sorted(p.name for p in (out / "inspect").glob("grid_*.png"))
    assert {"grid_CT.png", "grid_MR.png", "grid_DX.png", "grid_US.png"} <= set(grids)


def test_splits_keeps_only_the_asked_splits_of_sources_that_have_them(shared_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    breast = shared_data / "medmnist" / "breastmnist.npz"
    dicom = shared_data / "dicom" / "single" / "CT_small.dcm"
    assert shard(f"medmnist:{breast}", dicom, "--out", out, "--splits", "train", "--dedup", "none") == 0
    totals = manifest_of(out)["totals"]
    assert totals["by_split"] == {"train": 546}  # BreastMNIST's val 78 and test 156 stay out
    assert totals["samples"] == 546 + 1  # the DICOM has no split: kept
    assert "inputs of splits other than train left out" in capsys.readouterr().err


def test_missing_source_is_a_clear_error(tmp_path: Path, capsys):
    assert shard(tmp_path / "does-not-exist", "--out", tmp_path / "out") == 2
    assert "does-not-exist" in capsys.readouterr().err


@pytest.mark.parametrize("window", ["lung", "-600/1500"])
def test_named_window_is_recorded(shared_data: Path, tmp_path: Path, window: str):
    out = tmp_path / "out"
    # `--window=` form: argparse would read a bare negative CENTER as an option
    assert shard(shared_data / "dicom" / "single" / "CT_small.dcm", "--out", out, f"--window={window}") == 0
    with tarfile.open(out / "shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        record = json.loads(tar.extractfile(member).read())
    assert "-600/1500" in record["window"]
    assert record["bits"] == 16
    assert os.path.getsize(out / "shard-000000.tar") > 0


def test_resume_reads_the_saved_plan_instead_of_scanning_headers_again(
    shared_data: Path, tmp_path: Path, monkeypatch, capsys
):
    import medfm.data_shards.dicom as dicom
    from medfm.data_shards.writer import ShardWriter

    common = [str(shared_data / "dicom"), "--max-count", "8", "--workers", "1", "--max-side", "64"]
    assert main(["shard", *common, "--out", str(tmp_path / "reference")]) == 0
    close = ShardWriter._close_shard

    def close_then_die(self, *args):
        close(self, *args)
        if len(self.state.shards) == 2:
            raise KeyboardInterrupt  # the run dies after its second shard

    monkeypatch.setattr(ShardWriter, "_close_shard", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(["shard", *common, "--out", str(tmp_path / "out")])
    monkeypatch.setattr(ShardWriter, "_close_shard", close)
    assert (tmp_path / "out" / ".plan.jsonl").is_file()

    def no_scan(path):
        raise AssertionError(f"header of {path} read again on --resume")

    monkeypatch.setattr(dicom, "_facts", no_scan)
    capsys.readouterr()
    assert main(["shard", *common, "--out", str(tmp_path / "out"), "--resume"]) == 0
    assert "no header scanned again" in capsys.readouterr().err
    got, want = manifest_of(tmp_path / "out"), manifest_of(tmp_path / "reference")
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in want["shards"]]
    assert not (tmp_path / "out" / ".plan.jsonl").exists()


def planned(sources: list[str], path: Path, workers: int = 1):
    from medfm.data_shards.discover import PlanWriter, plan_sources

    sink = PlanWriter(path, header={})
    plan_sources(sources, sink, workers=workers)
    plan = sink.close()
    return [unit for _, unit, _ in plan.iter_units()], list(plan.iter_skipped())


def test_headers_are_scanned_in_parallel_with_the_same_result(shared_data: Path, tmp_path: Path):
    folder = tmp_path / "many"
    for copy in range(10):  # 33 files x 10 folders: enough for several chunks of headers in flight
        shutil.copytree(shared_data / "dicom", folder / f"copy{copy}")
    one, two = planned([str(folder)], tmp_path / "one.jsonl"), planned([str(folder)], tmp_path / "two.jsonl", 2)
    assert one == two
    assert sum(type(u).__name__ == "DicomSeries" for u in one[0]) == 10


def test_the_plan_is_streamed_to_disk_while_the_folder_is_walked(shared_data: Path, tmp_path: Path, monkeypatch):
    """Memory holds the directories in flight, not the archive: units of the first studies reach the plan file
    before the walk has listed the last one."""
    from medfm.data_shards import discover

    folder = tmp_path / "archive"
    for study in range(5):
        shutil.copytree(shared_data / "dicom" / "series", folder / f"study{study}")
    sink = discover.PlanWriter(tmp_path / "plan.jsonl", header={})
    walk, on_disk = discover._walk, []

    def spying_walk(*args):
        for directory in walk(*args):
            on_disk.append(sink.units)
            yield directory

    monkeypatch.setattr(discover, "_walk", spying_walk)
    discover.plan_sources([str(folder)], sink, workers=1)
    plan = sink.close()
    assert plan.units == 5 and on_disk[-1] == 4, on_disk
    assert [unit.source for _, unit, _ in plan.iter_units()] == [
        f"archive/study{s}/vs_seg_001_t1_mprage" for s in range(5)
    ]


def test_the_walk_does_not_follow_directory_links_and_lists_unreadable_folders(shared_data, tmp_path, monkeypatch):
    from medfm.data_shards import discover

    folder = tmp_path / "archive"
    shutil.copytree(shared_data / "dicom" / "series", folder / "study")
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a link to an ancestor: never walked into
    (folder / "locked").mkdir()
    scandir = os.scandir

    def scandir_refusing_locked(path):
        if Path(path).name == "locked":  # tests run as root, for whom no mode bit refuses a listing
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(discover.os, "scandir", scandir_refusing_locked)
    sink = discover.PlanWriter(tmp_path / "plan.jsonl", header={})
    discover.plan_sources([str(folder)], sink)
    plan = sink.close()
    assert [unit.source for _, unit, _ in plan.iter_units()] == ["archive/study/vs_seg_001_t1_mprage"]
    assert dict(plan.iter_skipped()) == {"archive/locked/": "unreadable folder: Permission denied"}


def test_a_source_folder_given_as_dot_names_its_files_without_a_prefix(shared_data, tmp_path, monkeypatch):
    shutil.copytree(shared_data / "dicom" / "series", tmp_path / "archive" / "study")
    (tmp_path / "archive" / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "archive")
    units, skipped = planned(["."], tmp_path / "plan.jsonl")
    assert [unit.source for unit in units] == ["study/vs_seg_001_t1_mprage"]
    assert skipped == [("empty/", "empty folder")]
