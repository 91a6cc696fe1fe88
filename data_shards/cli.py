"""``medfm shard SOURCE... --out DIR`` and ``medfm shard inspect DIR``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import unicodedata
from pathlib import Path

from medfm.data_shards.errors import EXIT_CONFIG, MedfmError, exit_code
from medfm.data_shards.manifest import MANIFEST, Manifest


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shard",
        help="write medical images (DICOM, NIfTI, PNG/JPEG/TIFF, npz) as WebDataset shards; `shard inspect DIR` to look, `shard merge` to join parts, `shard reduce` to drop redundant images",
        description=(
            "Write WebDataset tar shards + manifest.json from SOURCEs: files, folders (walked recursively), "
            "medmnist:FILE.npz, imagefolder:DIR, csv:FILE, or sample: (real images shipped in the pydicom and "
            "nibabel wheels). `medfm shard inspect DIR` prints the manifest summary and writes sample grids."
        ),
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="inputs, or `inspect DIR`, or `merge PART_DIR...`")
    parser.add_argument("--out", type=Path, help="output folder for shards and manifest.json")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="reader processes (default: all cores)"
    )
    parser.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    parser.add_argument("--max-count", type=int, default=2000, help="samples per shard (default 2000)")
    parser.add_argument("--max-mb", type=float, default=256.0, help="MB per shard (default 256)")
    parser.add_argument(
        "--codec",
        choices=("npy", "png"),
        default="npy",
        help="lossless image storage: npy (raw, fastest to read; default) or png (smaller, ~30x slower to decode)",
    )
    parser.add_argument(
        "--dedup",
        choices=("none", "exact", "near"),
        default="exact",
        help="drop exact duplicates (content hash), or exact + near duplicates (perceptual hash)",
    )
    parser.add_argument(
        "--near-threshold",
        type=int,
        default=4,
        help="max differing bits (of 64) between perceptual hashes of near-duplicates (default 4)",
    )
    parser.add_argument(
        "--window",
        action="append",
        dest="windows",
        metavar="NAME",
        help="intensity window, repeat to stack channels: header (default), auto, lung, mediastinum, "
        "soft_tissue, abdomen, liver, brain, subdural, stroke, bone, or CENTER/WIDTH in HU (write --window=-600/1500)",
    )
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"))
    parser.add_argument("--nifti-axis", choices=("axial", "coronal", "sagittal"), default="axial")
    parser.add_argument("--nifti-stride", type=int, default=1, help="keep every Nth slice of a volume")
    parser.add_argument("--nifti-intensity", choices=("auto", "ct", "mr"), default="auto")
    parser.add_argument(
        "--min-foreground",
        type=float,
        default=0.02,
        help="skip volume slices with less than this fraction of non-background pixels",
    )
    parser.add_argument("--max-side", type=int, default=None, help="downscale so the longer side is at most N px")
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument(
        "--hash-paths",
        action="store_true",
        default=None,
        help="store a salted hash of source paths (salt from $MEDFM_PATH_SALT) instead of the paths; "
        "the default when any input is DICOM (file and folder names often carry patient names or IDs)",
    )
    paths.add_argument(
        "--keep-paths", dest="hash_paths", action="store_false", help="store source paths as they are, even for DICOM"
    )
    parser.add_argument(
        "--max-pixels",
        type=float,
        default=2**30,
        help="skip an input whose header declares more pixel values (rows x columns x frames x samples, or a "
        "volume's voxels) than this, before decoding it (default 2^30)",
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=900,
        help="skip an input still being read after this many seconds; a reader stuck in a decoder is killed "
        "min(30, T) s later (default 900)",
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        help="address-space limit of each reader process: an input needing more is skipped (default: none)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=("train", "val", "test"),
        metavar="SPLIT",
        help="keep only these splits of sources that define splits (medmnist:, imagefolder:, csv:), e.g. "
        "--splits train for a pretraining pool that never sees evaluation images; other inputs are kept",
    )
    parser.add_argument(
        "--part",
        metavar="K/N",
        help="read only part K of N (inputs assigned by a hash of their folder, the same on every machine); "
        "join the N outputs with `medfm shard merge PART_DIR... --out DIR` (slurm/shard_array.sbatch)",
    )
    parser.add_argument("--per-modality", type=int, default=16, help="inspect: samples per modality grid")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="inspect: read every shard and check its bytes, sha256 and sample count against the manifest and "
        "every sample's pixels against their sha256; exit 1 naming each bad shard",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch; a known failure (``medfm.data_shards.errors.exit_code``) becomes one line on stderr and its exit code."""
    try:
        return dispatch(args)
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise  # a bug: its traceback is the report
        command = "medfm shard" + (f" {args.sources[0]}" if args.sources[0] in ("merge", "inspect", "reduce") else "")
        print(f"{command}: {err}", file=sys.stderr)
        return code


def dispatch(args: argparse.Namespace) -> int:
    if args.out is not None and any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in str(args.out)):
        # A newline or an escape in a folder medfm creates: the folder made would not be the one the user reads back.
        print(f"medfm shard: --out must not contain control characters (got {str(args.out)!r})", file=sys.stderr)
        return EXIT_CONFIG
    if args.sources[0] == "merge":
        return merge_command(args)
    if args.sources[0] == "reduce":
        # the verb needs a backbone: medfm.downstream.cli registers its handler and options on this parser (imports run
        # one way, data_shards <- downstream)
        return args.reduce_handler(args)
    if args.sources[0] == "inspect":
        if len(args.sources) != 2:
            print("usage: medfm shard inspect DIR [--verify]", file=sys.stderr)
            return 2
        return inspect_command(Path(args.sources[1]), args.per_modality, verify=args.verify)
    if args.out is None:
        print("medfm shard: --out DIR is required", file=sys.stderr)
        return 2
    return shard_command(args)


def shard_command(args: argparse.Namespace) -> int:
    from medfm.data_shards.inspect import summary_text
    from medfm.data_shards.shard import shard

    argv = list(getattr(args, "argv", sys.argv[1:]))
    options = {name: getattr(args, name) for name in SHARD_OPTIONS}
    manifest = shard(
        args.sources,
        args.out,
        **options,
        windows=tuple(args.windows or ["header"]),
        percentiles=tuple(args.percentiles),
        command="medfm " + " ".join(shlex.quote(a) for a in argv),
    )
    print(summary_text(manifest))
    print(f"wrote {Manifest.path(args.out)}")
    return 0


# argparse destinations passed to medfm.data_shards.shard.shard as they are
SHARD_OPTIONS = (
    "workers", "resume", "overwrite", "max_count", "max_mb", "codec", "dedup", "near_threshold", "nifti_axis",
    "nifti_stride", "nifti_intensity", "min_foreground", "max_side", "hash_paths", "max_pixels", "timeout",
    "max_memory_gb", "splits", "part",
)  # fmt: skip


def merge_command(args: argparse.Namespace) -> int:
    from medfm.data_shards.inspect import summary_text
    from medfm.data_shards.merge import merge_parts

    if len(args.sources) < 2 or args.out is None:
        print("usage: medfm shard merge PART_DIR... --out DIR", file=sys.stderr)
        return 2
    manifest = merge_parts([Path(p) for p in args.sources[1:]], args.out, overwrite=args.overwrite)
    print(summary_text(manifest))
    print(
        f"{manifest.totals['duplicates_across_parts']} duplicates across parts dropped; wrote {Manifest.path(args.out)}"
    )
    return 0


def inspect_command(shard_dir: Path, per_modality: int, verify: bool = False) -> int:
    from medfm.data_shards.inspect import summary_text, verify_shards, write_grids

    manifest = Manifest.read(shard_dir)
    print(summary_text(manifest))
    for entry in manifest.skipped[:20]:
        print(f"  skipped {entry['source']}: {entry['reason']}")
    if len(manifest.skipped) > 20:
        print(f"  ... {len(manifest.skipped) - 20} more in {MANIFEST}")
    if verify:
        problems = verify_shards(shard_dir, manifest)
        for problem in problems:
            print(f"medfm shard inspect: {problem}", file=sys.stderr)
        if problems:
            print(f"medfm shard inspect: {len(problems)} of {len(manifest.shards)} shards damaged", file=sys.stderr)
            return 1
        print(f"verified {len(manifest.shards)} shards, {manifest.totals['samples']} samples: all match {MANIFEST}")
    try:
        written = write_grids(shard_dir, shard_dir / "inspect", per_modality=per_modality)
    except MedfmError as error:  # a damaged shard among those sampled
        print(
            f"medfm shard inspect: {error} (`medfm shard inspect --verify {shard_dir}` checks every shard)",
            file=sys.stderr,
        )
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0
