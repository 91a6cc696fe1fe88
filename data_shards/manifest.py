"""``manifest.json``: what a finished shard set holds. ``ShardWriter`` writes it last, so a folder with one is a
complete ``medfm shard`` output; every reader goes through ``Manifest.read``.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from data_shards.errors import MedfmError

MANIFEST = "manifest.json"
FORMAT = "medfm-shards/1"
REQUIRED = ("totals",)  # what every reader needs; the writer always writes every field


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

        Raises ``FileNotFoundError`` when there is none (not a finished shard set) and ``ManifestError`` naming
        the file when it is not a manifest.
        """
        path = cls.path(folder)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (not a finished `medfm shard` output)")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ManifestError(f"{path}: not a shard manifest ({err})") from err
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, path: str) -> Manifest:
        """A manifest from its JSON text (read from ``path``, a file or a URL: named in errors)."""
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
        return cls(**values)

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
