"""``medfm demo``: the whole chain on real images in a few minutes on a laptop CPU, ending in a report.

shard -> inspect -> pretrain -> eval (kNN + linear probe, the release vs the same architecture at random init)
-> export (the model card lists the results) -> ``OUT/report/report.md`` (sample grid, training curves, MAE
reconstructions, ROC, embedding, results table). Pretraining reads the images of ``--data`` (default: the real
CT, MR, ultrasound and NIfTI images shipped inside the pydicom and nibabel wheels) plus, without their labels, the
train images of the labeled set; the labeled evaluation needs a labeled dataset: ``--labeled SPEC`` or one found
in the shared data folder. Every stage is a ``medfm`` command line, printed as it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medfm.data_shards.manifest import Manifest

RunStep = Callable[[list[str]], int]
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "pretrain" / "demo.yaml"
# Labeled sets looked for in the shared data folder, first found wins: (path below the folder, spec kind).
LABELED_CANDIDATES = (
    ("medmnist/pneumoniamnist.npz", "medmnist"),
    ("medmnist/breastmnist.npz", "medmnist"),
    ("imagefolder/brain_tumor_mri_4class", "imagefolder"),
)


def shared_data_folders() -> list[Path]:
    """Where a shared data folder may be: ``$MEDFM_SHARED_DATA``, then ``../shared/data`` next to the working
    directory and next to the repository."""
    folders = [Path(os.environ["MEDFM_SHARED_DATA"])] if os.environ.get("MEDFM_SHARED_DATA") else []
    return [*folders, Path.cwd().parent / "shared" / "data", REPO.parent / "shared" / "data"]


def find_labeled() -> str | None:
    """The first labeled dataset spec found in a shared data folder, or None."""
    for folder in shared_data_folders():
        for relative, kind in LABELED_CANDIDATES:
            if (folder / relative).exists():
                return f"{kind}:{(folder / relative).resolve()}"
    return None


@dataclass
class DemoPlan:
    out: Path
    data: list[str]
    labeled: str | None
    labeled_found: bool  # found in a shared data folder rather than given with --labeled
    pool_labeled: bool  # the labeled set's train images (no labels) join the pretraining pool
    recipe: Path = RECIPE
    overrides: list[str] = field(default_factory=list)

    @property
    def pool(self) -> list[str]:
        return [*self.data, *([self.labeled] if self.labeled and self.pool_labeled else [])]

    def steps(self) -> list[tuple[str, list[str]]]:
        out = self.out
        shards, run, evaluation = out / "shards", out / "pretrain", out / "eval"
        steps = [
            ("shard the pretraining images", ["shard", *self.pool, "--out", str(shards), "--overwrite",
                                              "--dedup", "near", "--max-side", "64", "--splits", "train",
                                              "--hash-paths"]),
            ("inspect the shards (summary, sample grids)", ["shard", "inspect", str(shards)]),
            ("pretrain (labels never used)", ["pretrain", "--config", str(self.recipe), f"data.spec=shards:{shards}",
                                              f"train.run_dir={run}", *self.overrides]),
        ]  # fmt: skip
        if self.labeled is not None:
            steps.append(
                ("evaluate: kNN + linear probe, release vs random init",
                 ["eval", "--backbone", str(run), "--data", self.labeled, "--out", str(evaluation),
                  "backbone.inits=[release,random]", "features.pooling=layers", "efficiency.fractions=[0.01,0.1,1.0]",
                  "efficiency.seeds=[0,1,2]"])
            )  # fmt: skip
        results = ["--results", str(evaluation)] if self.labeled is not None else []
        steps.append(
            ("release the backbone", ["export", str(run), "--out", str(out / "release"), "--overwrite", *results])
        )
        return steps


def run_demo(plan: DemoPlan, run_step: RunStep, echo: Callable[[str], None] = print) -> int:
    """Run the chain, then write the report; returns the first non-zero exit code, or 0."""
    if plan.labeled is None:
        echo(
            "medfm demo: no labeled dataset given (--labeled SPEC) or found in "
            + ", ".join(str(f) for f in shared_data_folders())
            + ": the labeled evaluation is skipped"
        )
    else:
        how = "found in the shared data folder" if plan.labeled_found else "given with --labeled"
        echo(f"medfm demo: labeled evaluation on {plan.labeled} ({how})")
    echo(
        "medfm demo: pretraining on "
        + " + ".join(plan.data)
        + (f" + the train images of {plan.labeled} without their labels" if plan.labeled and plan.pool_labeled else "")
    )
    steps = plan.steps()
    started = time.monotonic()
    for number, (label, argv) in enumerate(steps, 1):
        elapsed = time.monotonic() - started
        echo(
            f"\n[{number}/{len(steps)} {int(elapsed // 60)}:{int(elapsed % 60):02d}] {label}\n$ medfm {' '.join(argv)}"
        )
        code = run_step(argv)
        if code != 0:
            echo(f"medfm demo: step {number} ({label}) failed with exit code {code}")
            return code
    report = write_report(plan, time.monotonic() - started)
    table = "\n".join(results_table(plan.out / "eval"))
    echo(f"\n{table}\n\nreport: {report}")
    return 0


def results_table(evaluation: Path) -> list[str]:
    """Markdown lines: test ACC / AUC per init and protocol at each label budget (mean ± std over seeds)."""
    from medfm.benchmark import budget_table, result_rows

    rows = []
    release_first = lambda path: (path.parent.parent.name != "release", str(path))  # noqa: E731
    for path in sorted(evaluation.glob("*/*/results.json"), key=release_first):
        result = json.loads(path.read_text())
        rows += result_rows(result, init=path.parent.parent.name, protocol=path.parent.name)
    return budget_table(rows, ("init", "protocol")) if rows else []


def _newest(folder: Path, pattern: str) -> Path | None:
    files = sorted(folder.glob(pattern))
    return files[-1] if files else None


def write_report(plan: DemoPlan, seconds: float) -> Path:
    """``OUT/report/report.md`` and the pictures it shows (copied next to it so the folder stands alone)."""
    from medfm.pretrain.monitor import plot_training_curves

    out, report = plan.out, plan.out / "report"
    report.mkdir(parents=True, exist_ok=True)
    run = out / "pretrain"
    plot_training_curves(run)
    pictures: list[tuple[str, Path | None]] = [
        (f"Sample grid ({grid.stem.removeprefix('grid_')})", grid)
        for grid in sorted((out / "shards" / "inspect").glob("grid_*.png"))
    ]
    pictures += [
        ("Training curves", run / "figures" / "training_curves.png"),
        (
            "MAE reconstructions (masked input / reconstruction / original)",
            _newest(run / "figures", "mae_reconstruction-*.png"),
        ),
        ("ROC (linear probe, release)", out / "eval" / "release" / "linear" / "roc.png"),
        ("ROC (linear probe, random init)", out / "eval" / "random" / "linear" / "roc.png"),
        ("Embedding of the test images (release)", out / "eval" / "release" / "linear" / "embedding.png"),
    ]
    totals = Manifest.read(out / "shards").totals
    lines = [
        "# medfm demo",
        "",
        f"Finished in {seconds / 60:.1f} min. Pretraining pool: {totals['samples']} images "
        f"({', '.join(f'{k} {v}' for k, v in totals['by_modality'].items())}) from {' + '.join(plan.pool)}"
        + (" (the labeled set's train images without labels)" if plan.labeled and plan.pool_labeled else "")
        + ".",
        "",
    ]
    table = results_table(out / "eval")
    if table:
        lines += [
            f"## Results on `{plan.labeled}` (test split)",
            "",
            "Test ACC / AUC of a kNN classifier and a linear probe on frozen features (the last 4 blocks pooled) "
            "of the release and of the same architecture at random init, trained on 1 %, 10 % and 100 % of "
            "the labels (mean ± std over 3 seeds; number of labels in brackets). Every metric: "
            "`../eval/<init>/<protocol>/results.md`.",
            "",
            *table,
            "",
        ]
    else:
        lines += ["No labeled evaluation: no labeled dataset was given (`--labeled SPEC`) or found.", ""]
    for title, path in pictures:
        if path is None or not path.is_file():
            continue
        name = path.name if path.parent.name != "linear" else f"{path.parent.parent.name}_{path.name}"
        shutil.copyfile(path, report / name)
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += [
        "## Files",
        "",
        f"- shards: `{out / 'shards'}` (manifest.json)",
        f"- run: `{run}`",
        f"- release: `{out / 'release'}` (model.safetensors, config.json, README.md model card)",
        f"- evaluation: `{out / 'eval'}`",
        "",
    ]
    path = report / "report.md"
    path.write_text("\n".join(lines))
    return path


def plan_demo(
    out: str, data: Sequence[str] | None, labeled: str | None, pool_labeled: bool, overrides: Sequence[str]
) -> DemoPlan:
    found = labeled is None
    return DemoPlan(
        out=Path(out),
        data=list(data or ["sample:"]),
        labeled=labeled if labeled is not None else find_labeled(),
        labeled_found=found,
        pool_labeled=pool_labeled,
        overrides=list(overrides),
    )
