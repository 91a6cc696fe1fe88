"""Release faults (issue 21, items 6 and 9, the config.json tracebacks, ``medfm export --out`` of item 8): what a
tampered release, a hostile ``config.json`` and an interrupted export do now.

- Weights re-saved as int8 (right names and shapes): ``medfm eval`` refuses the release (exit 1) naming
  ``model.safetensors`` and the first tensors of the wrong dtype. Before: it loaded (cast silently) and reported
  AUC 0.500 as the release's result. A float16 re-save still loads.
- A ``config.json`` naming ``module:os.system`` or an import path as the architecture, an unknown architecture,
  ``img_size`` 200000, or ``model_args`` as a string: refused (exit 1) in one line naming the file and the key,
  before any weight is read or model built; nothing named is imported or called. Before: messages that named
  neither, or a traceback (an attempt to allocate 600 GB for the position embedding).
- SIGTERM during ``medfm export --overwrite`` between the files: the process still dies by SIGTERM, but the old
  release is left whole and loadable and no temp file remains (the release is written in a sibling folder and
  swapped in by renames). Before: new weights with the old config.json and card, loading without complaint.
- A full disk (ENOSPC) while writing the weights or config.json: one line saying the old release is intact
  (exit 1), the old release whole, no temp file. Before: a traceback, weights without config, a stray temp file.
- A second ``medfm export`` into a release folder being written: refused (exit 1) naming the holder.
- A writer killed between the two renames of the swap: the next export puts the old release back first.
- Weights holding NaN are never released (a diverged run): ``ExportError`` naming the tensor, nothing written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medfm.cli import main as medfm
from medfm.downstream.load import load_backbone
from medfm.pretrain.export import export_run
from medfm.pretrain.release import ExportError, LoadError, write_release

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, pretrain_overrides, reset_accelerate, noise_npz) -> Path:
    """A 4-step MAE run (checkpoints at steps 2 and 4) on noise images, and its step-2 release in ``old/``."""
    from medfm.pretrain.main import pretrain

    root = tmp_path_factory.mktemp("release_faults")
    npz = noise_npz(root / "noise.npz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert pretrain(None, pretrain_overrides("mae", f"medmnist:{npz}", root / "run")) == 0
        export_run(root / "run", root / "old", checkpoint=root / "run" / "step-0000002.pt")
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    return root / "run"


@pytest.fixture
def old_release(run: Path, tmp_path: Path) -> Path:
    """A copy of the step-2 release in an empty folder of its own: ``tmp_path/releases/release``."""
    release = tmp_path / "releases" / "release"
    shutil.copytree(run.parent / "old", release)
    return release


def assert_old_release_is_whole(release: Path, run: Path) -> None:
    """Every file is the step-2 release's, it loads, and nothing else is beside it (no temp folder or file)."""
    old = run.parent / "old"
    assert {p.name: p.read_bytes() for p in release.iterdir()} == {p.name: p.read_bytes() for p in old.iterdir()}
    assert json.loads((release / "config.json").read_text())["medfm"]["steps"] == 2
    load_backbone(release)
    assert sorted(p.name for p in release.parent.iterdir()) == [release.name]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message on stderr"
    return err[-1]


# --- 6. dtypes -------------------------------------------------------------------------------------------------


def test_a_release_resaved_as_int8_is_refused_by_eval(old_release: Path, run: Path, tmp_path: Path, capsys):
    weights = old_release / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: (v * 100).to(torch.int8) for k, v in state.items()}, str(weights))
    data = f"medmnist:{run.parent / 'noise.npz'}"
    code = medfm(
        ["eval", "--backbone", str(old_release), "--data", data, "--out", str(tmp_path / "eval"), "plots=false"]
    )
    message = one_line_error(capsys)
    assert code == 1
    assert message.startswith(f"medfm eval: {weights}: weights of the wrong dtype for the model (")
    assert "blocks.0.attn.proj.bias int8 vs model float32" in message


def test_a_half_precision_release_still_loads(old_release: Path):
    weights = old_release / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    assert load_backbone(old_release).load_report.new_keys == ()


# --- config.json attacks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"architecture": "module:os.system"}, "architecture"),
        ({"architecture": "os.system"}, "architecture"),
        ({"architecture": "vit_tiny_patch99_nonexistent"}, "architecture"),
        ({"model_args": {"in_chans": 1, "img_size": 200000, "patch_size": 7, "depth": 2}}, "model_args.img_size"),
        ({"model_args": "in_chans=1, img_size=28"}, "model_args"),
    ],
    ids=["module-os-system", "import-path", "unknown-architecture", "img-size-200000", "model-args-string"],
)
def test_a_hostile_config_json_is_refused_naming_the_file_and_key(
    change, key, old_release: Path, run: Path, tmp_path: Path, monkeypatch, capsys
):
    called = []
    monkeypatch.setattr(os, "system", lambda *args: called.append(args))
    config_path = old_release / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    data = f"medmnist:{run.parent / 'noise.npz'}"
    code = medfm(
        ["eval", "--backbone", str(old_release), "--data", data, "--out", str(tmp_path / "eval"), "plots=false"]
    )
    message = one_line_error(capsys)
    assert code == 1 and not called
    assert message.startswith(f"medfm eval: {config_path}: key {key!r} ")
    with pytest.raises(LoadError, match=f"key {key!r}"):  # the Python API: the same error
        load_backbone(old_release)


def test_a_warm_start_source_gets_the_same_checks_as_a_release(old_release: Path):
    """``model.init`` (and eval's baselines) read weights through the same checks: an int8 re-save and a hostile
    ``config.json`` are refused naming the file, before anything is loaded."""
    from medfm.pretrain.weights import load_init

    config = json.loads((old_release / "config.json").read_text())
    model = load_backbone(old_release)
    weights = old_release / "model.safetensors"
    good = load_file(str(weights))
    save_file({k: (v * 100).to(torch.int8) for k, v in good.items()}, str(weights))
    with pytest.raises(LoadError, match=rf"{weights}: weights of the wrong dtype for the run's"):
        load_init(model, str(old_release), config["architecture"])
    save_file(good, str(weights))
    (old_release / "config.json").write_text(json.dumps({**config, "architecture": "module:os.system"}))
    with pytest.raises(LoadError, match=rf"{old_release / 'config.json'}: key 'architecture'"):
        load_init(model, str(old_release), config["architecture"])
    (old_release / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="cannot read the release config"):
        load_init(model, str(old_release), config["architecture"])


# --- 9. an interrupted export ----------------------------------------------------------------------------------

# Exports RUN into OUT (--overwrite) and sends itself SIGTERM just before config.json is written.
SIGTERM_EXPORT = """
import os, signal, sys
import medfm.pretrain.release.format as release
from medfm.cli import main

write_text = release.write_text

def interrupted(path, text):
    if path.name == "config.json":
        os.kill(os.getpid(), signal.SIGTERM)
    write_text(path, text)

release.write_text = interrupted
sys.exit(main(["export", sys.argv[1], "--out", sys.argv[2], "--overwrite"]))
"""


def test_sigterm_during_export_leaves_the_old_release_whole(old_release: Path, run: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_EXPORT, str(run), str(old_release)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]  # it still ends as the signal meant
    assert_old_release_is_whole(old_release, run)


def _full_disk_text(path: Path, text: str) -> None:
    """``write_text`` on a disk that fills up after a few bytes of the temp file."""
    path.with_name(f".{path.name}.{os.getpid()}.tmp").write_text(text[:16])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _full_disk_weights(tensors, filename, metadata=None) -> None:
    """``save_file`` on a full disk: safetensors' own error, after a partial file."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\x08\x00\x00\x00partial")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    ("target", "full_disk"),
    [("save_file", _full_disk_weights), ("write_text", _full_disk_text)],
    ids=["weights", "config"],
)
def test_a_full_disk_during_export_leaves_the_old_release_whole(
    target, full_disk, old_release: Path, run: Path, monkeypatch, capsys
):
    from medfm.pretrain.release import format as release_format

    monkeypatch.setattr(release_format, target, full_disk)
    assert medfm(["export", str(run), "--out", str(old_release), "--overwrite"]) == 1
    assert one_line_error(capsys) == (
        f"medfm export: disk full writing the release {old_release}: the release there is intact; free space and "
        "rerun the same command"
    )
    assert_old_release_is_whole(old_release, run)
    monkeypatch.undo()
    assert medfm(["export", str(run), "--out", str(old_release), "--overwrite"]) == 0
    assert json.loads((old_release / "config.json").read_text())["medfm"]["steps"] == 4


def test_a_second_export_into_a_release_being_written_is_refused(old_release: Path, run: Path, capsys):
    from medfm.data_shards.outputs import lock_folder

    lock_file = old_release.with_name(f".{old_release.name}.lock")
    with lock_folder(old_release, "medfm export", lock_file=lock_file):  # another export, in the middle of it
        assert medfm(["export", str(run), "--out", str(old_release), "--overwrite"]) == 1
        message = one_line_error(capsys)
    assert message.startswith(
        f"medfm export: {old_release} is being written by another medfm export (pid {os.getpid()} "
    )
    assert_old_release_is_whole(old_release, run)


def test_an_export_killed_between_the_renames_is_recovered_by_the_next(old_release: Path, run: Path):
    stranded = old_release.with_name(f".{old_release.name}.99999.old")
    old_release.rename(stranded)  # what SIGKILL between the two renames of the swap leaves
    with pytest.raises(ExportError, match="not empty"):  # put back first, then protected like any release
        export_run(run, old_release)
    assert_old_release_is_whole(old_release, run)
    export_run(run, old_release, overwrite=True)
    assert json.loads((old_release / "config.json").read_text())["medfm"]["steps"] == 4
    assert sorted(p.name for p in old_release.parent.iterdir()) == [old_release.name]


def test_weights_holding_nan_are_never_released(run: Path, tmp_path: Path):
    config = json.loads((run / "release" / "config.json").read_text())
    state = load_file(str(run / "release" / "model.safetensors"))
    state["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"blocks\.1\.mlp\.fc2\.weight holds NaN or infinite values"):
        write_release(tmp_path / "release", config, state)
    assert list(tmp_path.iterdir()) == []
