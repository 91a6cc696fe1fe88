"""The ``medfm`` console command: one entry point, one subcommand per capability.

Each package contributes its subcommands through ``add_parser(subparsers)``; heavy imports happen only
inside the chosen subcommand so that ``medfm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

# (module providing add_parser) in the order shown by --help.
SUBCOMMAND_MODULES = ("medfm.data_shards.cli", "medfm.pretrain.cli", "medfm.downstream.cli", "medfm.pretrain.slurm")
REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfm", description="Medical-imaging foundation models by self-supervised pretraining."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    add_demo_parser(subparsers)
    add_bench_parser(subparsers)
    return parser


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: `medfm bench quality` (is the backbone worth it?)")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    quality = kinds.add_parser(
        "quality",
        help="pool unlabeled images, pretrain each recipe, evaluate every release on every labeled task",
        description=(
            "Shard the pool (train splits only), pretrain one backbone per recipe on it (labels never used), then "
            "kNN, linear probe and a short fine-tune of each release and of random init on every labeled task, "
            "with label fractions over seeds; writes OUT/results.md, results.json and plots/ next to published "
            "numbers. Re-running the same command continues where it stopped."
        ),
    )
    quality.add_argument(
        "--config", default=str(REPO / "bench" / "quality.yaml"), help="benchmark YAML (default: bench/quality.yaml)"
    )
    quality.add_argument("--out", metavar="DIR", help="output folder (out_dir)")
    quality.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. finetune.enabled=false"
    )
    quality.set_defaults(handler=run_bench_quality)


def run_bench_quality(args: argparse.Namespace) -> int:
    from medfm.pretrain.errors import run_command

    failed: list[int] = []

    def body() -> None:
        from medfm.benchmark import BenchmarkError, load_quality_config, markdown, run_benchmark

        overrides = ([f"out_dir={args.out}"] if args.out else []) + list(args.overrides)
        cfg = load_quality_config(args.config, overrides)
        try:
            report = run_benchmark(cfg, main)
        except BenchmarkError as error:
            print(f"medfm bench quality: {error}; re-run the same command to continue", file=sys.stderr)
            failed.append(error.exit_code)
            return
        print(markdown(report))
        print(f"results: {cfg.out_dir}/results.md, results.json, plots/")

    code = run_command("bench quality", body)
    return failed[0] if failed else code


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole chain in minutes: shard, inspect, pretrain, evaluate against random init, release, report",
        description=(
            "shard -> inspect -> pretrain -> eval (kNN + linear probe, release vs random init) -> export -> "
            "OUT/report/report.md. Pretrains on --data (default: real images shipped in the pydicom and nibabel "
            "wheels) plus the labeled set's train images without labels; evaluates on --labeled SPEC or a labeled "
            "set found in ../shared/data (or $MEDFM_SHARED_DATA). Under 10 minutes on 2 CPU cores."
        ),
    )
    parser.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    parser.add_argument(
        "--data", nargs="+", metavar="DIR_OR_SPEC", help="pretraining images (any medfm shard SOURCE; default: sample:)"
    )
    parser.add_argument(
        "--labeled", metavar="SPEC", help="labeled dataset for the evaluation (medmnist:, imagefolder:, csv:)"
    )
    parser.add_argument(
        "--no-pool-labeled",
        action="store_true",
        help="pretrain on --data only, not also on the labeled set's train images",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="pretraining config overrides (configs/pretrain/demo.yaml)"
    )
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from medfm.demo import plan_demo
    from medfm.demo import run_demo as run_chain

    plan = plan_demo(args.out, args.data, args.labeled, not args.no_pool_labeled, args.overrides)
    return run_chain(plan, main)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv

    def run() -> int:
        return int(resolve_handler(args.handler)(args) or 0)

    # A subcommand's optional wrapper decides how its handler runs (``medfm.pretrain.supervise.run``: here, or supervised).
    wrapper = getattr(args, "wrapper", None)
    return int(resolve_handler(wrapper)(args, run)) if wrapper else run()


def resolve_handler(handler: str | Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A subcommand's handler; ``"module:function"`` names a heavy module, imported only once it is chosen."""
    if isinstance(handler, str):
        module, _, name = handler.partition(":")
        return getattr(importlib.import_module(module), name)
    return handler


if __name__ == "__main__":
    sys.exit(main())
