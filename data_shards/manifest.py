"""``manifest.json``: what a finished shard set holds. ``ShardWriter`` writes it last, so a folder with one is a
complete ``medfm shard`` output; every reader goes through ``Manifest.read``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medfm.data_shards.errors import MedfmError, MissingInputError

MANIFEST = "manifest.json"
FORMAT = "medfm-shards/1"
REQUIRED = ("totals",)  # what every reader needs; the writer always writes every field
# The smallest a sample can take in a shard: two tar members (record + pixels), each a 512-byte header and at
# least one 512-byte block. A count above bytes / MIN_SAMPLE_BYTES is an edited manifest, whatever its sum.
MIN_SAMPLE_BYTES = 2 * 1024
SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(MedfmError, ValueError):
    """A manifest file that exists but is not one: not a JSON object, a required key missing, a wrong type."""


@dataclass(frozen=True)
class Manifest:
    """One shard set's manifest; fields in the file's key order.

    totals: ``samples``, ``shards``, ``bytes``, ``labeled``, ``inputs_planned`` / ``_read`` / ``_skipped``,
        ``duplicates_exact`` / ``_near``, and ``by_modality`` / ``by_source`` / ``by_split`` (name -> samples).
    classes: label (as a string) -> class name.
    shards: one ``{"name", "count", "bytes", "sha256", ...}`` per shard file, in write order.
    skipped: one ``{"source", "reason"}`` per input left out.
    part: ``"K/N"`` for one part of a multi-machine run (``medfm shard --part``), joined by ``medfm shard merge``.
    reduction: for a set written by ``medfm shard reduce``: the source set, model, method, fraction kept, and one
    ``{"key", "source", "reason"}`` per sample dropped (its nearest kept sample and their cosine similarity).
    """

    format: str = FORMAT
    command: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the ShardConfig of the run (path salt hidden)
    sources: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    part: str = ""  # "K/N": one machine's part of a multi-machine run (`medfm shard --part`), to merge
    reduction: dict[str, Any] = field(default_factory=dict)  # `medfm shard reduce`: what was dropped and why

    @staticmethod
    def path(folder: str | Path) -> Path:
        return Path(folder) / MANIFEST

    @classmethod
    def exists(cls, folder: str | Path) -> bool:
        """True when ``folder`` holds a finished shard set."""
        return cls.path(folder).is_file()

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of the shard set in ``folder``.

        Raises ``MissingInputError`` (a ``FileNotFoundError``) when there is none (not a finished shard set) and
        ``ManifestError`` naming the file when it is not a manifest.
        """
        path = cls.path(folder)
        if not path.is_file():
            raise MissingInputError(f"{path} not found (not a finished `medfm shard` output)")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ManifestError(f"{path}: not a shard manifest ({err})") from err
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, path: str) -> Manifest:
        """A manifest from its JSON text (read from ``path``, a file or a URL: named in errors).

        Checked here, before any reader sizes anything from it: the type of every key, ``totals`` counts that are
        non-negative integers (not ``1e15`` as a float, ``"lots"`` or ``1e400``, which JSON reads as inf), shard
        entries with a plain file ``name`` (nothing that leaves the folder), integer ``count`` / ``bytes`` and a
        sha256, and the sums: shard counts add up to ``totals.samples``, bytes to ``totals.bytes``.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: not a shard manifest ({err})") from err
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: not a shard manifest (a JSON {type(data).__name__}, not an object)")
        missing = [key for key in REQUIRED if key not in data]
        if missing:
            raise ManifestError(f"{path}: not a shard manifest (no {', '.join(map(repr, missing))})")
        values = {}
        for item in fields(cls):
            if item.name not in data:
                continue
            want = type(item.default) if item.default is not MISSING else type(item.default_factory())
            if not isinstance(data[item.name], want):
                raise ManifestError(f"{path}: key {item.name!r} must be a JSON {want.__name__}")
            values[item.name] = data[item.name]
        manifest = cls(**values)
        manifest._check(path, has_shards="shards" in data)
        return manifest

    def _check(self, path: str, *, has_shards: bool) -> None:
        """ManifestError naming ``path`` and the key for a value no writer produces (see ``parse``)."""

        def fail(key: str, problem: str) -> None:
            raise ManifestError(f"{path}: key {key!r} {problem}")

        totals = self.totals
        if "samples" not in totals:
            fail("totals.samples", "is missing")
        for key, value in totals.items():
            if key.startswith("by_"):
                if not isinstance(value, dict):
                    fail(f"totals.{key}", f"must be a JSON object of counts, not {_shown(value)}")
                for name, count in value.items():
                    if not _is_count(count):
                        fail(f"totals.{key}.{name}", f"must be a non-negative integer, not {_shown(count)}")
            elif not _is_count(value):
                fail(f"totals.{key}", f"must be a non-negative integer, not {_shown(value)}")
        if sum(totals.get("by_split", {}).values()) > totals["samples"]:
            fail("totals.by_split", f"counts more samples than totals.samples ({totals['samples']})")
        for label, name in self.classes.items():
            if not (isinstance(label, str) and label.lstrip("-").isdigit() and isinstance(name, str)):
                fail(f"classes.{label}", f"must map an integer label to a class name, not {_shown(name)}")
        for index, shard in enumerate(self.shards):
            where = f"shards[{index}]"
            if not isinstance(shard, dict):
                fail(where, f"must be a JSON object, not {_shown(shard)}")
            name = shard.get("name")
            if not isinstance(name, str) or not name:
                fail(f"{where}.name", f"must be a shard file name, not {_shown(name)}")
            if not is_plain_name(name):
                fail(f"{where}.name", f"{name!r} is not a file name inside the shard folder (a path that leaves it)")
            for key in ("count", "bytes"):
                if not _is_count(shard.get(key)):
                    fail(f"{where}.{key}", f"must be a non-negative integer, not {_shown(shard.get(key))} ({name})")
            if shard["count"] * MIN_SAMPLE_BYTES > shard["bytes"]:
                fail(f"{where}.count", f"{shard['count']} samples cannot fit in {shard['bytes']} bytes ({name})")
            if not isinstance(shard.get("sha256"), str) or not SHA256.fullmatch(shard["sha256"]):
                fail(f"{where}.sha256", f"must be 64 lowercase hex digits, not {_shown(shard.get('sha256'))} ({name})")
        names = [shard["name"] for shard in self.shards]
        if len(set(names)) != len(names):
            fail("shards", f"names a shard twice: {sorted({n for n in names if names.count(n) > 1})[:3]}")
        if not has_shards:  # a summary without its shard list (reading the data then fails in open_shard_set)
            return
        if not self.shards and not self.part:  # a part of a small run may be empty: merge reads it
            fail("shards", "lists no shard (an empty shard set)")
        listed = sum(shard["count"] for shard in self.shards)
        if listed != totals["samples"]:
            fail("totals.samples", f"is {totals['samples']} but the shards list {listed} samples")
        for key, value in (("shards", len(self.shards)), ("bytes", sum(s["bytes"] for s in self.shards))):
            if key in totals and totals[key] != value:
                fail(f"totals.{key}", f"is {totals[key]} but the shard list gives {value}")

    def entry(self, name: str) -> dict[str, Any]:
        """The shard entry named ``name`` (``{"name", "count", "bytes", "sha256"}``)."""
        return next(shard for shard in self.shards if shard["name"] == name)

    def class_names(self) -> list[str]:
        """Class names in label order (empty for unlabeled shard sets)."""
        return [self.classes[k] for k in sorted(self.classes, key=int)]

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/manifest.json`` atomically (temp file + ``os.replace``); return its path."""
        path = self.path(folder)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(asdict(self), handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path


def is_plain_name(name: str) -> bool:
    """True for a file name that stays in its folder: no separator, not ``.`` / ``..``, not absolute, no NUL."""
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
        and not re.match(r"[A-Za-z]:", name)  # a Windows drive
    )


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (``True`` is a bool, ``1e15`` a float, ``1e400`` inf: none is a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(value: Any) -> str:
    """A value as the message shows it: JSON-like, cut short."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (out of range)"
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
