"""``medfm pretrain --config FILE [key=value ...]``: the subcommand (the ``medfm`` console command adds it)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="YAML recipe (overrides of pretrain/config.py's schema)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides on top, e.g. optim.base_lr=1e-4"
    )
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining (MAE, DINO, SimCLR, MoCo v3) of a timm backbone",
        description=(
            "Train a backbone with a self-supervised objective. Re-running the same command on the same "
            "train.run_dir resumes from its last checkpoint. Launch on several processes with `accelerate launch`. "
            "Under a multi-process launch on GPUs the training runs as a supervised child process "
            "(MEDFM_SUPERVISE=0 opts out, =1 forces): see pretrain/supervise.py."
        ),
    )
    configure(parser)
    # Both imported by the medfm command once chosen. The wrapper (no torch) runs the handler in this process, or
    # medfm.pretrain.main as a supervised child under a multi-process GPU launch (an NCCL watchdog abort becomes exit 3).
    parser.set_defaults(handler="medfm.pretrain.main:run", wrapper="medfm.pretrain.supervise:run")
    return parser
