"""``medfm export``, ``medfm eval``, ``medfm finetune``: the subcommands the ``medfm`` console command adds.

``add_parser(subparsers)`` registers all three; heavy imports happen inside the handlers so ``medfm --help``
stays fast. Each handler returns an exit code: 0 done, 1 a file or weights problem (the message names the file
and keys), 2 a config problem (the message names the key).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

CONFIG_HELP = "YAML overrides of the schema in downstream/config.py (examples in configs/downstream/)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="release a pretraining run's backbone (safetensors + config.json + model card) loadable by timm",
        description=(
            "Write RELEASE_DIR with model.safetensors (timm key names), config.json (timm hub layout) and a "
            "README.md model card, from the newest checkpoint of RUN_DIR (DINO: teacher, MoCo: momentum encoder, "
            "MAE: encoder). Downstream results (every results_summary.json under RUN_DIR, and any --results file or folder) go into the card."
        ),
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="pretraining run directory (last.pt / step-*.pt)")
    export.add_argument("--out", required=True, metavar="RELEASE_DIR", help="release folder to write")
    export.add_argument("--checkpoint", help="export this checkpoint file instead of the newest")
    export.add_argument("--results", nargs="*", default=[], metavar="RESULTS", help="results_summary.json / results.json files, or folders to search, for the card")  # fmt: skip
    export.add_argument("--overwrite", action="store_true", help="replace the files of an existing release folder")
    export.add_argument("--license", default="other", help="the weights' license id for the model card, e.g. apache-2.0, cc-by-4.0 (default: other; the weights inherit the pretraining data's terms)")  # fmt: skip
    export.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the release folder to this Hugging Face Hub model repo (created if needed; token from $HF_TOKEN or `hf auth login`)")  # fmt: skip
    export.add_argument("--public", action="store_true", help="with --push-to-hub: create the repo public (default: private)")  # fmt: skip
    export.set_defaults(handler=run_export)

    evaluate = subparsers.add_parser(
        "eval",
        help="kNN and linear probe on frozen features (+ label efficiency, robustness)",
        description=(
            "Evaluate a release folder, run directory or weights file on a labeled dataset spec with frozen "
            "features (cached): kNN and a linear probe, optional label budgets over seeds and corrupted test "
            "copies. Writes results.json / results.md / PNGs per init and protocol under --out."
        ),
    )
    _common(evaluate)
    evaluate.set_defaults(handler=run_eval_command)

    finetune = subparsers.add_parser(
        "finetune",
        help="full fine-tuning with layer-wise lr decay (+ random-init baseline, label efficiency, robustness)",
        description=(
            "Fine-tune a released backbone (and/or a random init with the same recipe: backbone.inits=[release,"
            "random]) on a labeled dataset spec; the best val checkpoint is evaluated once on test. Launch on "
            "several processes with `accelerate launch`."
        ),
    )
    _common(finetune)
    finetune.set_defaults(handler=run_finetune_command)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=CONFIG_HELP)
    parser.add_argument("--backbone", metavar="PATH", help="release folder, run directory or weights file (backbone.path)")  # fmt: skip
    parser.add_argument("--data", metavar="SPEC", help="dataset spec, e.g. medmnist:FILE.npz (data.spec)")
    parser.add_argument("--out", metavar="DIR", help="output directory (out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. knn.k=10")


def _overrides(args: argparse.Namespace) -> list[str]:
    shortcuts = {"backbone.path": args.backbone, "data.spec": args.data, "out_dir": args.out}
    return [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(args.overrides)


def _run(command: str, body: Callable[[], None]) -> int:
    """Run a handler body; known failures become one clear line on stderr and an exit code."""
    from pretrain.errors import run_command

    return run_command(command, body)


def run_export(args: argparse.Namespace) -> int:
    def body() -> None:
        from pretrain.config import check_output_path
        from pretrain.export import export_run
        from pretrain.hub import check_repo_id, push_release

        check_output_path(args.out, "--out")
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)  # before the release is written
        out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, results=args.results,
                         overwrite=args.overwrite, license=args.license)  # fmt: skip
        print(f"released {args.run_dir} -> {out} (model.safetensors, config.json, README.md)")
        if args.push_to_hub:
            url = push_release(out, args.push_to_hub, private=not args.public)
            print(f"pushed to the Hugging Face Hub: {url}")

    return _run("export", body)


def run_eval_command(args: argparse.Namespace) -> int:
    def body() -> None:
        from downstream.config import EvalConfig, load_config
        from downstream.evaluate import run_eval, summary_table

        cfg = load_config(EvalConfig, args.config, _overrides(args))
        print(summary_table(run_eval(cfg)), end="")
        print(f"results: {cfg.out_dir}")

    return _run("eval", body)


def run_finetune_command(args: argparse.Namespace) -> int:
    def body() -> None:
        import os

        from downstream.config import FinetuneConfig, load_config
        from downstream.finetune import run_finetune, summary_table

        cfg = load_config(FinetuneConfig, args.config, _overrides(args))
        results = run_finetune(cfg)  # ends with the process group shut down: the launcher's RANK says who prints
        if os.environ.get("RANK", "0") == "0":  # one summary under `accelerate launch`
            print(summary_table(results), end="")
            print(f"results: {cfg.out_dir}")

    return _run("finetune", body)


def main(argv: list[str] | None = None) -> int:
    """``python -m downstream.cli {export,eval,finetune} ...`` (the same subcommands as ``medfm``)."""
    parser = argparse.ArgumentParser(prog="python -m downstream.cli")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
