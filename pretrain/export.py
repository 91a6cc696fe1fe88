"""``medfm export``: write a pretraining run's release folder anywhere (``medfm.pretrain.release`` owns the format).

``export_run(run_dir, out_dir)`` reads the newest checkpoint of a run directory, rebuilds the method from the
config saved in it, takes ``SSLMethod.export_backbone()`` (the DINO teacher, the MoCo momentum encoder, the MAE
encoder) and writes the release folder: the same folder a pretraining run leaves in ``RUN_DIR/release/`` at its
end, with the model card's evaluation results as they are now (the ``results_summary.json`` files under the run
directory plus the ``results`` paths given; ``medfm.pretrain.release.find_results``).
"""

from __future__ import annotations

from pathlib import Path

from medfm.pretrain.release import check_out_dir, write_run_release
from medfm.pretrain.runs import load_run


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    results: list[str | Path] = (),
    overwrite: bool = False,
    license: str = "other",
) -> Path:
    """Write the release folder (weights, config.json, README.md) for a run; returns ``out_dir``.

    Args:
        run_dir: a pretraining run directory (``last.pt`` / ``step-*.pt``, or DeepSpeed ``step-*/``).
        out_dir: the release folder; must be empty or absent unless ``overwrite``.
        checkpoint: export this checkpoint instead of the newest one.
        results: extra results files (``protocol``, ``dataset``, ``summary``) or folders holding
            ``results_summary.json`` files, for the card (besides those under ``run_dir``).
        license: the weights' license id in the card (a Hub license id, e.g. ``apache-2.0``, ``cc-by-4.0``).
    """
    check_out_dir(out_dir, overwrite)  # before the (slow) checkpoint read
    run = load_run(run_dir, checkpoint)
    return write_run_release(run, out_dir, run_dir=run_dir, results=results, overwrite=overwrite, license=license)
