"""How a release's files reach the disk: each text file by an atomic replace, the folder whole or not at all (a
staging sibling that takes the release folder's place by renames; see ``format.write_release``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_in(new: Path, out_dir: Path) -> None:
    """``new`` takes the place of ``out_dir`` (see ``format.write_release``)."""
    if not out_dir.exists():
        os.rename(new, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except BaseException:  # a signal or an error between the renames: the old release goes back
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swap(out_dir: Path) -> None:
    """What a writer killed (SIGKILL) in the middle of ``format.write_release`` left beside ``out_dir``: its temp folder
    (removed) and, killed between the renames, the old release (put back when ``out_dir`` is missing)."""
    for stale in sorted(out_dir.parent.glob(f".{out_dir.name}.*.tmp")):
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(out_dir.parent.glob(f".{out_dir.name}.*.old"), key=lambda p: p.stat().st_mtime):
        if not out_dir.exists():
            os.rename(old, out_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)


def fsync_folder(folder: Path) -> None:
    """Each file's bytes on disk before the rename publishes them (a power cut must not publish empty files)."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
