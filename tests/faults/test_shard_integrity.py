"""Shard integrity faults (issue 21, items 1 and 2, and the shard / manifest tracebacks): what a damaged shard, an
edited manifest and a hostile shard name do now. Every input is built here (noise images, a few seconds).

- 512 random bytes over a tar header in the middle of a labeled shard: ``medfm eval`` exits 1 with one line naming
  the shard file and how many of its listed samples it read. Before: the tar ended there without a word and eval
  reported a result (exit 0) on the samples before the damage.
- A truncated shard: a ``ShardDamaged`` (a ``MedfmError``) naming the file, whether it is local (its size checked
  against the manifest when the set is opened) or streamed (``pipe:``; the tar read to its end). Before: a raw
  ``tarfile.ReadError``.
- Pixels overwritten inside a sample: one-pass reading (evaluation) raises naming the shard and the sample key.
  Before: the wrong pixels were read silently.
- A record edited after writing (a label flipped, same size): one-pass reading raises, the shard's sha256 no longer
  matches the manifest's. A manifest edited to another sha256 or count: the same errors. Before: accepted.
- Pretraining on a shard set with a damaged sample (under the damage budget): the sample is left out, a warning
  event names it and ``metrics.jsonl`` counts it (``samples_rejected``, ``shards_damaged``); the run finishes.
  Before: the sample trained silently.
- A damaged shard among many, streamed by DataLoader workers: left out and counted once. Before: the shard ended
  early without a word.
- Pretraining on a set damaged past the budget (a single shard damaged at sample 30 of 40): the run stops with
  exit 1 naming the shard. Before: it trained on the 30 samples before the damage (exit 0).
- ``medfm shard inspect --verify``: reads every shard and names each bad one (exit 1); a clean set passes (exit 0).
  Before: no such check (``--verify`` unknown).
- Shard names that leave the folder (absolute, ``..``, a sub-path): a ``ManifestError`` naming the key. Before:
  read from outside the folder.
- Manifest values of the wrong type or size (``totals.samples`` 1e15, ``"lots"``, 1e400; ``shards: []``; an entry
  without a name; a count that is a string; a count that cannot fit the shard's bytes; counts that do not add up):
  a ``ManifestError`` naming the file and the key; ``medfm pretrain`` exits 2 naming them. Before: accepted, or a
  traceback (1e15 samples sized the lr schedule: ``np.arange`` over ~10^12 steps, terabytes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfm.cli import main as medfm
from medfm.data_shards.errors import MedfmError
from medfm.data_shards.manifest import Manifest, ManifestError
from medfm.data_shards.stream import ShardStream

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "mae_vit_tiny_pneumonia28.yaml"


def write_images(folder: Path, count: int, size: int = 32) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"img{i:04d}.png")
    return folder


def write_npz(path: Path) -> Path:
    """A MedMNIST-style file of noise images with binary labels: train 40, val 20, test 40 (in one shard: train
    samples 0-39, val 40-59, test 60-99)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 40), ("val", 20), ("test", 40)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Clean shard sets, copied by each test before it damages them: ``labeled`` (one shard of 100), ``one``
    (one shard of 40 unlabeled 32 px images), ``many`` (25 shards of 4) and ``three`` (3 shards of 4)."""
    root = tmp_path_factory.mktemp("integrity")
    sets = {"labeled": root / "labeled", "one": root / "one", "many": root / "many", "three": root / "three"}
    npz = write_npz(root / "labeled.npz")
    assert medfm(["shard", f"medmnist:{npz}", "--out", str(sets["labeled"]), "--workers", "1", "--dedup", "none"]) == 0
    images = write_images(root / "images", 40)
    assert medfm(["shard", str(images), "--out", str(sets["one"]), "--workers", "1"]) == 0
    many = write_images(root / "images100", 100)
    assert medfm(["shard", str(many), "--out", str(sets["many"]), "--workers", "1", "--max-count", "4"]) == 0
    three = write_images(root / "images12", 12)
    assert medfm(["shard", str(three), "--out", str(sets["three"]), "--workers", "1", "--max-count", "4"]) == 0
    return sets


@pytest.fixture
def copy(built, tmp_path):
    """``copy(name)`` -> a fresh copy of a built shard set to damage."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(built[name], tmp_path / name))

    return make


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def damage_header(shard: Path, sample: int) -> None:
    """512 random bytes over the first tar header of sample number ``sample``."""
    offset = next(m.offset for m in members(shard) if m.name.startswith(f"{sample:09d}."))
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.random.default_rng(1).bytes(512))


def overwrite_pixels(shard: Path, key: str) -> None:
    """Flip 16 pixel bytes of sample ``key`` (after the 128-byte .npy header): it still decodes, differently."""
    member = next(m for m in members(shard) if m.name == f"{key}.npy")
    with open(shard, "r+b") as handle:
        handle.seek(member.offset_data + 128)
        pixels = handle.read(16)
        handle.seek(member.offset_data + 128)
        handle.write(bytes(255 - b for b in pixels))


def edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def read_all(folder: Path | str, **kwargs) -> list[dict]:
    return list(ShardStream(folder, resampled=False, shuffle_buffer=0, **kwargs))


def eval_args(folder: Path, tmp_path: Path) -> list[str]:
    """``medfm eval`` of a random tiny timm backbone (a bare weights file) on a shard set: about 2 s."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "backbone.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=0, in_chans=1).state_dict(), str(weights))
    return ["eval", "--backbone", str(weights), "--data", f"shards:{folder}", "--out", str(tmp_path / "eval"),
            "backbone.architecture=test_resnet", "plots=false"]  # fmt: skip


def test_a_damaged_tar_header_fails_evaluation_naming_the_shard(copy, tmp_path, capsys):
    labeled = copy("labeled")
    damage_header(labeled / "shard-000000.tar", 80)  # half-way through the test split
    assert medfm(eval_args(labeled, tmp_path)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{labeled}/shard-000000.tar: read 80 of 100 samples listed in the manifest" in error
    assert "Traceback" not in error


def test_a_truncated_shard_is_a_medfm_error_naming_the_file(copy):
    one = copy("one")
    shard = one / "shard-000000.tar"
    os.truncate(shard, shard.stat().st_size // 2 + 300)  # inside a member's data
    with pytest.raises(MedfmError, match=f"shard-000000.tar: {shard.stat().st_size} bytes on disk"):
        read_all(one)
    # Streamed through a command, the size is not known before reading: the tar read to its end says it.
    with pytest.raises(MedfmError, match=r"shard-000000.tar: read \d+ of 40 samples listed in the manifest"):
        read_all(f"pipe:cat {one}/shard-{{000000..000000}}.tar")


def test_overwritten_pixels_fail_evaluation_naming_the_sample(copy):
    one = copy("one")
    overwrite_pixels(one / "shard-000000.tar", "000000007")
    with pytest.raises(MedfmError, match=re.escape("shard-000000.tar: sample 000000007: its pixels do not match")):
        read_all(one)


def test_an_edited_record_or_manifest_fails_one_pass_reading(copy):
    labeled = copy("labeled")
    shard = labeled / "shard-000000.tar"
    record = next(m for m in members(shard) if m.name == "000000001.json")
    with open(shard, "r+b") as handle:  # the label of sample 1, flipped in place: pixels and size unchanged
        handle.seek(record.offset_data)
        text = handle.read(record.size)
        assert b'"label": 1' in text
        handle.seek(record.offset_data)
        handle.write(text.replace(b'"label": 1', b'"label": 0'))
    with pytest.raises(MedfmError, match=re.escape("shard-000000.tar: its sha256 is not the manifest's")):
        read_all(labeled, split="train")

    clean = copy("one")
    edit_manifest(clean, lambda m: m["shards"][0].update(sha256="0" * 64))
    with pytest.raises(MedfmError, match=re.escape("shard-000000.tar: its sha256 is not the manifest's")):
        read_all(clean)

    def one_more(manifest: dict) -> None:
        manifest["shards"][0]["count"] += 1
        manifest["totals"]["samples"] += 1

    edit_manifest(clean, one_more)
    with pytest.raises(MedfmError, match=re.escape("shard-000000.tar: read 40 of 41 samples listed in the manifest")):
        read_all(clean)


def pretrain_args(folder: Path, run_dir: Path, pretrain_overrides) -> list[str]:
    """A 4-step tiny MAE run on an unlabeled shard set (a few seconds), reading in shard order (no shuffle buffer:
    the first 32 samples, whatever the draw)."""
    overrides = pretrain_overrides(
        "mae", f"shards:{folder}", run_dir, **{"data.split": "null", "data.shuffle_buffer": 1}
    )
    return ["pretrain", "--config", str(RECIPE), *overrides]


def test_pretraining_leaves_out_a_damaged_sample_with_a_warning_and_a_count(copy, tmp_path, pretrain_overrides):
    one = copy("one")
    overwrite_pixels(one / "shard-000000.tar", "000000007")  # 1 of 40 samples: under the budget
    assert medfm(pretrain_args(one, tmp_path / "run", pretrain_overrides)) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    warnings = [line for line in lines if line.get("event") == "warning" and "000000007" in line["message"]]
    assert len(warnings) == 1 and "shard-000000.tar" in warnings[0]["message"]
    assert warnings[0]["samples_rejected"] == 1
    logged = [line for line in lines if "loss" in line]
    assert logged[-1]["samples_rejected"] == 1 and logged[-1]["shards_damaged"] == 0


def test_a_damaged_shard_among_many_is_left_out_and_counted_once(copy):
    from medfm.pretrain.data import EpochLoader

    many = copy("many")
    damage_header(many / "shard-000003.tar", 13)  # the second sample of the 4th shard: 4 of 100 samples lost
    stream = ShardStream(many, samples_per_epoch=400, shuffle_buffer=8)
    loader = EpochLoader(
        stream, lambda image: [image], batch_size=4, batches_per_epoch=100, in_chans=1, seed=0, num_workers=2
    )
    found = []
    loader.damage.report = found.append
    for epoch in range(2):  # the workers start afresh each epoch and find it again: still counted once
        keys = [key for batch in loader.epoch(epoch) for key in batch["key"]]
        assert len(keys) == 400
    assert loader.damage.shards == 1 and loader.damage.samples == 0
    assert len(found) == 1 and "shard-000003.tar: read 1 of 4 samples listed in the manifest" in found[0]


def test_pretraining_stops_once_the_damage_passes_the_budget(copy, tmp_path, pretrain_overrides, capsys):
    one = copy("one")
    damage_header(one / "shard-000000.tar", 30)  # the set's only shard: 10 of 40 samples unreadable
    assert medfm(pretrain_args(one, tmp_path / "run", pretrain_overrides)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "shard-000000.tar: read 30 of 40 samples listed in the manifest" in error
    assert "more than 5%: stopped" in error


def test_shard_inspect_verify_names_each_bad_shard(copy, capsys):
    three = copy("three")
    assert medfm(["shard", "inspect", str(three), "--verify"]) == 0
    assert "verified 3 shards, 12 samples" in capsys.readouterr().out
    overwrite_pixels(three / "shard-000000.tar", "000000002")
    cut = next(m.offset_data for m in members(three / "shard-000002.tar") if m.name == "000000010.npy")
    os.truncate(three / "shard-000002.tar", cut + 100)  # inside the pixels of its third sample
    assert medfm(["shard", "inspect", str(three), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "shard-000000.tar: its sha256 is not the manifest's" in err
    assert "; 1 damaged sample(s), first: sample 000000002: its pixels do not match" in err
    assert "shard-000002.tar: read 2 of 4 samples listed in the manifest" in err
    assert "shard-000001.tar" not in err
    assert "2 of 3 shards damaged" in err


@pytest.mark.parametrize("name", ["/etc/passwd", "../elsewhere/shard-000000.tar", "sub/shard-000000.tar", ".."])
def test_shard_names_that_leave_the_folder_are_refused(copy, name):
    one = copy("one")
    edit_manifest(one, lambda m: m["shards"][0].update(name=name))
    with pytest.raises(ManifestError, match=r"manifest.json: key 'shards\[0\].name'.*leaves it"):
        read_all(one)


def _set_samples(value):
    return lambda m: m["totals"].update(samples=value)


MANIFEST_FAULTS = {
    "samples 1e15": (_set_samples(1e15), "totals.samples"),
    "samples lots": (_set_samples("lots"), "totals.samples"),
    "samples 10^15 as an integer": (_set_samples(10**15), "totals.samples"),
    "no shard": (lambda m: m.update(shards=[]), "shards"),
    "an entry without a name": (lambda m: m["shards"][0].pop("name"), "shards[0].name"),
    "a count that is a string": (lambda m: m["shards"][0].update(count="40"), "shards[0].count"),
    "a count too large for its bytes": (lambda m: m["shards"][0].update(count=10**15), "shards[0].count"),
    "by_split not counts": (lambda m: m["totals"].update(by_split={"train": -1}), "totals.by_split.train"),
}


@pytest.mark.parametrize("fault", sorted(MANIFEST_FAULTS))
def test_manifest_values_of_the_wrong_type_or_size_are_refused_naming_the_key(copy, fault):
    one = copy("one")
    edit, key = MANIFEST_FAULTS[fault]
    edit_manifest(one, edit)
    with pytest.raises(
        ManifestError, match=rf"{one}/manifest.json: key '{key}'".replace("[", r"\[").replace("]", r"\]")
    ):
        Manifest.read(one)


def test_a_manifest_number_out_of_range_fails_pretraining_naming_the_key(copy, tmp_path, pretrain_overrides, capsys):
    one = copy("one")
    path = one / "manifest.json"
    path.write_text(path.read_text().replace('"samples": 40', '"samples": 1e400', 1))  # JSON reads inf
    with pytest.raises(ManifestError, match=re.escape("key 'totals.samples' must be a non-negative integer, not inf")):
        Manifest.read(one)
    path.write_text(path.read_text().replace('"samples": 1e400', '"samples": 1e15', 1))
    assert medfm(pretrain_args(one, tmp_path / "run", pretrain_overrides)) == 1  # the input, not the config
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{path}: key 'totals.samples'" in error
