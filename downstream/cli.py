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
    shard = subparsers.choices.get("shard")
    if shard is not None:  # `medfm` registers data_shards' parser first; `python -m medfm.downstream.cli` has none
        add_reduce_options(shard)
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
    export.add_argument(
        "--results",
        nargs="*",
        default=[],
        metavar="RESULTS",
        help="results_summary.json / results.json files, or folders to search, for the card",
    )
    export.add_argument("--overwrite", action="store_true", help="replace the files of an existing release folder")
    export.add_argument(
        "--license",
        default="other",
        help="the weights' license id for the model card, e.g. apache-2.0, cc-by-4.0 (default: other; the weights inherit the pretraining data's terms)",
    )
    export.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="then upload the release folder to this Hugging Face Hub model repo (created if needed; token from $HF_TOKEN or `hf auth login`)",
    )
    export.add_argument(
        "--public", action="store_true", help="with --push-to-hub: create the repo public (default: private)"
    )
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
    parser.add_argument(
        "--backbone", metavar="PATH", help="release folder, run directory or weights file (backbone.path)"
    )
    parser.add_argument("--data", metavar="SPEC", help="dataset spec, e.g. medmnist:FILE.npz (data.spec)")
    parser.add_argument("--out", metavar="DIR", help="output directory (out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. knn.k=10")


def _overrides(args: argparse.Namespace) -> list[str]:
    shortcuts = {"backbone.path": args.backbone, "data.spec": args.data, "out_dir": args.out}
    return [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(args.overrides)


def _run(command: str, body: Callable[[], None]) -> int:
    """Run a handler body; known failures become one clear line on stderr and an exit code."""
    from medfm.pretrain.errors import run_command

    return run_command(command, body)


def run_export(args: argparse.Namespace) -> int:
    def body() -> None:
        from medfm.pretrain.config import check_output_path
        from medfm.pretrain.export import export_run
        from medfm.pretrain.hub import check_repo_id, push_release

        check_output_path(args.out, "--out")
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)  # before the release is written
        out = export_run(
            args.run_dir,
            args.out,
            checkpoint=args.checkpoint,
            results=args.results,
            overwrite=args.overwrite,
            license=args.license,
        )
        print(f"released {args.run_dir} -> {out} (model.safetensors, config.json, README.md)")
        if args.push_to_hub:
            url = push_release(out, args.push_to_hub, private=not args.public)
            print(f"pushed to the Hugging Face Hub: {url}")

    return _run("export", body)


def run_eval_command(args: argparse.Namespace) -> int:
    def body() -> None:
        from medfm.downstream.config import EvalConfig, load_config
        from medfm.downstream.evaluate import run_eval, summary_table

        cfg = load_config(EvalConfig, args.config, _overrides(args))
        print(summary_table(run_eval(cfg)), end="")
        print(f"results: {cfg.out_dir}")

    return _run("eval", body)


def run_finetune_command(args: argparse.Namespace) -> int:
    def body() -> None:
        import os

        from medfm.downstream.config import FinetuneConfig, load_config
        from medfm.downstream.finetune import run_finetune, summary_table

        cfg = load_config(FinetuneConfig, args.config, _overrides(args))
        results = run_finetune(cfg)  # ends with the process group shut down: the launcher's RANK says who prints
        if os.environ.get("RANK", "0") == "0":  # one summary under `accelerate launch`
            print(summary_table(results), end="")
            print(f"results: {cfg.out_dir}")

    return _run("finetune", body)


def add_reduce_options(shard: argparse.ArgumentParser) -> None:
    """``medfm shard reduce SHARDS --model SRC --keep FRACTION --out DIR``: options on data_shards' ``shard``
    parser (the verb embeds images with a backbone, which data_shards must not import)."""
    group = shard.add_argument_group("reduce (medfm shard reduce SHARDS --model SRC --keep FRACTION --out DIR)")
    group.add_argument(
        "--model",
        help="reduce: backbone to embed with (a release, run directory, timm hub snapshot, hf-hub:ORG/NAME from the local cache, or a weights file)",
    )
    group.add_argument("--architecture", help="reduce: timm name, only for a bare weights file")
    group.add_argument("--keep", type=float, help="reduce: fraction of the images to keep, e.g. 0.5")
    group.add_argument(
        "--method",
        default="kcenter",
        choices=("kcenter", "random"),
        help="reduce: k-center greedy on the embeddings within k-means clusters, one coverage radius for the whole set (default), or a seeded random subset of the same size",
    )
    group.add_argument("--clusters", type=int, help="reduce: k-means clusters (default ceil(sqrt(N)))")
    group.add_argument("--img-size", type=int, help="reduce: input side (default: the model's)")
    group.add_argument("--batch-size", type=int, default=256, help="reduce: embedding batch (default 256)")
    group.add_argument("--seed", type=int, default=0, help="reduce: k-means / random seed (default 0)")
    shard.set_defaults(reduce_handler=run_reduce)


def main(argv: list[str] | None = None) -> int:
    """``python -m medfm.downstream.cli {export,eval,finetune} ...`` (the same subcommands as ``medfm``)."""
    parser = argparse.ArgumentParser(prog="python -m medfm.downstream.cli")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def run_reduce(args: argparse.Namespace) -> int:
    import shlex

    from medfm.data_shards.inspect import summary_text
    from medfm.downstream.reduce import reduce_shards

    if len(args.sources) != 2 or args.out is None or args.model is None or args.keep is None:
        print(
            "usage: medfm shard reduce SHARDS --model SRC --keep FRACTION --out DIR [--method kcenter|random]",
            file=sys.stderr,
        )
        return 2
    argv = list(getattr(args, "argv", sys.argv[1:]))
    manifest = reduce_shards(
        args.sources[1],
        args.out,
        model=args.model,
        keep=args.keep,
        method=args.method,
        architecture=args.architecture,
        img_size=args.img_size,
        batch_size=args.batch_size,
        clusters=args.clusters,
        seed=args.seed,
        overwrite=args.overwrite,
        command="medfm " + " ".join(shlex.quote(a) for a in argv),
    )
    print(summary_text(manifest))
    reduction = manifest.reduction
    print(
        f"kept {reduction['kept']} of {reduction['samples_before']} ({reduction['method']}); dropped list: {args.out}/{reduction['dropped_list']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
