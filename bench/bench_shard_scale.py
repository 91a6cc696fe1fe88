"""Archive scale: `medfm shard` planning and writing rate against reader processes, peak memory, and the time
to finish a 90 % run with --resume, on ~20k DICOM files made from the shared real MR series.

The corpus: the 32 real slices of ../shared/data/dicom/series, downscaled to 128 px and written again as
``--series`` series of ``--slices`` slices each (own UIDs and positions, one folder per series), so that planning
groups them into volumes as it would a PACS export. Each measurement runs ``medfm shard`` in a fresh process;
planning ends when it prints "inputs planned" (the header scan), writing is the rest.

    python bench/bench_shard_scale.py                          # 20,000 files, workers 1 and 2
    python bench/bench_shard_scale.py --series 50 --json bench/results/shard_scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_corpus(series_dir: Path, out: Path, series: int, slices: int, size: int) -> int:
    """``series`` folders of ``slices`` DICOM files each, from the real slices (cycled), downscaled to ``size``."""
    sources = sorted(series_dir.glob("*.dcm"))
    templates = []
    for path in sources:
        ds = pydicom.dcmread(path)
        small = Image.fromarray(ds.pixel_array.astype(np.float32)).resize((size, size), Image.BILINEAR)
        ds.PixelData = np.asarray(small).clip(0, 65535).astype(np.uint16).tobytes()
        ds.Rows = ds.Columns = size
        templates.append(ds)
    count = 0
    for number in range(series):
        folder = out / f"series{number:05d}"
        folder.mkdir(parents=True)
        for index in range(slices):
            ds = templates[index % len(templates)]
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.{number + 1}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
                f"1.2.826.0.1.3680043.8.498.{number + 1}.{index + 1}"
            )
            ds.InstanceNumber = index + 1
            ds.ImagePositionPatient = [0.0, 0.0, 1.5 * index]
            ds.save_as(folder / f"{index:04d}.dcm", enforce_file_format=True)
            count += 1
    return count


def run_shard(corpus: Path, out: Path, workers: int, extra: list[str], kill_at: float | None = None) -> dict:
    """One `medfm shard` process: planning and total seconds, samples, peak RSS of the process tree (MiB).
    ``kill_at``: SIGKILL once this fraction of the expected shards is written (for the resume measurement)."""
    command = [sys.executable, "-m", "medfm.cli", "shard", str(corpus), "--out", str(out), "--workers", str(workers),
               "--max-side", "128", "--dedup", "none", "--max-count", "500", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    planned_at = planning_from = None
    for line in process.stderr:
        if "medfm shard: planning" in line and planning_from is None:
            planning_from = time.perf_counter() - start  # after the interpreter and imports started
        if "inputs planned" in line and planned_at is None:
            planned_at = time.perf_counter() - start
            break
    if kill_at is not None:
        journal, expected = out / ".progress.jsonl", kill_at
        while process.poll() is None:
            if journal.exists() and len(journal.read_text().splitlines()) - 1 >= expected:
                process.kill()
                break
            time.sleep(0.05)
    process.communicate()
    total = time.perf_counter() - start
    manifest = out / "manifest.json"
    samples = json.loads(manifest.read_text())["totals"]["samples"] if manifest.exists() else None
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "plan_s": planned_at,
        "startup_s": planning_from,
        "total_s": total,
        "samples": samples,
        "returncode": process.returncode,
        "peak_rss_mib": max(peak, before) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--series", type=int, default=200)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    series_dir = args.data / "dicom" / "series" / "vs_seg_001_t1_mprage"
    if not series_dir.is_dir():
        raise SystemExit(f"{series_dir} not found (pass --data)")
    results: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        start = time.perf_counter()
        files = make_corpus(series_dir, tmp_dir / "corpus", args.series, args.slices, args.size)
        results["files"] = files
        results["corpus_seconds"] = time.perf_counter() - start
        print(f"corpus: {files} DICOM files in {args.series} series ({results['corpus_seconds']:.0f} s)", flush=True)
        # flat memory: the same run on an archive a quarter the size; first, because the peak RSS of a process's
        # children (getrusage) only grows
        make_corpus(series_dir, tmp_dir / "quarter_corpus", max(1, args.series // 4), args.slices, args.size)
        small = run_shard(tmp_dir / "quarter_corpus", tmp_dir / "quarter", max(args.workers), [])
        shutil.rmtree(tmp_dir / "quarter_corpus")
        results["rss_quarter_archive_mib"] = small["peak_rss_mib"]
        print(f"peak RSS with a quarter of the files: {small['peak_rss_mib']:.0f} MiB", flush=True)
        for workers in args.workers:
            run = run_shard(tmp_dir / "corpus", tmp_dir / f"out{workers}", workers, [])
            # planning: from the "planning" line (the interpreter and imports have started) to "inputs planned"
            run["plan_files_s"] = files / (run["plan_s"] - run["startup_s"])
            run["plan_files_s_per_worker"] = run["plan_files_s"] / workers
            run["write_img_s"] = run["samples"] / (run["total_s"] - run["plan_s"])
            results["runs"][f"workers{workers}"] = run
            print(
                f"workers {workers}: start-up {run['startup_s']:.1f} s, planning {run['plan_files_s']:,.0f} files/s "
                f"({run['plan_s'] - run['startup_s']:.1f} s), writing {run['write_img_s']:,.0f} images/s, "
                f"total {run['total_s']:.1f} s, peak RSS {run['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
        workers = max(args.workers)
        full = results["runs"][f"workers{workers}"]["total_s"]
        shards = -(-results["runs"][f"workers{workers}"]["samples"] // 500)
        killed = run_shard(tmp_dir / "corpus", tmp_dir / "resume", workers, [], kill_at=int(0.9 * shards))
        resumed = run_shard(tmp_dir / "corpus", tmp_dir / "resume", workers, ["--resume"])
        # the resumed run prints "inputs planned" once it has started and opened the saved plan
        after_startup = resumed["total_s"] - resumed["plan_s"]
        results["resume"] = {
            "killed_at_shards": int(0.9 * shards),
            "killed_returncode": killed["returncode"],
            "of_shards": shards,
            "resume_s": resumed["total_s"],
            "startup_s": resumed["plan_s"],
            "full_run_s": full,
            "fraction_of_full": resumed["total_s"] / full,
            "fraction_of_full_after_startup": after_startup
            / (full - results["runs"][f"workers{workers}"]["startup_s"]),
            "samples": resumed["samples"],
        }
        print(
            f"resume of a run killed at 90 %: {resumed['total_s']:.1f} s = "
            f"{100 * resumed['total_s'] / full:.0f} % of a full run ({full:.1f} s); after the start-up "
            f"({resumed['plan_s']:.1f} s, the interpreter and imports): "
            f"{100 * results['resume']['fraction_of_full_after_startup']:.0f} %",
            flush=True,
        )
        shutil.rmtree(tmp_dir / "corpus")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
