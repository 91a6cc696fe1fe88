"""``medfm shard merge PART_DIR... --out DIR``: join the parts of a multi-machine run (``medfm shard --part K/N``)
into one shard set.

The parts are read in K order, their shards in write order, and each sample is copied (bytes unchanged, key
renumbered) unless its pixel hash was already written by an earlier part: exact dedup across parts, so the result
holds the same samples as one machine's run over all inputs. Shards are written as ``*.tar.tmp`` and renamed,
the manifest last (a merge that died leaves no manifest: run it again with ``--overwrite``). One writer per
``--out`` (``medfm.data_shards.outputs.lock_folder``).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from medfm.data_shards.codec import file_sha256
from medfm.data_shards.errors import EXIT_CONFIG, MedfmError
from medfm.data_shards.manifest import FORMAT, MANIFEST, Manifest
from medfm.data_shards.outputs import LOCK_NAME, lock_folder


class MergeError(MedfmError, ValueError):
    """Parts that do not make one run: missing or repeated K, different N or options, not finished. Exit code 2:
    the PART_DIR arguments are what to change."""

    exit_code = EXIT_CONFIG


def check_parts(folders: list[Path]) -> list[tuple[Path, Manifest]]:
    """The parts' manifests sorted by K; MergeError unless they are exactly parts 1..N of one configuration."""
    parts = []
    for folder in folders:
        try:
            manifest = Manifest.read(folder)
        except FileNotFoundError:
            raise MergeError(
                f"{folder}: no {MANIFEST} (that part has not finished; run or --resume it first)"
            ) from None
        if not manifest.part:
            raise MergeError(f"{folder}: not a part of a multi-machine run (written without --part K/N)")
        parts.append((folder, manifest))
    counts = {int(m.part.split("/")[1]) for _, m in parts}
    if len(counts) != 1:
        raise MergeError(f"parts of different splits: {sorted(m.part for _, m in parts)}")
    (count,) = counts
    indices = sorted(int(m.part.split("/")[0]) for _, m in parts)
    if indices != list(range(1, count + 1)):
        missing = sorted(set(range(1, count + 1)) - set(indices))
        repeated = sorted(k for k, n in Counter(indices).items() if n > 1)
        raise MergeError(f"need parts 1..{count} exactly once: missing {missing}, repeated {repeated}")
    configs = {json.dumps(m.config, sort_keys=True) for _, m in parts}
    if len(configs) != 1:
        raise MergeError("the parts were written with different options (codec, windows, sizes, dedup...)")
    return sorted(parts, key=lambda item: int(item[1].part.split("/")[0]))


def shard_samples(shard: Path) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order, as webdataset groups them: ``{"__key__": ..., extension: bytes}``."""
    for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
        yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


class SampleSink:
    """Copies samples (bytes unchanged, keys renumbered 000000000, 000000001, ...) into ``out/shard-NNNNNN.tar``
    files of at most ``max_count`` samples and ``max_bytes`` bytes: each is written as ``.tar.tmp``, fsynced,
    hashed and renamed, so a folder never holds a half-written shard under its final name. ``finish()`` returns
    the manifest's shard entries; ``counts`` / ``by_modality`` / ``by_split`` total what was written.
    (``medfm shard merge`` and ``medfm shard reduce`` write through it.)"""

    def __init__(self, out: Path, max_count: int, max_bytes: int):
        self.out, self.max_count, self.max_bytes = out, max_count, max_bytes
        self.counts: Counter = Counter()
        self.by_modality: Counter = Counter()
        self.by_split: Counter = Counter()
        self.shards: list[dict[str, Any]] = []
        self._handle: Any = None
        self._writer: Any = None
        self._in_shard = 0

    def write(self, sample: dict[str, Any], record: dict[str, Any]) -> None:
        """One sample (``{"__key__", extension: bytes}``) and its decoded json ``record``."""
        size = sum(len(v) for k, v in sample.items() if k != "__key__")
        if self._writer is not None and (
            self._in_shard >= self.max_count or self._handle.tell() + size + 3072 > self.max_bytes
        ):
            self._close()
        if self._writer is None:
            self._handle = open(self.out / f"shard-{len(self.shards):06d}.tar.tmp", "wb")  # noqa: SIM115 (closed in _close())
            self._writer = wds.TarWriter(self._handle, mtime=0.0, user="medfm", group="medfm")
            self._in_shard = 0
        self._writer.write({**sample, "__key__": f"{self.counts['samples']:09d}"})
        self._in_shard += 1
        self.counts["samples"] += 1
        self.counts["labeled"] += record.get("label") is not None
        self.by_modality[record.get("modality", "OT")] += 1
        if "split" in record:
            self.by_split[record["split"]] += 1

    def finish(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._close()
        return self.shards

    def _close(self) -> None:
        self._writer.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        name = f"shard-{len(self.shards):06d}.tar"
        tmp = self.out / f"{name}.tmp"
        self.shards.append(
            {"name": name, "count": self._in_shard, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        )
        os.replace(tmp, self.out / name)
        self._handle = self._writer = None


def merge_parts(folders: list[Path], out: Path, overwrite: bool = False) -> Manifest:
    """Join ``folders`` (every part of one run) into ``out``, which holds the lock of one writer meanwhile (a second
    ``medfm shard merge`` or ``medfm shard`` into it is refused: :class:`FolderInUse`)."""
    parts = check_parts(folders)
    with lock_folder(out, "medfm shard merge") as lock:
        if lock.warning:
            print(f"medfm shard merge: warning: {lock.warning}", file=sys.stderr)
        return _merge_into(parts, folders, out, overwrite)


def _merge_into(parts: list[tuple[Path, Manifest]], folders: list[Path], out: Path, overwrite: bool) -> Manifest:
    if any(path.name != LOCK_NAME for path in out.iterdir()):
        if not overwrite:
            raise MergeError(f"{out} is not empty; choose an empty folder or pass --overwrite")
        for path in [*out.glob("shard-*.tar*"), out / MANIFEST]:
            path.unlink(missing_ok=True)
    config = parts[0][1].config
    sink = SampleSink(out, int(config.get("max_count", 2000)), int(config.get("max_bytes", 256 * 1024**2)))
    seen: set[str] = set()
    duplicates = 0
    for folder, manifest in parts:
        for shard in manifest.shards:
            for sample in shard_samples(folder / shard["name"]):
                record = json.loads(sample["json"])
                if record["sha256"] in seen:
                    duplicates += 1
                    continue
                sink.write(sample, record)
                seen.add(record["sha256"])
    shards = sink.finish()
    if sink.counts["samples"] == 0:
        raise MergeError("the parts hold no sample")
    manifests = [m for _, m in parts]

    def summed(key: str) -> int:
        return sum(int(m.totals.get(key, 0)) for m in manifests)

    by_source: Counter = Counter()
    for m in manifests:
        by_source.update(m.totals.get("by_source", {}))
    merged = Manifest(
        format=FORMAT,
        command="medfm shard merge " + " ".join(str(f) for f in folders) + f" --out {out}",
        config=config,
        sources=sorted({s for m in manifests for s in m.sources}),
        totals={
            "samples": sink.counts["samples"],
            "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
            "labeled": sink.counts["labeled"],
            "inputs_planned": summed("inputs_planned"),
            "inputs_read": summed("inputs_read"),
            "inputs_skipped": summed("inputs_skipped"),
            "duplicates_exact": summed("duplicates_exact") + duplicates,
            "duplicates_near": summed("duplicates_near"),
            "duplicates_across_parts": duplicates,
            "by_modality": dict(sorted(sink.by_modality.items())),
            # per SOURCE argument as each part wrote them (cross-part duplicates are not attributed)
            "by_source": dict(sorted(by_source.items())),
            "by_split": dict(sorted(sink.by_split.items())),
            "parts": len(parts),
        },
        classes=dict(
            sorted({k: v for m in manifests for k, v in m.classes.items()}.items(), key=lambda kv: int(kv[0]))
        ),
        shards=shards,
        skipped=[entry for m in manifests for entry in m.skipped],
    )
    merged.write(out)
    return merged
