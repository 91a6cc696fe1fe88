"""``medfm finetune``: the configured inits (pretrained release and/or random init, same recipe), label budgets x
seeds and corrupted test copies, each a run of ``medfm.downstream.finetune_run.finetune_once``, and the results
written (results.json / .md, PNGs, best weights, summary.md).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from medfm.downstream import report
from medfm.downstream.data import EvalTransform, open_split
from medfm.downstream.efficiency import budget_name, label_efficiency_rows
from medfm.downstream.features import collate
from medfm.downstream.finetune_run import FinetuneRun, finetune_once, predict
from medfm.downstream.load import Release, read_baseline, read_release
from medfm.downstream.metrics import classification_metrics, summary
from medfm.downstream.report import write_plots, write_results
from medfm.downstream.robustness import Corruption, corruption_rows
from medfm.pretrain.config import save_config, to_dict
from medfm.pretrain.distributed import build_accelerator, resolve_precision, shutdown

# Per-run checkpoints (``OUT_DIR/.checkpoints/<init>[/<budget>-seed<k>]``): a killed ``medfm finetune`` run again
# with the same command resumes each run where it was checkpointed; removed once every result is written.
CHECKPOINTS = ".checkpoints"


def corrupted_test(run: FinetuneRun, cfg: DictConfig) -> list[dict[str, Any]]:
    """Best model on corrupted copies of the test split; drop from the clean test metrics."""
    base = run.eval_transform

    def test_on(corruption: Corruption) -> dict[str, float]:
        transform = EvalTransform(base.size, base.mean, base.std, corruption)
        dataset = open_split(cfg.data.spec, "test", transform, **run.split_args)
        loader = DataLoader(
            dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, collate_fn=collate
        )
        labels, scores = predict(run.prepared, run.accelerator.prepare(loader), run.task, run.accelerator)
        return summary(classification_metrics(run.task, labels, scores))

    return corruption_rows(cfg.robustness, summary(run.test), test_on)


def run_finetune(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Every init in ``cfg.backbone.inits`` with the same recipe; returns ``{init: result}``, written under
    ``OUT_DIR/<init>/`` (results.json / .md, PNGs, metrics.jsonl, best.safetensors) plus ``OUT_DIR/summary.md``."""
    out_dir = Path(cfg.out_dir)
    cfg.train.precision, precision_note = resolve_precision(cfg.train.precision)  # saved as it ran
    accelerator = build_accelerator(cfg.train.precision)
    main = accelerator.is_main_process  # one process writes the files
    if main:
        print(f"medfm finetune: {precision_note}", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    release = read_release(cfg.backbone.path, cfg.backbone.architecture)
    baseline = read_baseline(cfg.backbone, release)
    results = {}
    for init in cfg.backbone.inits:
        folder = out_dir / init
        if main:
            folder.mkdir(parents=True, exist_ok=True)
        run = finetune_once(
            cfg,
            release,
            init,
            accelerator,
            seed=cfg.train.seed,
            log_path=folder / "metrics.jsonl",
            checkpoint_dir=out_dir / CHECKPOINTS / init,
            baseline=baseline,
        )
        weights = baseline if init == "baseline" else release
        result: dict[str, Any] = {
            "protocol": "finetune",
            "dataset": cfg.data.spec,
            "backbone": {
                "source": str(cfg.backbone.baseline if init == "baseline" else cfg.backbone.path),
                "architecture": weights.architecture,
                "model_args": weights.model_args,
                "init": init,
                "objective": weights.info.get("objective"),
                "input_size": run.model.pretrained_cfg["input_size"],
            },
            "task": {"kind": run.task.kind, "class_names": list(run.task.class_names)},
            "settings": {
                "best_step": run.best_step,
                "total_steps": run.derived["total_steps"],
                "derived": run.derived,
                "n_train": run.n_train,
                "frozen_parameters": len(run.frozen),
                "selection_metric": cfg.selection_metric,
                "recipe": to_dict(cfg)["train"],
            },
            "val": run.val,
            "test": run.test,
            "summary": summary(run.test),
            "history": run.history,
        }
        if cfg.efficiency.fractions or cfg.efficiency.per_class:
            result["label_efficiency"] = _label_efficiency(cfg, release, init, accelerator, out_dir, baseline)
        if cfg.robustness.corruptions:
            result["robustness"] = corrupted_test(run, cfg)
        results[init] = result
        if not main:
            continue
        save_file({k: v.contiguous() for k, v in run.model.state_dict().items()}, str(folder / "best.safetensors"))
        write_results(folder, result)
        if cfg.plots:
            write_plots(
                folder,
                run.task,
                run.test_labels,
                run.test_scores,
                run.test.get("confusion"),
                title=f"finetune ({init})",
            )
    if main:
        (out_dir / "summary.md").write_text(summary_table(results))
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)  # done: every result is written
    shutdown(accelerator)  # barrier; a later run in this process (the Python API) may choose another precision
    return results


def _label_efficiency(
    cfg: DictConfig, release: Release, init: str, accelerator: Accelerator, out_dir: Path, baseline: Release | None
) -> list[dict[str, Any]]:
    def run(budget: dict[str, Any], seed: int) -> tuple[dict[str, float], int]:
        folder = out_dir / CHECKPOINTS / init / budget_name(**budget).replace("/", "_per_") / f"seed{seed}"
        tuned = finetune_once(
            cfg, release, init, accelerator, seed=seed, budget=budget, checkpoint_dir=folder, baseline=baseline
        )
        return summary(tuned.test), tuned.n_train

    return label_efficiency_rows(cfg.efficiency, run)


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """One Markdown row per init with the test metrics of the best-on-val checkpoint."""
    return report.summary_table(
        [
            ({"init": init, "dataset": f"`{r['dataset']}`", "best step": str(r["settings"]["best_step"])}, r["summary"])
            for init, r in results.items()
        ]
    )
