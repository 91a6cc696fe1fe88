"""Pretraining on real shards (``medfm shard`` output streamed by ShardStream): a crash right after a
checkpoint, then the same command, ends with the weights of an uninterrupted run (the stream re-reads and
drops the consumed batches of the interrupted epoch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medfm.cli import main as medfm
from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.main import pretrain


@pytest.fixture(scope="module")
def breast_shards(shared_data: Path, tmp_path_factory) -> Path:
    npz = shared_data / "medmnist" / "breastmnist.npz"
    if not npz.is_file():
        pytest.skip(f"{npz} not found")
    out = tmp_path_factory.mktemp("breast") / "shards"
    command = ["shard", f"medmnist:{npz}", "--out", str(out), "--workers", "1", "--dedup", "none", "--max-count", "200"]
    assert medfm(command) == 0
    return out


class SimulatedCrash(Exception):
    pass


def test_crash_after_checkpoint_then_resume_matches_an_uninterrupted_run(breast_shards, tiny, tmp_path, monkeypatch):
    def overrides(run_dir: Path) -> list[str]:
        # 96 samples per epoch at batch 8: 12 steps; 2 loader workers, each streaming its own shard draw.
        extra = {
            "data.spec": f"shards:{breast_shards}",
            "data.split": "train",
            "data.samples_per_epoch": 96,
            "data.num_workers": 2,
            "data.shuffle_buffer": 50,
            "checkpoint.every_steps": 4,
        }
        return tiny("simclr", run_dir, **extra)

    assert pretrain(None, overrides(tmp_path / "reference")) == 0

    save = ckpt.save_checkpoint

    def crash_after_step_4(run_dir, state, keep):
        path = save(run_dir, state, keep)
        if state["step"] == 4:
            raise SimulatedCrash
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", crash_after_step_4)
    with pytest.raises(SimulatedCrash):
        pretrain(None, overrides(tmp_path / "crashed"))
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    assert pretrain(None, overrides(tmp_path / "crashed")) == 0

    reference = ckpt.load_checkpoint(tmp_path / "reference" / "last.pt")
    resumed = ckpt.load_checkpoint(tmp_path / "crashed" / "last.pt")
    assert reference["step"] == resumed["step"] == 12
    for key, value in reference["model"].items():
        assert torch.allclose(resumed["model"][key], value, atol=1e-6, rtol=0), key
