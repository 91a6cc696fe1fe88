"""Hostile input: every input gets a result and the run goes on.

A folder is built of real DICOM (from the pydicom wheel) and every class of broken file a hospital archive holds:
a header declaring 2e9 frames, unknown VR bytes in the geometry and UIDs, truncated / empty / non-zip / wrong-keyed
/ image-less .npz files, a symlink to itself, a named pipe called pipe.dcm, a series with a corrupt slice and a
fuzzed slice claiming its UID, free text planted in BodyPartExamined, and a few hundred bit-flipped copies of real
files. ``medfm shard`` runs in a subprocess (a hang fails the test instead of blocking it) and must end 0 with
every input either in the shards or in the manifest's skip list. Killing it with SIGKILL leaves no reader process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[2]
# the planted values are deliberately not valid CS values: pydicom warns when writing them
pytestmark = pytest.mark.filterwarnings("ignore:.*VR CS:UserWarning")
PLANTED = "JOHN^DOE 1932 MRN 5551234"


def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def write_series(folder: Path, slices: int = 4) -> list[Path]:
    """A real CT slice repeated along z as one series (positions 2 mm apart, own SOPInstanceUIDs)."""
    folder.mkdir(parents=True)
    paths = []
    for number in range(slices):
        ds = _ct()
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 2.0 * number]
        ds.InstanceNumber = number + 1
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{number + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.BodyPartExamined = "chest"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1000"
        ds.PixelData = (ds.pixel_array + 37 * number).astype(ds.pixel_array.dtype).tobytes()
        paths.append(folder / f"slice{number:02d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def bad_vr(source: Path, tag: bytes, target: Path) -> None:
    """A copy with the VR bytes of the explicit-VR element ``tag`` replaced by bytes no VR has."""
    data = bytearray(source.read_bytes())
    at = data.find(tag)
    assert at > 0
    data[at + 4 : at + 6] = b"\x00\x01"
    target.write_bytes(bytes(data))


def build_archive(root: Path, fuzzed: int) -> Path:
    inputs = root / "archive"
    inputs.mkdir()
    ct_path = Path(get_testdata_file("CT_small.dcm"))
    good = inputs / "good_ct.dcm"
    good.write_bytes(ct_path.read_bytes())
    (inputs / "good_mr.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())

    huge = _ct()
    huge.NumberOfFrames = 2_000_000_000
    huge.save_as(inputs / "frames_2e9.dcm", enforce_file_format=True)
    for name, tag in (
        ("position", b"\x20\x00\x32\x00"),
        ("orientation", b"\x20\x00\x37\x00"),
        ("instance", b"\x20\x00\x13\x00"),
        ("sop_uid", b"\x08\x00\x18\x00"),
    ):
        bad_vr(ct_path, tag, inputs / f"bad_vr_{name}.dcm")
    planted = _ct()
    planted.BodyPartExamined = PLANTED
    planted.save_as(inputs / "planted_body_part.dcm", enforce_file_format=True)

    npz = inputs / "npz"
    npz.mkdir()
    images = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    np.savez(npz / "good.npz", train_images=images, train_labels=np.zeros((6, 1), np.uint8))
    np.savez(npz / "wrong_keys.npz", pictures=images)
    np.savez(npz / "no_images.npz", train_images=images[:0], train_labels=np.zeros((0, 1), np.uint8))
    (npz / "empty.npz").write_bytes(b"")
    (npz / "not_zip.npz").write_bytes(b"this is not a zip archive at all" * 10)
    (npz / "truncated.npz").write_bytes((npz / "good.npz").read_bytes()[:300])
    with zipfile.ZipFile(npz / "bad_header.npz", "w") as archive:
        archive.writestr("train_images.npy", b"\x93NUMPY\x01\x00garbage")

    os.symlink("loop.dcm", inputs / "loop.dcm")
    os.mkfifo(inputs / "pipe.dcm")

    series = write_series(inputs / "series")
    series[1].write_bytes(series[1].read_bytes()[:-3000])  # a corrupt slice in the middle
    impostor = pydicom.dcmread(series[0])  # claims the series' UID and geometry, with pixels cut short
    impostor.ImagePositionPatient = [-158.1, -179.0, -75.7 + 9.0]
    impostor.SOPInstanceUID = impostor.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    impostor.PixelData = impostor.PixelData[:100]
    impostor.save_as(inputs / "series" / "slice99.dcm", enforce_file_format=True)

    rng = random.Random(0)
    fuzz = inputs / "fuzz"
    fuzz.mkdir()
    sources = [ct_path.read_bytes(), Path(get_testdata_file("MR_small.dcm")).read_bytes()]
    for number in range(fuzzed):
        data = bytearray(sources[number % 2])
        for _ in range(rng.choice((1, 4, 32))):
            data[rng.randrange(132, len(data))] = rng.randrange(256)
        if number % 7 == 0:
            data = data[: rng.randrange(132, len(data))]
        (fuzz / f"fuzz{number:05d}.dcm").write_bytes(bytes(data))
    return inputs


def run_shard(inputs: Path, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "medfm.cli", "shard", str(inputs), "--out", str(out), "--workers", "2",
               "--keep-paths", "--dedup", "none", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check_every_input_has_a_result(inputs: Path, out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {entry["source"]: entry["reason"] for entry in manifest["skipped"]}
    sources = set()
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    sources.add(json.loads(tar.extractfile(member).read())["source"])
    for path in sorted(p for p in inputs.rglob("*") if not p.is_dir() or not any(p.iterdir())):
        name = path.relative_to(inputs.parent).as_posix()
        folder = path.parent.relative_to(inputs.parent).as_posix()
        # a series' samples carry its folder as source ("folder#2" when a folder holds several stacks)
        in_series = any(source == folder or source.startswith(f"{folder}#") for source in sources)
        assert name in skipped or name in sources or in_series, f"{name}: no shard sample and no skip reason"
    return {"manifest": manifest, "skipped": skipped, "sources": sources}


def test_every_hostile_input_gets_a_result_and_the_run_goes_on(tmp_path):
    inputs = build_archive(tmp_path, fuzzed=240)
    done = run_shard(inputs, tmp_path / "out", "--max-pixels", "100000000")
    assert done.returncode == 0, done.stderr[-3000:]
    result = check_every_input_has_a_result(inputs, tmp_path / "out")
    skipped, sources = result["skipped"], result["sources"]
    assert "over the budget" in skipped["archive/frames_2e9.dcm"]
    assert skipped["archive/pipe.dcm"] == "not a regular file: a named pipe"
    assert "symbolic links" in skipped["archive/loop.dcm"]
    for name in ("wrong_keys", "no_images", "empty", "not_zip", "truncated", "bad_header"):
        assert f"archive/npz/{name}.npz" in skipped, name
    assert "no image" in skipped["archive/npz/no_images.npz"]
    assert "archive/npz/good.npz" in sources and "archive/good_ct.dcm" in sources
    # the series keeps its good slices; the corrupt one and the impostor are listed, not merged
    assert "archive/series" in sources
    assert "archive/series/slice01.dcm" in skipped and "archive/series/slice99.dcm" in skipped
    for name in ("position", "orientation", "instance", "sop_uid"):
        entry = f"archive/bad_vr_{name}.dcm"
        assert entry in sources or entry in skipped
    # free text in BodyPartExamined never reaches a byte of the output; defined terms are kept, normalised
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert PLANTED.encode() not in path.read_bytes() and b"JOHN" not in path.read_bytes(), path
    assert result["manifest"]["totals"]["inputs_read"] > 10


def test_dicom_paths_are_hashed_by_default(tmp_path):
    inputs = tmp_path / "PATIENT_SMITH_JOHN"
    write_series(inputs / "study", slices=2)
    command = [sys.executable, "-m", "medfm.cli", "shard", str(inputs), "--out", str(tmp_path / "out"), "--workers", "1"]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "stored as salted hashes" in done.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"SMITH" not in path.read_bytes(), path
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        record = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert record["source"].startswith("sha256:") and record["body_part"] == "CHEST"


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = task / "children"
        if children.is_file():
            found += [int(c) for c in children.read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_shard_run_leaves_no_reader_process(tmp_path):
    inputs = build_archive(tmp_path, fuzzed=600)
    command = [sys.executable, "-m", "medfm.cli", "shard", str(inputs), "--out", str(tmp_path / "out"), "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = _children(process.pid)
        time.sleep(0.1)
    assert len(workers) >= 2, "the reader processes never started"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "reader processes outlived a SIGKILL of medfm shard"


@pytest.mark.slow
def test_thousands_of_fuzzed_files(tmp_path):
    inputs = build_archive(tmp_path, fuzzed=4000)
    done = run_shard(inputs, tmp_path / "out", timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    check_every_input_has_a_result(inputs, tmp_path / "out")


@dataclass(frozen=True)
class StuckInCode:
    """An input whose reader never returns to Python, as in a decoder looping in C: SIGALRM is blocked, so the
    reader's own alarm cannot interrupt it."""

    source: str

    def read(self, options):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
        yield from ()


@dataclass(frozen=True)
class KillsItsReader:
    """An input whose reading kills the reader process (a codec segfault, the OOM killer)."""

    source: str

    def read(self, options):
        os._exit(139)
        yield from ()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reader_stuck_in_c_code_or_killed_costs_one_input(tmp_path, workers, monkeypatch):
    from PIL import Image

    from medfm.data_shards import discover
    from medfm.data_shards.images import ImageFile
    from medfm.data_shards.workers import ShardConfig
    from medfm.data_shards.writer import ShardWriter, prepare_folder

    for kind in (StuckInCode, KillsItsReader):  # the plan file names unit types
        monkeypatch.setitem(discover._UNIT_TYPES, kind.__name__, kind)

    units = []
    for index in range(6):
        path = tmp_path / f"ok{index}.png"
        Image.fromarray(np.full((8, 8), 40 * index, np.uint8)).save(path)
        units.append(ImageFile(path, path.name))
    units[2:2] = [StuckInCode("stuck.dcm")]
    units[5:5] = [KillsItsReader("segfault.dcm")]
    prepare_folder(tmp_path / "out", resume=False, overwrite=False)
    sink = discover.PlanWriter(tmp_path / "out" / "plan.jsonl", header={})
    sink.add(units, "test")
    writer = ShardWriter(tmp_path / "out", sink.close(), ShardConfig(unit_timeout_s=1, dedup="none"), "test", workers)
    started = time.monotonic()
    manifest = writer.run()
    assert time.monotonic() - started < 60
    reasons = {entry["source"]: entry["reason"] for entry in manifest.skipped}
    assert reasons.keys() == {"stuck.dcm", "segfault.dcm"}
    assert "was killed" in reasons["stuck.dcm"] and "process died" in reasons["segfault.dcm"]
    assert manifest.totals["samples"] == 6
