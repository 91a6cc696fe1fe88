"""``medfm shard``: read inputs in parallel, drop duplicates, write WebDataset tar shards and a manifest.

Guarantees:
- Deterministic: units are read in planned order and written by one process, so the same inputs and
  options give byte-identical shards (tar mtimes are fixed).
- Atomic and resumable: a shard is written as ``NAME.tar.tmp`` and renamed when complete; after each
  rename a line is appended to ``.progress.jsonl`` with the position of the next record and the dedup
  state. ``--resume`` continues from the last complete shard; the result equals an uninterrupted run.
- A full disk stops the run with :class:`ShardDiskFull` (one line: the complete shards and the journal are
  intact, rerun with ``--resume``), after removing the shard being written and any partial journal line.
- One writer per output folder: ``shard`` holds the folder's lock (``medfm.data_shards.outputs``) from before
  ``--overwrite`` deletes anything until the manifest is written.
- Private: only allowlisted metadata keys (``records.ALLOWED_META_KEYS``) reach a shard or the manifest.
- Bad input never stops the run: each skipped input is listed with its reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from medfm.data_shards.codec import file_sha256, hamming
from medfm.data_shards.discover import PlanFile
from medfm.data_shards.errors import DiskFull, ShardError
from medfm.data_shards.manifest import FORMAT, MANIFEST, Manifest
from medfm.data_shards.outputs import LOCK_NAME, disk_full, is_disk_full
from medfm.data_shards.workers import EncodedSample, ReaderPool, ShardConfig, hash_path

JOURNAL = ".progress.jsonl"
PLAN = ".plan.jsonl"  # the planned inputs of an unfinished run (discover.PlanWriter): --resume does not rescan


class ShardDiskFull(ShardError, DiskFull):
    """A full disk while writing a shard set (a ``ShardError`` for ``medfm shard``, a ``DiskFull`` for callers)."""


@dataclass
class _State:
    """Everything needed to continue a run after the last complete shard."""

    shards: list[dict] = field(default_factory=list)
    next_unit: int = 0
    next_record: int = 0
    seen: set[str] = field(default_factory=set)
    near_last: int | None = None  # perceptual hash of the last kept image of the current unit
    counters: Counter = field(default_factory=Counter)
    by_modality: Counter = field(default_factory=Counter)
    by_source: Counter = field(default_factory=Counter)
    by_split: Counter = field(default_factory=Counter)
    classes: dict[str, str] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)


def prepare_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Check (and create) the output folder before planning: never overwrite silently. With ``overwrite``, an
    earlier shard set is deleted; with ``resume``, an interrupted run is kept for :meth:`ShardWriter.prepare`."""
    out.mkdir(parents=True, exist_ok=True)
    journal = out / JOURNAL
    if overwrite:
        for path in out.glob("shard-*.tar*"):
            path.unlink()
        for name in (MANIFEST, JOURNAL, PLAN):
            (out / name).unlink(missing_ok=True)
        return
    if (out / MANIFEST).exists():
        raise ShardError(f"{out} already holds a complete shard set ({MANIFEST}); pass --overwrite to replace it")
    if journal.exists():
        if not resume:
            raise ShardError(f"{out} holds an interrupted run; pass --resume to finish it or --overwrite to restart")
        return
    if any(path.name not in (JOURNAL, PLAN, PLAN + ".tmp", LOCK_NAME) for path in out.iterdir()):
        raise ShardError(f"{out} is not empty and holds no shard set; choose an empty folder or pass --overwrite")


class ShardWriter:
    """Writes one shard set. Use :meth:`run`; see the module docstring for the guarantees."""

    def __init__(self, out: Path, plan: PlanFile, config: ShardConfig, command: str, workers: int = 1, part: str = ""):
        self.out = Path(out)
        self.part = part
        self.plan = plan
        self.config = config
        self.command = command
        self.workers = max(0, workers)
        self.fingerprint = self._fingerprint()
        self.state = _State()
        self._tar: wds.TarWriter | None = None
        self._handle = None
        self._shard_count = 0
        self._shard_hashes: list[str] = []
        self._pending_skips: list[dict] = []
        self._writing_manifest = False

    def _fingerprint(self) -> str:
        payload = {
            "config": asdict(self.config),
            "units": self.plan.digest,
            "part": self.part,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    # -- output folder state ---------------------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        """Load the interrupted run's journal on ``resume`` (the folder was checked by :func:`prepare_folder`)."""
        journal = self.out / JOURNAL
        if resume and journal.exists():
            self._load_journal(journal)

    def _load_journal(self, journal: Path) -> None:
        lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        header = lines[0] if lines else {}
        if header.get("fingerprint") != self.fingerprint:
            raise ShardError(
                f"{self.out}: the interrupted run used other inputs or options; rerun the same command, or --overwrite"
            )
        for path in self.out.glob("shard-*.tar.tmp"):
            path.unlink()  # the shard that was being written when the run died
        state = self.state
        for entry in lines[1:]:
            shard = entry["shard"]
            if not (self.out / shard["name"]).exists():
                raise ShardError(f"{self.out}: {shard['name']} is listed in {JOURNAL} but missing; use --overwrite")
            state.shards.append(shard)
            state.seen.update(entry["hashes"])
            state.skipped.extend(entry["skipped"])
            state.next_unit, state.next_record = entry["next"]
            state.near_last = entry["near_last"]
            for name in ("counters", "by_modality", "by_source", "by_split"):
                setattr(state, name, Counter(entry[name]))
            state.classes = entry["classes"]
        # Shards after the last journal line may exist if the process died between rename and journal write.
        for path in self.out.glob("shard-*.tar"):
            if path.name not in {s["name"] for s in state.shards}:
                path.unlink()
        self._shard_count = len(state.shards)

    def _start_journal(self) -> None:
        journal = self.out / JOURNAL
        if not journal.exists():
            with open(journal, "w") as handle:
                handle.write(json.dumps({"format": FORMAT, "fingerprint": self.fingerprint}) + "\n")

    # -- shard files ---------------------------------------------------------------------------------
    def _shard_name(self) -> str:
        return f"shard-{self._shard_count:06d}.tar"

    def _open_shard(self) -> None:
        # Kept open across samples and closed in _close_shard (fsync + rename), hence no context manager.
        self._handle = open(self.out / (self._shard_name() + ".tmp"), "wb")  # noqa: SIM115
        self._tar = wds.TarWriter(self._handle, mtime=0.0, user="medfm", group="medfm")
        self._shard_hashes = []

    def _close_shard(self, next_unit: int, next_record: int) -> None:
        assert self._tar is not None and self._handle is not None
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        name = self._shard_name()
        tmp, final = self.out / (name + ".tmp"), self.out / name
        shard = {
            "name": name,
            "count": len(self._shard_hashes),
            "bytes": tmp.stat().st_size,
            "sha256": file_sha256(tmp),
        }
        os.replace(tmp, final)
        state = self.state
        state.shards.append(shard)
        entry = {
            "shard": shard,
            "next": [next_unit, next_record],
            "near_last": state.near_last,
            "hashes": self._shard_hashes,
            "skipped": self._pending_skips,
            "counters": state.counters,
            "by_modality": state.by_modality,
            "by_source": state.by_source,
            "by_split": state.by_split,
            "classes": state.classes,
        }
        with open(self.out / JOURNAL, "a") as handle:
            size = handle.tell()
            try:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            except OSError:  # a full disk: no torn line for --resume to trip on (truncating needs no space)
                handle.truncate(size)
                raise
        state.skipped.extend(self._pending_skips)
        self._pending_skips = []
        self._shard_count += 1
        self._tar = self._handle = None

    def _is_duplicate(self, sample: EncodedSample) -> str | None:
        if self.config.dedup == "none":
            return None
        if sample.sha256 in self.state.seen:
            return "duplicates_exact"
        if (
            sample.phash is not None
            and self.state.near_last is not None
            and hamming(sample.phash, self.state.near_last) <= self.config.near_threshold
        ):
            return "duplicates_near"
        return None

    def run(self) -> Manifest:
        """Write all remaining shards and the manifest; return the manifest. A full disk raises
        :class:`ShardDiskFull` and leaves the complete shards and the journal for ``--resume``."""
        try:
            return self._run()
        except Exception as err:
            if not is_disk_full(err):
                raise
            self._discard_partial()
            done = len(self.state.shards)
            what = MANIFEST if self._writing_manifest else self._shard_name()
            raise ShardDiskFull(
                str(
                    disk_full(
                        f"{what} in {self.out}",
                        f"the {done} complete shard(s) and the progress journal are intact",
                        "rerun the same command with --resume (instead of --overwrite) to continue",
                    )
                )
            ) from err

    def _discard_partial(self) -> None:
        """The shard being written, a half-written manifest, a journal whose header did not reach the disk."""
        if self._handle is not None:
            for item in (self._tar, self._handle):  # the tar stream first: it writes to the handle when collected
                with contextlib.suppress(Exception):
                    item.close()
            self._tar = self._handle = None
        for path in self.out.glob("shard-*.tar.tmp"):
            path.unlink(missing_ok=True)
        Manifest.path(self.out).with_name(MANIFEST + ".tmp").unlink(missing_ok=True)
        journal = self.out / JOURNAL
        if not self.state.shards and journal.is_file():
            with contextlib.suppress(OSError, ValueError, IndexError):
                json.loads(journal.read_text().splitlines()[0])
                return
            journal.unlink()

    def _run(self) -> Manifest:
        self._start_journal()
        state = self.state
        started = time.perf_counter()
        written = 0
        progress = tqdm(
            total=self.plan.units,
            initial=state.next_unit,
            unit="input",
            desc="shard",
            file=sys.stderr,
            disable=None,
            dynamic_ncols=True,
        )
        readers = ReaderPool(self.config, self.workers)
        for result, unit, origin in readers.results(self.plan.iter_units(self.state.next_unit), self.state.next_record):
            unit_index = result.index
            first_record = state.next_record if unit_index == state.next_unit else 0
            if first_record == 0:
                state.near_last = None
            if result.skip_reason is not None:
                state.counters["inputs_skipped"] += 1
                self._pending_skips.append({"source": self._shown(unit.source), "reason": result.skip_reason})
            elif first_record == 0:
                state.counters["inputs_read"] += 1
            for source, reason in result.parts_skipped:  # unreadable slices of a unit whose others were kept
                state.counters["parts_skipped"] += 1
                self._pending_skips.append({"source": self._shown(source), "reason": reason})
            for offset, sample in enumerate(result.samples):
                record_index = first_record + offset
                duplicate = self._is_duplicate(sample)
                if duplicate:
                    state.counters[duplicate] += 1
                    continue
                if self._tar is not None and (
                    len(self._shard_hashes) >= self.config.max_count
                    or self._handle.tell() + len(sample.data) + 3072 > self.config.max_bytes
                ):
                    self._close_shard(unit_index, record_index)
                if self._tar is None:
                    self._open_shard()
                self._write_sample(sample, origin)
                written += 1
            state.next_unit, state.next_record = unit_index + 1, 0
            progress.update(1)
            elapsed = time.perf_counter() - started
            progress.set_postfix(images=state.counters["samples"], img_s=f"{written / max(elapsed, 1e-9):.0f}")
        progress.close()
        if self._tar is not None:
            self._close_shard(self.plan.units, 0)
        manifest = self._manifest()
        if manifest.totals["samples"] == 0 and not self.part:  # a part of a small input set may be empty
            raise ShardError(
                f"no readable image in the inputs ({len(manifest.skipped)} skipped; see the reasons above)"
            )
        self._writing_manifest = True
        manifest.write(self.out)
        (self.out / JOURNAL).unlink()
        (self.out / PLAN).unlink(missing_ok=True)
        return manifest

    def _shown(self, source: str) -> str:
        return hash_path(source, self.config.path_salt) if self.config.hash_paths else source

    def _write_sample(self, sample: EncodedSample, origin: str) -> None:
        state = self.state
        key = f"{state.counters['samples']:09d}"
        record = {**sample.meta, "label": sample.label, "sha256": sample.sha256}
        assert self._tar is not None
        self._tar.write({"__key__": key, sample.extension: sample.data, "json": json.dumps(record).encode()})
        self._shard_hashes.append(sample.sha256)
        state.seen.add(sample.sha256)
        state.near_last = sample.phash
        state.counters["samples"] += 1
        state.counters["labeled"] += sample.label is not None
        state.by_modality[sample.meta.get("modality", "OT")] += 1
        state.by_source[self._shown(origin)] += 1
        if "split" in sample.meta:
            state.by_split[sample.meta["split"]] += 1
        if sample.meta.get("class_name") is not None and isinstance(sample.label, int):
            state.classes[str(sample.label)] = sample.meta["class_name"]

    def _manifest(self) -> Manifest:
        state = self.state
        planned = [{"source": self._shown(s), "reason": r} for s, r in self.plan.iter_skipped()]
        return Manifest(
            format=FORMAT,
            command=self.command,
            config=asdict(self.config) | {"path_salt": "<hidden>" if self.config.path_salt else ""},
            sources=sorted({self._shown(origin) for origin in self.plan.origins}),
            totals={
                "samples": state.counters["samples"],
                "shards": len(state.shards),
                "bytes": sum(s["bytes"] for s in state.shards),
                "labeled": state.counters["labeled"],
                "inputs_planned": self.plan.units,
                "inputs_read": state.counters["inputs_read"],
                "inputs_skipped": state.counters["inputs_skipped"] + len(planned),
                "duplicates_exact": state.counters["duplicates_exact"],
                "duplicates_near": state.counters["duplicates_near"],
                "by_modality": dict(sorted(state.by_modality.items())),
                "by_source": dict(sorted(state.by_source.items())),
                "by_split": dict(sorted(state.by_split.items())),
            },
            classes=dict(sorted(state.classes.items(), key=lambda kv: int(kv[0]))),
            shards=state.shards,
            skipped=planned + state.skipped + self._pending_skips,
            part=self.part,
        )
