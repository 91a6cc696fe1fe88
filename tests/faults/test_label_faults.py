"""Label and labeled-input faults (issue 21, item 7 and the csv / image tracebacks of "One error contract"): what bad
labels and hostile CSV rows do now, in ``medfm eval`` / ``medfm finetune`` and in ``medfm shard``.

- A CSV label cell that is missing (empty, ``nan``, ``NA``, ``None``, ...): refused (exit 1) naming the CSV and
  the lines, at eval and at shard time. Before: ``nan`` became a class of its own (a 3-class task).
- A split with a single class: refused (exit 1) naming the split and the class, in eval and in finetune, before a
  backbone is trained. Before: eval reported acc 1.000, finetune 0.000. The same for ``shards:`` and ``medmnist:``.
- Integer labels 0 and 2: refused, naming the class without a sample. Before: a phantom class 1 (3 outputs).
- An image folder with an empty class folder: the folder is named in a warning and left out; labels stay 0 and 1
  with the class names in order. ``medfm shard`` lists it as a skip in the manifest. Before: labels 0 and 2 and a
  phantom class 1 (in the task and in the manifest's classes).
- CSV rows naming missing files: one error naming the CSV, the lines and the paths (the first few), before any
  model is loaded. Before: a RuntimeError traceback naming neither the CSV nor the line. ``medfm shard`` still
  counts such a row as a skip in the manifest (checked here).
- CSV rows naming ``../../etc/passwd`` or an absolute path outside the CSV's folder: refused at eval (exit 1) and
  at shard time, naming the line, unless ``MEDFM_CSV_ALLOW_OUTSIDE=1``; an absolute path inside the folder is
  fine. Before: the file was read (eval: "not a DICOM file" after reading /etc/passwd; shard: a skip).
- A decompression-bomb PNG: at eval, one line naming the CSV line and the file (also with loader workers). Before:
  a worker traceback as the message. At shard time it stays a counted skip in the manifest (checked here).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from medfm.cli import main as medfm
from medfm.data_shards.errors import MedfmError
from medfm.data_shards.images import csv_units
from medfm.downstream.data import open_split


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A seeded 2-block ViT-Tiny release at 28 px, one channel (no pretraining: labels are what is tested)."""
    import timm

    torch.manual_seed(0)
    args = {"depth": 2, "patch_size": 7, "img_size": 28, "in_chans": 1}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    folder = tmp_path_factory.mktemp("release")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": args,
              "pretrained_cfg": {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.5],
                                 "first_conv": "patch_embed.proj", "classifier": "head"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    return [f"{folder.name}/{i}.png" for i in range(count)]


def write_csv(root: Path, labels: list[str], name: str = "labels.csv") -> Path:
    """``root/name`` with one image per label under ``root/img`` (line i + 2 names img/i.png)."""
    paths = write_images(root / "img", len(labels))
    csv_path = root / name
    csv_path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in zip(paths, labels, strict=True)))
    return csv_path


def bomb_png(path: Path, side: int = 30_000) -> Path:
    """A 100-byte PNG whose header declares side x side pixels (over Pillow's decompression-bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit gray
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def evaluate(release: Path, spec: str, out: Path, *overrides: str) -> int:
    return medfm(["eval", "--backbone", str(release), "--data", spec, "--out", str(out), "plots=false",
                  "protocols=[knn]", *overrides])  # fmt: skip


def shard(source: str, out: Path) -> int:
    return medfm(["shard", source, "--out", str(out)])


BINARY = [str(i % 2) for i in range(40)]


@pytest.mark.parametrize("missing", ["nan", "NA", "None", ""])
def test_a_missing_csv_label_is_an_error_naming_the_lines(release, tmp_path, capsys, missing):
    csv_path = write_csv(tmp_path, BINARY[:37] + [missing] * 3)
    assert evaluate(release, f"csv:{csv_path}", tmp_path / "eval") == 1
    error = capsys.readouterr().err
    assert f"{csv_path}: lines 39, 40, 41" in error.replace(f" ({missing!r})", "")
    assert "no label in column 'label'" in error
    assert not (tmp_path / "eval" / "release").exists()  # refused before any feature was computed


def test_a_missing_csv_label_is_refused_by_medfm_shard(tmp_path, capsys):
    csv_path = write_csv(tmp_path, [*BINARY[:39], "nan"])
    assert shard(f"csv:{csv_path}", tmp_path / "shards") == 1  # an input's content: exit 1, as in medfm eval
    assert f"{csv_path}: line 41 ('nan'): no label in column 'label'" in capsys.readouterr().err


def test_a_single_class_split_is_an_error_in_eval(release, tmp_path, capsys):
    csv_path = write_csv(tmp_path, ["effusion"] * 40)
    assert evaluate(release, f"csv:{csv_path}", tmp_path / "eval") == 1
    error = capsys.readouterr().err
    assert "the 'train' split has only class 'effusion' (28 samples)" in error
    assert not (tmp_path / "eval" / "release").exists()


def test_a_single_class_split_is_an_error_in_finetune(release, tmp_path, capsys):
    csv_path = write_csv(tmp_path, ["effusion"] * 40)
    args = ["finetune", "--backbone", str(release), "--data", f"csv:{csv_path}", "--out", str(tmp_path / "ft")]
    assert medfm([*args, "train.max_steps=1", "train.batch_size=8", "plots=false"]) == 1
    assert "the 'train' split has only class 'effusion' (28 samples)" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "release" / "results.json").exists()


def test_a_single_class_split_of_a_shard_set_or_npz_is_an_error(release, tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 24), ("val", 8), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        labels = np.zeros(count) if split == "test" else np.arange(count) % 2  # test: only class 0
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    npz = tmp_path / "one_class_test.npz"
    np.savez(npz, **arrays)
    assert evaluate(release, f"medmnist:{npz}", tmp_path / "eval_npz") == 1
    assert "the 'test' split has only class '0' (8 samples)" in capsys.readouterr().err
    assert shard(f"medmnist:{npz}", tmp_path / "shards") == 0
    capsys.readouterr()
    assert evaluate(release, f"shards:{tmp_path / 'shards'}", tmp_path / "eval_shards") == 1
    assert "the 'test' split has only class '0' (8 samples)" in capsys.readouterr().err  # found after a pass


def test_integer_labels_with_a_gap_are_refused_not_a_phantom_class(release, tmp_path, capsys):
    csv_path = write_csv(tmp_path, [str(2 * (i % 2)) for i in range(40)])  # labels 0 and 2
    assert evaluate(release, f"csv:{csv_path}", tmp_path / "eval") == 1
    assert "class '1' of ['0', '1', '2'] has no sample in any split" in capsys.readouterr().err


def folder_with_an_empty_class(root: Path) -> Path:
    for index, name in enumerate(("cardiomegaly", "effusion")):
        write_images(root / "tree" / name, 20, seed=index)
    (root / "tree" / "edema").mkdir()  # sorts between the two: torchvision would give it label 1
    return root / "tree"


def test_an_empty_class_folder_is_named_and_left_out_in_eval(release, tmp_path, capsys):
    tree = folder_with_an_empty_class(tmp_path)
    assert evaluate(release, f"imagefolder:{tree}", tmp_path / "eval") == 0
    err = capsys.readouterr().err
    assert f"warning: imagefolder:{tree}: class folders without an image, left out of the classes: edema" in err
    result = json.loads((tmp_path / "eval" / "release" / "knn" / "results.json").read_text())
    assert result["task"] == {"kind": "binary", "class_names": ["cardiomegaly", "effusion"]}
    labels = {sample["label"] for sample in open_split(f"imagefolder:{tree}", "train")}
    assert labels == {0, 1}


def test_an_empty_class_folder_is_a_counted_skip_in_medfm_shard(tmp_path):
    tree = folder_with_an_empty_class(tmp_path)
    assert shard(f"imagefolder:{tree}", tmp_path / "shards") == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == {"0": "cardiomegaly", "1": "effusion"}
    assert {"source": "edema/", "reason": "empty class folder (no image): not a class"} in manifest["skipped"]


def test_csv_rows_naming_missing_files_are_one_error_naming_the_lines(release, tmp_path, capsys):
    csv_path = write_csv(tmp_path, BINARY)
    text = csv_path.read_text()
    for i in range(3, 10):
        text = text.replace(f"img/{i}.png,", f"img/gone{i}.png,")
    csv_path.write_text(text)
    with pytest.raises(MedfmError, match=rf"7 unreadable file\(s\) \(and 2 more\): {csv_path}:5: no such file "):
        open_split(f"csv:{csv_path}", "train", val_fraction=0.0, test_fraction=0.0)
    assert evaluate(release, f"csv:{csv_path}", tmp_path / "eval") == 1
    assert f"{csv_path}:" in capsys.readouterr().err
    assert shard(f"csv:{csv_path}", tmp_path / "shards") == 0  # at shard time: counted skips, as before
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["totals"]["inputs_skipped"] == 7 and manifest["totals"]["samples"] == 33


@pytest.mark.parametrize("outside", ["../../../../etc/passwd", "/etc/passwd"])
def test_csv_paths_outside_the_csv_folder_are_refused(release, tmp_path, capsys, monkeypatch, outside):
    csv_path = write_csv(tmp_path, BINARY)
    csv_path.write_text(csv_path.read_text().replace("img/3.png,", f"{outside},"))
    problem = f"{csv_path}: line 5 ({outside!r}): path outside the CSV's folder"
    assert evaluate(release, f"csv:{csv_path}", tmp_path / "eval") == 1
    assert problem in capsys.readouterr().err
    assert shard(f"csv:{csv_path}", tmp_path / "shards") != 0
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "shards" / "manifest.json").exists()
    inside = str(tmp_path / "img" / "4.png")  # an absolute path inside the folder is fine
    csv_path.write_text(csv_path.read_text().replace(f"{outside},", f"{inside},"))
    assert len(csv_units(csv_path)) == 40
    monkeypatch.setenv("MEDFM_CSV_ALLOW_OUTSIDE", "1")  # the explicit switch
    csv_path.write_text(csv_path.read_text().replace(f"{inside},", f"{tmp_path / 'img' / '..' / 'img' / '5.png'},"))
    assert len(csv_units(csv_path)) == 40


def test_a_decompression_bomb_png_names_the_file_at_eval_and_is_skipped_at_shard_time(release, tmp_path, capsys):
    csv_path = write_csv(tmp_path, BINARY)
    bomb_png(tmp_path / "img" / "bomb.png")
    csv_path.write_text(csv_path.read_text().replace("img/3.png,", "img/bomb.png,"))
    for workers in (0, 1):  # a loader worker would turn it into a traceback: checked before any worker starts
        assert evaluate(release, f"csv:{csv_path}", tmp_path / f"eval{workers}", f"data.num_workers={workers}") == 1
        error = capsys.readouterr().err.strip()
        assert f"{csv_path}:5: image too large" in error and "bomb" in error
        assert "Traceback" not in error and len(error.splitlines()) == 1
    assert shard(f"csv:{csv_path}", tmp_path / "shards") == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    (skip,) = manifest["skipped"]
    assert skip["source"] == "img/bomb.png" and skip["reason"].startswith("image too large")


def test_label_errors_are_medfm_errors():
    from medfm.downstream.data import LabelError

    assert issubclass(LabelError, MedfmError) and issubclass(LabelError, ValueError)
