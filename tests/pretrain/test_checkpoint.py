"""The checkpoint contract: atomic files, last + N newest, weights_only loads, RNG round trip, released weights."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pretrain import checkpoint as ckpt


def state(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data": {"epoch": 0, "batches_done": step},
        "rng": [ckpt.capture_rng()],
        "config": {"method": "mae", "optim": {"betas": [0.9, 0.95]}, "derived": {"lr": None}},
    }


def test_last_plus_newest_n(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-0000004.pt", "step-0000005.pt"]
    assert ckpt.find_resume(tmp_path) == tmp_path / "last.pt"
    loaded = ckpt.load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    assert loaded["step"] == 5 and loaded["config"]["optim"]["betas"] == [0.9, 0.95]
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(loaded["model"])
    torch.optim.AdamW(model.parameters()).load_state_dict(loaded["optimizer"])


def test_keep_zero_leaves_only_last(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, state(step), keep=0)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_find_resume_without_last(tmp_path):
    assert ckpt.find_resume(tmp_path) is None
    ckpt.save_checkpoint(tmp_path, state(3), keep=2)
    (tmp_path / "last.pt").unlink()
    assert ckpt.find_resume(tmp_path) == tmp_path / "step-0000003.pt"


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, state(1), keep=2)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, state(2), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-0000001.pt"]  # no temp file left
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 1


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"rng": ckpt.capture_rng()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert random.random() == expected[0] and np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
