"""The ``medfm`` console command: one entry point, one subcommand per capability.

Each package contributes its subcommands through ``add_parser(subparsers)``; heavy imports happen only
inside the chosen subcommand so that ``medfm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# (module providing add_parser) in the order shown by --help.
SUBCOMMAND_MODULES = ("data_shards.cli", "pretrain.cli", "downstream.cli", "pretrain.slurm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfm", description="Medical-imaging foundation models by self-supervised pretraining."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    add_demo_parser(subparsers)
    return parser


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job end to end on the real sample images shipped inside the pydicom/nibabel wheels",
    )
    parser.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Shard the embedded sample images (CT, MR, JPEG 2000 CT, ultrasound, 3D/4D NIfTI), inspect them, pretrain
    a tiny MAE on the shards (resuming if the run directory already has a checkpoint) and release its encoder."""
    from pathlib import Path

    out = Path(args.out)
    shards, run = out / "shards", out / "pretrain"
    recipe = Path(__file__).resolve().parent / "configs" / "pretrain" / "demo_mae_sample.yaml"
    steps = [
        ["shard", "sample:", "--out", str(shards), "--overwrite", "--dedup", "near"],
        ["shard", "inspect", str(shards)],
        ["pretrain", "--config", str(recipe), f"data.spec=shards:{shards}", f"train.run_dir={run}"],
        ["export", str(run), "--out", str(out / "release"), "--overwrite"],
    ]
    for step in steps:
        print(f"$ medfm {' '.join(step)}", flush=True)
        code = main(step)
        if code != 0:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(resolve_handler(args.handler)(args) or 0)


def resolve_handler(handler: str | Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A subcommand's handler; ``"module:function"`` names a heavy module, imported only once it is chosen."""
    if isinstance(handler, str):
        module, _, name = handler.partition(":")
        return getattr(importlib.import_module(module), name)
    return handler


if __name__ == "__main__":
    sys.exit(main())
