"""Evaluation results for a release's model card: ``results_summary.json`` files that downstream writes beside each
result (:data:`RESULTS_NAME`, :func:`write_results_summary`)::

    {"format": "medfm-results/1", "protocol": "linear", "dataset": "medmnist:breastmnist.npz",
     "init": "release", "backbone": "runs/dino/release",
     "summary": {"acc": 0.81, "balanced_acc": 0.77, "auc": 0.9, "f1": null}}

``summary`` holds the test-split headline metrics (:data:`SUMMARY_KEYS`; null where undefined). The card lists
every such file under the run directory (any depth, named by its folder relative to the run directory), plus
the extra paths given to :func:`find_results` (``medfm export --results``): a JSON file with ``protocol``,
``dataset`` and ``summary`` (named by its folder; downstream's full ``results.json`` qualifies), or a folder
searched for ``results_summary.json``. Nothing here knows downstream's folder layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medfm.pretrain.errors import ExportError
from medfm.pretrain.release.files import write_text

RESULTS_NAME = "results_summary.json"

RESULTS_FORMAT = "medfm-results/1"

SUMMARY_KEYS = ("acc", "balanced_acc", "auc", "f1")  # the headline metrics: results files, tables, the card


def write_results_summary(
    folder: str | Path,
    *,
    protocol: str,
    dataset: str,
    init: str,
    summary: Mapping[str, float | None],
    backbone: str | None = None,
) -> Path:
    """``FOLDER/results_summary.json`` (the format in the module doc); returns its path.

    ``summary``: test-split metrics; the :data:`SUMMARY_KEYS` are kept, a missing or non-finite one is null.
    """
    record = {
        "format": RESULTS_FORMAT,
        "protocol": protocol,
        "dataset": dataset,
        "init": init,
        "backbone": backbone,
        "summary": {k: _finite(summary.get(k)) for k in SUMMARY_KEYS},
    }
    path = Path(folder) / RESULTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def read_results(path: str | Path) -> dict[str, Any]:
    """A results file: a JSON object with ``protocol``, ``dataset`` and a ``summary`` dict of metrics."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: cannot read evaluation results: {err}") from err
    if not isinstance(data, dict):
        raise ExportError(f"{path}: evaluation results must be a JSON object, not {type(data).__name__}")
    missing = [k for k in ("protocol", "dataset", "summary") if k not in data]
    if missing or not isinstance(data["summary"], dict):
        raise ExportError(
            f"{path}: not an evaluation results file: needs 'protocol', 'dataset' and a 'summary' dict of "
            f"{list(SUMMARY_KEYS)} (missing {missing or ['a dict summary']})"
        )
    return data


def find_results(run_dir: str | Path, extra: Iterable[str | Path] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The results for a run's model card, as ``(name, results)``: every ``results_summary.json`` under
    ``run_dir`` (named by its folder relative to ``run_dir``), then each of ``extra``: a results file (named by
    its folder) or a folder searched for ``results_summary.json`` (named from that folder on)."""
    run_dir = Path(run_dir)
    named = [(_label(run_dir, p), p) for p in sorted(run_dir.rglob(RESULTS_NAME))]
    for item in map(Path, extra):
        if item.is_dir():
            named += [(_label(item.parent, p), p) for p in sorted(item.rglob(RESULTS_NAME))]
        else:
            named.append((item.parent.name, item))
    seen, results = set(), []
    for name, path in named:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            results.append((name, read_results(path)))
    return results


def _label(root: Path, path: Path) -> str:
    return path.parent.relative_to(root).as_posix() if path.parent != root else root.name
