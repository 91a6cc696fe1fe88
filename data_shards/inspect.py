"""``medfm shard inspect DIR``: manifest summary and a PNG grid of random samples per modality; with ``--verify``,
every shard checked against the manifest first.

The grids are how a user checks that windowing and polarity are right (bright bone on every X-ray,
lungs dark on a lung window) before spending GPU hours on the shards.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from medfm.data_shards.manifest import Manifest
from medfm.data_shards.stream import SampleDamaged, ShardDamaged, read_shard, sample_pixels, sample_record, shard_paths

TILE = 160
MAX_SHARDS_SCANNED = 16  # reservoir-sample from at most this many shards so inspect stays quick on huge sets


def summary_text(manifest: Manifest) -> str:
    totals = manifest.totals
    lines = [
        f"shards: {totals['shards']}  samples: {totals['samples']}  bytes: {totals['bytes'] / 1e6:.1f} MB"
        f"  labeled: {totals['labeled']}",
        f"inputs: {totals['inputs_planned']} planned, {totals['inputs_read']} read, {totals['inputs_skipped']} skipped",
        f"duplicates dropped: {totals['duplicates_exact']} exact, {totals['duplicates_near']} near",
        "by modality: " + ", ".join(f"{k} {v}" for k, v in totals["by_modality"].items()),
        "by source:   " + ", ".join(f"{k} {v}" for k, v in totals["by_source"].items()),
    ]
    if totals["by_split"]:
        lines.append("by split:    " + ", ".join(f"{k} {v}" for k, v in totals["by_split"].items()))
    if manifest.classes:
        lines.append("classes:     " + ", ".join(f"{k}={v}" for k, v in manifest.classes.items()))
    reasons: dict[str, int] = {}
    for entry in manifest.skipped:
        reason = entry["reason"].split(":")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"skipped {count:6d} x {reason}")
    return "\n".join(lines)


def display_tile(pixels: np.ndarray) -> Image.Image:
    """Stored pixels -> 8-bit tile of TILE x TILE (aspect kept, padded black); 2 or 4+ channels show channel 0."""
    if pixels.ndim == 3 and pixels.shape[2] != 3:
        pixels = pixels[..., 0]
    scale = 255.0 / (65535.0 if pixels.dtype == np.uint16 else 255.0)
    image = Image.fromarray(np.rint(pixels.astype(np.float32) * scale).astype(np.uint8)).convert("RGB")
    scale = TILE / max(image.size)  # small images (MedMNIST, 64 px MR) are enlarged to stay legible
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    tile = Image.new("RGB", (TILE, TILE))
    tile.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    return tile


def sample_by_modality(shard_dir: Path, per_modality: int, seed: int) -> dict[str, list[tuple[np.ndarray, dict]]]:
    """Reservoir sample of up to ``per_modality`` (pixels, record) per modality from a few random shards."""
    rng = random.Random(seed)
    manifest = Manifest.read(shard_dir)
    shards = list(zip(shard_paths(shard_dir, manifest), manifest.shards, strict=True))
    shards = sorted(rng.sample(shards, min(len(shards), MAX_SHARDS_SCANNED)))
    seen: dict[str, int] = {}
    chosen: dict[str, list[tuple[np.ndarray, dict]]] = {}
    for path, entry in shards:
        for raw in read_shard(path, entry, whole=False):
            record = sample_record(raw, path)
            modality = record.get("modality", "OT")
            seen[modality] = seen.get(modality, 0) + 1
            bucket = chosen.setdefault(modality, [])
            slot = len(bucket) if len(bucket) < per_modality else rng.randrange(seen[modality])
            if slot < per_modality:
                item = (sample_pixels(raw, record, path), record)
                if slot == len(bucket):
                    bucket.append(item)
                else:
                    bucket[slot] = item
    return chosen


def caption(record: dict) -> str:
    parts = [record.get("window", "")]
    if record.get("class_name"):
        parts.append(str(record["class_name"]))
    elif record.get("label") is not None:
        parts.append(f"label {record['label']}")
    return " ".join(p for p in parts if p)[:26]


def write_grids(shard_dir: Path, out_dir: Path, per_modality: int = 16, seed: int = 0) -> list[Path]:
    """One ``grid_<MODALITY>.png`` per modality in ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for modality, items in sorted(sample_by_modality(shard_dir, per_modality, seed).items()):
        columns = min(len(items), 8)
        rows = -(-len(items) // columns)
        grid = Image.new("RGB", (columns * TILE, rows * (TILE + 14)), "white")
        draw = ImageDraw.Draw(grid)
        for i, (pixels, record) in enumerate(items):
            x, y = (i % columns) * TILE, (i // columns) * (TILE + 14)
            grid.paste(display_tile(pixels), (x, y))
            draw.text((x + 2, y + TILE + 1), caption(record), fill="black")
        path = out_dir / f"grid_{modality}.png"
        grid.save(path)
        written.append(path)
    return written


def verify_shards(shard_dir: Path, manifest: Manifest) -> list[str]:
    """Every shard against the manifest (file present, its ``bytes``, ``sha256`` and ``count``) and every sample
    against the sha256 of its record; one line per bad shard saying what is wrong (empty: all good). Reads each
    shard once, with a progress bar in samples."""
    problems = []
    progress = tqdm(total=manifest.totals["samples"], unit="sample", desc="verify", file=sys.stderr, disable=None)
    with progress:
        for entry in manifest.shards:
            path = Path(shard_dir) / entry["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            bad: list[str] = []
            found = []
            try:
                for raw in read_shard(str(path), entry, whole=True):
                    progress.update(1)
                    try:
                        sample_pixels(raw, sample_record(raw, str(path)), str(path))
                    except SampleDamaged as err:
                        bad.append(str(err).removeprefix(f"{path}: "))
            except ShardDamaged as err:
                found.append(str(err).removeprefix(f"{path}: "))
            if bad:
                found.append(f"{len(bad)} damaged sample(s), first: {bad[0]}")
            if found:
                problems.append(f"{path}: {'; '.join(found)}")
    return problems
