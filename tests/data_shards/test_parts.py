"""Sharding across machines: `medfm shard --part K/N` writes disjoint, deterministic parts and `medfm shard merge`
joins them into one shard set equal (as a set of samples) to one machine's run; the Slurm array script runs both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from medfm.cli import main
from medfm.data_shards.discover import Part

REPO = Path(__file__).resolve().parents[2]


def sample_hashes(out: Path) -> list[str]:
    hashes = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            hashes += [
                json.loads(tar.extractfile(m).read())["sha256"] for m in tar.getmembers() if m.name.endswith(".json")
            ]
    return hashes


@pytest.fixture
def sources(shared_data: Path, tmp_path: Path) -> list[str]:
    # a folder copy of the embedded samples beside the real series and the same series again (duplicates that
    # land in other parts than their originals: exact dedup has to work across parts)
    archive = tmp_path / "archive"
    shutil.copytree(shared_data / "dicom" / "series", archive / "series")
    shutil.copytree(shared_data / "dicom" / "single", archive / "single")
    shutil.copytree(shared_data / "dicom" / "series", archive / "copy" / "series")
    return [str(archive), f"medmnist:{shared_data / 'medmnist' / 'breastmnist.npz'}", "sample:"]


def test_parts_are_disjoint_and_merge_to_the_one_machine_result(sources: list[str], tmp_path: Path, capsys):
    common = ["--max-side", "64", "--workers", "1", "--max-count", "200"]
    assert main(["shard", *sources, "--out", str(tmp_path / "single"), *common]) == 0
    single = sample_hashes(tmp_path / "single")
    parts = []
    for k in (1, 2, 3):
        parts.append(tmp_path / f"part-{k}")
        assert main(["shard", *sources, "--out", str(parts[-1]), "--part", f"{k}/3", *common]) == 0
    per_part = [set(sample_hashes(p)) for p in parts]
    assert all(per_part), "a part is empty: the split is degenerate"
    assert sum(len(json.loads((p / "manifest.json").read_text())["shards"]) for p in parts) >= 3
    capsys.readouterr()
    assert main(["shard", "merge", *map(str, reversed(parts)), "--out", str(tmp_path / "merged")]) == 0
    merged = sample_hashes(tmp_path / "merged")
    assert len(merged) == len(set(merged)), "a duplicate survived the merge"
    assert sorted(merged) == sorted(single)
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == len(single) and manifest["totals"]["duplicates_across_parts"] > 0
    assert (
        manifest["totals"]["inputs_read"]
        == json.loads((tmp_path / "single" / "manifest.json").read_text())["totals"]["inputs_read"]
    )
    # deterministic: a part written again is byte-identical
    assert main(["shard", *sources, "--out", str(tmp_path / "again"), "--part", "2/3", *common]) == 0
    for shard in sorted(parts[1].glob("shard-*.tar")):
        assert (tmp_path / "again" / shard.name).read_bytes() == shard.read_bytes()


def test_merge_refuses_an_incomplete_or_mixed_set_of_parts(sources: list[str], tmp_path: Path, capsys):
    for k in (1, 2):
        assert (
            main(["shard", *sources[1:2], "--out", str(tmp_path / f"p{k}"), "--part", f"{k}/3", "--workers", "1"]) == 0
        )
    assert main(["shard", "merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(tmp_path / "m")]) == 2
    assert "missing [3]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="1 <= K <= N"):
        Part.parse("4/3")


def test_the_slurm_array_script_shards_and_merges(sources: list[str], tmp_path: Path):
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_CPUS_PER_TASK": "1",
    }
    script = REPO / "slurm" / "shard_array.sbatch"
    out = tmp_path / "out"
    for k in ("1", "2", "2"):  # the repeated task finds its part finished
        done = subprocess.run(
            ["bash", str(script), str(out), *sources[:2], "--max-side", "64"],
            cwd=tmp_path,
            env={**env, "SLURM_ARRAY_TASK_ID": k},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert "already finished" in done.stdout
    done = subprocess.run(
        ["bash", str(script), "--merge", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "merged" / "manifest.json").read_text())["totals"]["parts"] == 2
