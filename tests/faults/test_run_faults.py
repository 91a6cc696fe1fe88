"""Run faults (issue 21, items 5 runtime half and 8, and the disk-full tracebacks): what a diverging run, a second
writer and a full disk do now.

- A non-finite update (the learning rate turned infinite mid-run): the checkpoint that would hold NaN weights is
  not written; ``TrainingDiverged`` (exit 1) names the first non-finite tensor and says that the last good
  checkpoint is intact, and the next run resumes from it. Before: ``last.pt`` held NaN weights and a rerun resumed
  from them.
- Non-finite metrics and embeddings: ``metrics.jsonl`` stays strict JSON (NaN / infinity written as null) and the
  collapse monitor reports NaN instead of raising; the run stops with the non-finite-step guard's message (exit 1).
  Before: a bare ``Infinity`` in the file and a ``linalg.svd`` traceback.
- Two ``medfm pretrain`` on one run directory: the second is refused (exit 1) naming the folder and the first
  one's pid and host, before it writes anything there; once the first is killed (SIGKILL), the folder is free.
  Before: both ran and interleaved their files.
- Two ``medfm shard --overwrite`` into one ``--out``: the second is refused (exit 1) naming the holder, and the
  first one's shards stay untouched; a killed holder leaves no stale lock. Before: the second deleted them.
- A full disk (ENOSPC) while writing a checkpoint, a shard or a feature cache file: one line saying what is intact
  and how to continue (exit 1), no temp file left, and the suggested rerun finishes. Before: raw tracebacks and
  stray temp files.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medfm.cli import main as medfm
from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.main import pretrain

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "pretrain" / "mae_vit_tiny_pneumonia28.yaml"
# Holds a folder's lock the way a running medfm command does, until killed.
LOCK_HOLDER = (
    "import sys, time\n"
    "from medfm.data_shards.outputs import lock_folder\n"
    "lock = lock_folder(sys.argv[1], sys.argv[2])\n"
    "print('held', flush=True)\n"
    "time.sleep(300)\n"
)


def records(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl, parsed as strict JSON (NaN / Infinity refused)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def leftovers(folder: Path) -> list[str]:
    """Temp files and folders (medfm's are dot-files ending in .tmp / .old) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith((".tmp", ".old")))


def infinite_lr_from(step: int, monkeypatch) -> None:
    """The engine's lr schedule becomes infinite from ``step`` on (the config refuses ``optim.base_lr=inf`` now:
    this is the same update, reached another way)."""
    from medfm.pretrain.engine import Schedules

    original = Schedules.from_config

    def diverging(cfg):
        schedules = original(cfg)
        schedules.lr = schedules.lr.copy()
        schedules.lr[step:] = np.inf
        return schedules

    monkeypatch.setattr(Schedules, "from_config", staticmethod(diverging))


@pytest.fixture
def npz(tmp_path: Path, noise_npz) -> Path:
    return noise_npz(tmp_path / "noise.npz")


# --- 5. a diverging run ----------------------------------------------------------------------------------------


def test_a_nonfinite_update_is_never_checkpointed_and_the_rerun_resumes_from_the_last_good_one(
    npz, tmp_path, pretrain_overrides, monkeypatch, capsys
):
    run = tmp_path / "run"
    extra = {"checkpoint.every_steps": 1, "train.max_nonfinite_steps": 1}
    overrides = pretrain_overrides("mae", f"medmnist:{npz}", run, **extra)
    infinite_lr_from(2, monkeypatch)  # steps 1-2 are fine; the update of step 3 makes every weight NaN
    assert pretrain(None, overrides) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("medfm pretrain: step 3: ") and "holds NaN or infinite values" in message
    assert "checkpoint was not written" in message and "last.pt and step-0000002.pt are intact" in message
    state = ckpt.load_checkpoint(run / "last.pt")
    assert state["step"] == 2 and ckpt.first_nonfinite(state) is None
    assert not (run / "step-0000003.pt").exists() and leftovers(run) == []
    assert [r["event"] for r in records(run) if r.get("event") == "diverged"] == ["diverged"]

    monkeypatch.undo()  # the same command, lr fixed: resumes from step 2's good weights
    assert pretrain(None, overrides) == 0
    assert [r["step"] for r in records(run) if r.get("event") == "resume"] == [2]
    assert ckpt.first_nonfinite(ckpt.load_checkpoint(run / "last.pt")) is None


def test_nonfinite_metrics_stay_json_and_nan_embeddings_do_not_crash_the_monitor(
    npz, tmp_path, pretrain_overrides, monkeypatch, capsys
):
    run = tmp_path / "run"
    extra = {"logging.every_steps": 1, "checkpoint.every_steps": 100, "train.max_nonfinite_steps": 2}
    infinite_lr_from(1, monkeypatch)  # the lr of step 2 is infinite; steps 3 and 4 see NaN weights
    assert pretrain(None, pretrain_overrides("mae", f"medmnist:{npz}", run, **extra)) == 1
    assert "2 non-finite optimizer steps in a row" in capsys.readouterr().err
    logged = {r["step"]: r for r in records(run) if "event" not in r}  # strict JSON, every line
    assert logged[2]["lr"] is None  # infinite: null, not the bare `Infinity` of Python's json
    assert logged[3]["loss"] is None and logged[3]["effective_rank"] is None and logged[3]["embedding_std"] is None


# --- 8. two writers --------------------------------------------------------------------------------------------


def test_a_second_pretrain_on_a_busy_run_dir_is_refused_and_a_killed_holder_frees_it(
    npz, tmp_path, pretrain_overrides, capsys
):
    run = tmp_path / "run"
    first = pretrain_overrides(
        "mae", f"medmnist:{npz}", run, **{"schedule.epochs": 1000, "checkpoint.every_steps": 10000}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "medfm.cli", "pretrain", "--config", str(RECIPE), *first]
    holder = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and '"start"' in (run / "metrics.jsonl").read_text()):
            assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run did not start within 120 s"
            time.sleep(0.05)
        second = pretrain_overrides("mae", f"medmnist:{npz}", run)
        assert pretrain(None, second) == 1
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith(f"medfm pretrain: {run} is being written by another medfm pretrain")
        assert f"pid {holder.pid} on host " in message
        assert sum(r.get("event") == "start" for r in records(run)) == 1  # the refused run wrote nothing there
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel releases the lock
        holder.wait(timeout=60)
    assert pretrain(None, second) == 0
    assert not (run / ".medfm.lock").exists()


def test_a_second_shard_run_into_a_busy_out_is_refused_and_leaves_the_shards(npz, tmp_path, capsys):
    out = tmp_path / "shards"
    shard = ["shard", f"medmnist:{npz}", "--out", str(out), "--workers", "1", "--max-count", "16"]
    assert medfm(shard) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(out), "medfm shard"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()[-2000:]
        capsys.readouterr()
        assert medfm([*shard, "--overwrite"]) == 1
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith(f"medfm shard: {out} is being written by another medfm shard (pid {holder.pid} ")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".medfm.lock"} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert medfm([*shard, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # the killed holder's lock file is gone too


def test_eval_and_shard_merge_into_a_busy_out_are_refused(npz, tmp_path, capsys):
    """``medfm eval --out`` and ``medfm shard merge --out`` take the folder's lock as shard and pretrain do."""
    from medfm.data_shards.outputs import lock_folder

    for k in (1, 2):
        part = ["shard", f"medmnist:{npz}", "--out", str(tmp_path / f"p{k}"), "--workers", "1", "--part", f"{k}/2"]
        assert medfm(part) == 0
    merged, evaluated = tmp_path / "merged", tmp_path / "eval"
    with lock_folder(merged, "medfm shard merge"), lock_folder(evaluated, "medfm eval"):  # another open file
        capsys.readouterr()
        assert medfm(["shard", "merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(merged)]) == 1
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith(f"medfm shard merge: {merged} is being written by another medfm shard merge (pid ")
        assert (
            medfm(["eval", "--backbone", str(tmp_path / "p1"), "--data", f"medmnist:{npz}", "--out", str(evaluated)])
            == 1
        )
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith(f"medfm eval: {evaluated} is being written by another medfm eval (pid ")
        assert sorted(p.name for p in evaluated.iterdir()) == [".medfm.lock"]  # nothing written beside the lock
    assert medfm(["shard", "merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(merged)]) == 0
    assert not (merged / ".medfm.lock").exists()


# --- disk full -------------------------------------------------------------------------------------------------


def _enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_the_rerun_resumes(
    npz, tmp_path, pretrain_overrides, monkeypatch, capsys
):
    run = tmp_path / "run"
    overrides = pretrain_overrides("mae", f"medmnist:{npz}", run)  # checkpoints at steps 2 and 4
    real_save, files = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint file hits a full disk after a few bytes
        if not isinstance(f, io.BytesIO):  # (RNG states travel between processes through BytesIO)
            files.append(f)
            if len(files) == 2:
                f.write(b"PK\x03\x04 partial")
                raise _enospc("last.pt")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert pretrain(None, overrides) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"medfm pretrain: disk full writing last.pt (step 4) in {run}: last.pt and step-0000002.pt are intact (the "
        "newest checkpoint); free space and rerun the same command to resume"
    )
    assert ckpt.load_checkpoint(run / "last.pt")["step"] == 2 and leftovers(run) == []
    monkeypatch.undo()
    assert pretrain(None, overrides) == 0
    assert [r["step"] for r in records(run) if r.get("event") == "resume"] == [2]
    assert ckpt.load_checkpoint(run / "last.pt")["step"] == 4


def test_a_full_disk_while_sharding_keeps_the_complete_shards_and_resume_finishes(npz, tmp_path, monkeypatch, capsys):
    import webdataset

    out = tmp_path / "shards"
    real_write, written = webdataset.TarWriter.write, []

    def write(self, sample):  # sample 21 of 48 (shards of 8) does not fit on the disk
        if len(written) == 20:
            raise _enospc("shard-000002.tar.tmp")
        written.append(sample["__key__"])
        return real_write(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", write)
    shard = ["shard", f"medmnist:{npz}", "--out", str(out), "--workers", "1", "--max-count", "8"]
    assert medfm(shard) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"medfm shard: disk full writing shard-000002.tar in {out}: the 2 complete shard(s) and the progress journal "
        "are intact; free space and rerun the same command with --resume (instead of --overwrite) to continue"
    )
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    assert leftovers(out) == [] and not (out / ".medfm.lock").exists()
    monkeypatch.undo()
    assert medfm([*shard, "--resume"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 48 and manifest["totals"]["shards"] == 6


def test_a_full_disk_while_caching_features_leaves_no_partial_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from medfm.data_shards.errors import MedfmError
    from medfm.downstream import features as features_module
    from medfm.downstream.features import FeatureCache, Features

    cache = FeatureCache(tmp_path / "cache")
    one = Features(torch.rand(6, 4), torch.arange(6) % 2, tuple(f"k{i}" for i in range(6)))
    cache.get_or_compute({"split": "train"}, lambda: one)

    def full_disk(tensors, filename, metadata=None):  # what safetensors raises on ENOSPC, after a partial write
        Path(filename).write_bytes(b"\x08\x00\x00\x00partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(features_module, "save_file", full_disk)
    with pytest.raises(MedfmError) as info:
        cache.get_or_compute({"split": "test"}, lambda: one)
    assert str(info.value).startswith(f"disk full writing the feature cache file {tmp_path / 'cache'}/")
    assert "the files already cached there are intact" in str(info.value) and "\n" not in str(info.value)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the earlier file, no partial one
    assert torch.equal(cache.get_or_compute({"split": "train"}, lambda: None).features, one.features)
