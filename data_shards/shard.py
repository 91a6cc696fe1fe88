"""``shard(sources, out, ...)``: what ``medfm shard`` and ``medfm.shard`` run (plan, write, manifest).

Raises ``ConfigError`` for options that cannot be run (a bad window, ``--part``, a missing input), ``InputError``
for a source whose content cannot be planned (a csv row without a label) and
``ShardError`` for a shard set that cannot be written (another ``medfm shard`` writing the same ``--out``, a full
disk); every unreadable input becomes a line of the manifest's skip list instead.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from medfm.data_shards.errors import ConfigError, FolderInUse, ShardError
from medfm.data_shards.manifest import Manifest
from medfm.data_shards.outputs import FolderLock, disk_full, is_disk_full, lock_folder
from medfm.data_shards.records import ReadOptions
from medfm.data_shards.windows import parse_window


def shard(
    sources: Sequence[str],
    out: str | Path,
    *,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_count: int = 2000,
    max_mb: float = 256.0,
    codec: str = "npy",
    dedup: str = "exact",
    near_threshold: int = 4,
    windows: Sequence[str] = ("header",),
    percentiles: tuple[float, float] = (0.5, 99.5),
    nifti_axis: str = "axial",
    nifti_stride: int = 1,
    nifti_intensity: str = "auto",
    min_foreground: float = 0.02,
    max_side: int | None = None,
    hash_paths: bool | None = None,
    max_pixels: float = 2**30,
    timeout: int = 900,
    max_memory_gb: float | None = None,
    splits: Sequence[str] | None = None,
    part: str | None = None,
    command: str | None = None,
) -> Manifest:
    """Write ``sources`` as WebDataset shards + ``manifest.json`` in ``out``; returns the manifest.

    The keyword arguments are ``medfm shard``'s options (``medfm shard --help``); ``hash_paths=None`` hashes
    source paths when any input is DICOM or ``part`` is set. ``command`` is recorded in the manifest (default:
    the equivalent ``medfm shard`` command line).
    """
    from medfm.data_shards.discover import Part, PlanFile, PlanWriter, check_sources, plan_sources
    from medfm.data_shards.workers import ShardConfig, hash_path
    from medfm.data_shards.writer import PLAN, ShardDiskFull, ShardWriter, prepare_folder

    out = Path(out)
    workers = workers or os.cpu_count() or 1
    sources = [str(s) for s in sources]
    try:
        windows = tuple(windows)
        for window in windows:
            parse_window(window)
        if codec not in ("npy", "png"):
            raise ConfigError(f"codec must be npy or png, got {codec!r}")
        if dedup not in ("none", "exact", "near"):
            raise ConfigError(f"dedup must be none, exact or near, got {dedup!r}")
        read = ReadOptions(
            windows=windows,
            percentiles=tuple(percentiles),
            nifti_axis=nifti_axis,
            nifti_stride=nifti_stride,
            nifti_intensity=nifti_intensity,
            min_foreground=min_foreground,
            max_side=max_side,
            max_pixels=int(max_pixels),
        )
        config = ShardConfig(
            max_count=max_count,
            max_bytes=int(max_mb * 1024**2),
            codec=codec,
            dedup=dedup,
            near_threshold=near_threshold,
            read=read,
            unit_timeout_s=timeout,
            max_memory_gb=max_memory_gb,
        )
        parsed_part = Part.parse(part) if part else None
        check_sources(sources)  # a mistyped SOURCE must not cost the shard set that --overwrite would replace
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    created = not out.exists()
    lock = _lock_output(out)  # before --overwrite deletes anything: a second writer must not delete the first's shards
    try:
        prepare_folder(out, resume=resume, overwrite=overwrite)
        # what the plan depends on: resume reuses the saved plan only when these match
        header = {"sources": sources, "part": part, "splits": list(splits) if splits else None}
        plan = PlanFile.open(out / PLAN, header) if resume else None
        resumed_plan = plan is not None
        if plan is None:  # streamed to disk as it is made: memory stays flat however large the archive
            print(f"medfm shard: planning {len(sources)} SOURCE(s) with {workers} header reader(s)", file=sys.stderr)
            sink = PlanWriter(out / PLAN, header, tuple(splits) if splits else None)
            try:
                plan_sources(sources, sink, parsed_part, workers=workers)
                plan = sink.close()
            except BaseException as error:
                try:
                    sink.abandon()
                except OSError:  # closing flushes, which a full disk refuses
                    sink.tmp.unlink(missing_ok=True)
                if created:
                    lock.release()
                    out.rmdir()  # nothing was written: leave no empty folder behind a typo
                if is_disk_full(error):
                    full = disk_full(out / PLAN, "nothing else was written", "rerun the same command")
                    raise ShardDiskFull(str(full)) from error
                raise
        # auto: hashed for DICOM, and for every part of a multi-machine run (the parts must agree, and one part
        # cannot know whether another holds DICOM)
        hashed = (plan.has_dicom or parsed_part is not None) if hash_paths is None else hash_paths
        if hashed and hash_paths is None:
            why = "a part of a multi-machine run" if parsed_part is not None else "DICOM inputs"
            print(
                f"medfm shard: {why}: source paths are stored as salted hashes (--keep-paths to keep them)",
                file=sys.stderr,
            )
        salt = os.environ.get("MEDFM_PATH_SALT", "") if hashed else ""
        config = dataclasses.replace(config, hash_paths=hashed, path_salt=salt)
        print(
            f"medfm shard: {plan.units} inputs planned, {plan.skipped} skipped while listing"
            + (f", {plan.left_out} inputs of splits other than {'/'.join(splits)} left out" if plan.left_out else "")
            + (" (the interrupted run's plan: no header scanned again)" if resumed_plan else ""),
            file=sys.stderr,
        )
        if command is None:
            command = "medfm shard " + " ".join(shlex.quote(s) for s in sources) + f" --out {shlex.quote(str(out))}"
        if hashed:  # a SOURCE folder can be named after the patient: the manifest keeps its hash only
            command = " ".join(shlex.quote(hash_path(a, salt) if a in sources else a) for a in shlex.split(command))
        writer = ShardWriter(out, plan, config, command=command, workers=workers, part=part or "")
        writer.prepare(resume=resume)
        return writer.run()
    finally:
        lock.release()


def _lock_output(out: Path) -> FolderLock:
    try:
        lock = lock_folder(out, "medfm shard")
    except FolderInUse as error:
        raise ShardError(str(error)) from None
    if lock.warning:
        print(f"medfm shard: warning: {lock.warning}", file=sys.stderr)
    return lock
