"""The error contract (issue 21): every failure medfm recognises is a ``MedfmError`` whose class carries the exit
code, and every subcommand reports it as one line; anything else is a bug and keeps its traceback.

Before: ``medfm.pretrain.errors.exit_code`` turned every ``ValueError`` and ``FileNotFoundError`` into exit 1, so a bug
(an ``IndexError`` aside) looked like a user's mistake, and ``medfm shard`` kept a map of its own.
"""

from __future__ import annotations

import errno

import pytest
import torch

from medfm.cli import main as medfm
from medfm.data_shards.errors import ConfigError, InputError, MedfmError, MissingInputError, exit_code
from medfm.data_shards.manifest import ManifestError
from medfm.data_shards.merge import MergeError
from medfm.pretrain.errors import DistributedFailure, Preempted, ReleaseError, TrainingDiverged, run_command


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (MedfmError("x"), 1),
        (InputError("x"), 1),
        (MissingInputError("x"), 1),
        (ManifestError("x"), 1),
        (TrainingDiverged("x"), 1),
        (ReleaseError("x"), 1),
        (ConfigError("x"), 2),
        (MergeError("x"), 2),
        (DistributedFailure("x"), 3),
        (Preempted(7, "SIGTERM"), 75),
        (PermissionError(errno.EACCES, "Permission denied", "/data/out"), 1),  # the OS about a named file
    ],
)
def test_known_failures_have_their_documented_exit_code(error, code):
    assert exit_code(error) == code


@pytest.mark.parametrize(
    "error", [ValueError("x"), KeyError("x"), TypeError("x"), FileNotFoundError("x"), OSError("no file named")]
)
def test_anything_else_is_a_bug_and_keeps_its_traceback(error, capsys):
    assert exit_code(error) is None

    def body() -> None:
        raise error

    with pytest.raises(type(error)):
        run_command("eval", body)
    assert capsys.readouterr().err == ""


def test_medfm_shard_follows_the_same_contract(monkeypatch, tmp_path, capsys):
    from medfm.data_shards import shard as shard_module

    def failing(error: Exception):
        def shard(*args, **kwargs):
            raise error

        return shard

    command = ["shard", "sample:", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(shard_module, "shard", failing(InputError("a.csv:3: no label")))
    assert medfm(command) == 1
    assert capsys.readouterr().err.strip() == "medfm shard: a.csv:3: no label"
    monkeypatch.setattr(shard_module, "shard", failing(ConfigError("--max-count must be positive")))
    assert medfm(command) == 2
    monkeypatch.setattr(shard_module, "shard", failing(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        medfm(command)


class _FailingImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise InputError(f"scan_{index}.png: truncated image data")


def test_a_failure_inside_a_dataloader_worker_is_still_one_line(capsys):
    """torch re-raises a worker's exception as ``type(err)(its traceback)``: the message stays medfm's one line."""

    def body() -> None:
        next(iter(torch.utils.data.DataLoader(_FailingImages(), num_workers=1)))

    assert run_command("eval", body) == 1
    assert capsys.readouterr().err == "medfm eval: scan_0.png: truncated image data\n"
