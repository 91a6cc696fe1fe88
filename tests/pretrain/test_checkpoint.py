"""The checkpoint contract: atomic files, last + N newest, weights_only loads, RNG round trip, released weights."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medfm.pretrain import checkpoint as ckpt


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


def test_last_is_an_independent_copy_not_a_link(tmp_path):
    ckpt.save_checkpoint(tmp_path, state(1), keep=2)
    last, step = tmp_path / "last.pt", tmp_path / "step-0000001.pt"
    assert last.stat().st_ino != step.stat().st_ino and last.read_bytes() == step.read_bytes()
    step.write_bytes(b"")  # damage one: the other still holds step 1
    assert ckpt.load_checkpoint(last)["step"] == 1


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, damage):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, state(step), keep=2)
    for name in ("last.pt", "step-0000002.pt"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[: 100 if damage == "truncated" else 0])
    path, loaded, notes = ckpt.load_newest_readable(tmp_path)
    assert path == tmp_path / "step-0000001.pt" and loaded["step"] == 1
    assert len(notes) == 2 and "last.pt is unreadable" in notes[0] and "step-0000002.pt is unreadable" in notes[1]


def test_no_readable_checkpoint_at_all_is_an_error_naming_the_files(tmp_path):
    ckpt.save_checkpoint(tmp_path, state(1), keep=1)
    for path in tmp_path.glob("*.pt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"no readable checkpoint: .*last\.pt is unreadable"):
        ckpt.load_newest_readable(tmp_path)


def test_a_checkpoint_that_needs_pickle_is_refused_not_skipped(tmp_path):
    from medfm.pretrain.errors import ConfigError

    ckpt.save_checkpoint(tmp_path, state(1), keep=2)
    torch.save({**state(2), "version": ckpt.VERSION, "payload": object()}, tmp_path / "last.pt")
    with pytest.raises(ConfigError, match=r"train\.run_dir.*last\.pt holds pickled objects"):
        ckpt.load_newest_readable(tmp_path)
