"""What a run reports, on the main process only: progress bar, JSON lines, experiment trackers, pictures, messages.

Trackers (``logging.trackers``: tensorboard, wandb, mlflow) are Accelerate's (``Accelerator(log_with=...)``,
``init_trackers``, ``log``). They run without a network by default: ``offline_tracker_defaults`` sets, only where
the user set nothing, ``WANDB_MODE=offline`` (sync later with ``wandb sync RUN_DIR/wandb/offline-run-*``) and an
MLflow file store in ``RUN_DIR/mlruns`` without telemetry. TensorBoard writes ``RUN_DIR/tensorboard/medfm``; the wandb
project and the MLflow experiment are named ``medfm``, the run after its folder.

Collapse metrics follow Chen & He 2021 (std of L2-normalised embeddings: 0 when collapsed, about
1/sqrt(D) for an isotropic gaussian) and Garrido et al. 2023 (RankMe effective rank: 1 when collapsed); both are
NaN, never an error, for embeddings that hold NaN or infinite values (a diverging run is reported by the loop).

``metrics.jsonl`` is strict JSON (RFC 8259), one object a line: a NaN or an infinity is written as ``null``
(``json.loads`` of Python, ``jq`` and pandas read every line). A full disk while writing it raises ``DiskFull``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightly.utils.debug import std_of_l2_normalized
from torch import Tensor
from torchvision.utils import save_image
from tqdm.auto import tqdm

from medfm.data_shards.outputs import disk_full, is_disk_full


@torch.no_grad()
def embedding_std(embeddings: Tensor) -> float:
    """Mean per-dimension std of L2-normalised (B, D) embeddings: 0 for a collapsed representation; NaN when an
    embedding is not finite."""
    return float(std_of_l2_normalized(embeddings.float()))


@torch.no_grad()
def effective_rank(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp(entropy of the normalised singular values) of (B, D) embeddings, in [1, min(B, D)]; NaN when
    an embedding is not finite (the SVD does not converge on those)."""
    try:  # no finiteness check first: that would be one more host sync
        singular = torch.linalg.svdvals(embeddings.float())
    except torch.linalg.LinAlgError:  # raised on CPU; a GPU solver returns NaN singular values instead
        return math.nan
    p = singular / (singular.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def offline_tracker_defaults(trackers: list[str], run_dir: Path) -> list[str]:
    """Environment defaults that keep wandb and mlflow off the network (set only where unset); returns notes."""
    notes, env = [], os.environ
    if "wandb" in trackers and "WANDB_MODE" not in env and not env.get("WANDB_API_KEY"):
        env["WANDB_MODE"] = "offline"  # also silences wandb's telemetry, which init_kwargs alone does not
        notes.append(f"wandb offline (WANDB_MODE unset): sync with `wandb sync {run_dir}/wandb/offline-run-*`")
    if "mlflow" in trackers and "MLFLOW_TRACKING_URI" not in env:
        env["MLFLOW_TRACKING_URI"] = (Path(run_dir).resolve() / "mlruns").as_uri()
        env.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this flag
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        notes.append(
            f"mlflow file store {run_dir}/mlruns (MLFLOW_TRACKING_URI unset): `mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}`"
        )
    return notes


def tracker_init_kwargs(trackers: list[str], run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per-tracker ``init_trackers`` arguments: a resumed run continues the same wandb run (id from the folder)."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in trackers:
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        kwargs["wandb"] = {"dir": str(run_dir), "id": run_id, "resume": "allow", "name": Path(run_dir).name}
    if "mlflow" in trackers:
        kwargs["mlflow"] = {"run_name": Path(run_dir).name}
    return kwargs


def strict_json(record: dict[str, Any]) -> str:
    """One JSON line that every parser reads: NaN and infinities (which ``json.dumps`` writes as the non-JSON
    ``NaN`` / ``Infinity``) become null, in nested values too."""
    return json.dumps(_finite_or_none(record), allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def flat_scalars(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config as ``{"optim.lr": 1e-3, "optim.betas": "[0.9, 0.95]"}``: what every tracker stores
    (TensorBoard's hparams take scalars only; None is left out)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        elif value is not None:
            flat[name] = json.dumps(value)
    return flat


class Monitor:
    """Writes ``metrics.jsonl``, ``figures/*.png`` into the run directory, and sends metrics and figures to the
    Accelerator's trackers (started here with the run's config)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress_bar: bool,
        accelerator: Any = None,
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.bar = self.jsonl = None
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if not enabled:
            return
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if self.accelerator is not None:
            names = [str(t.value if hasattr(t, "value") else t).lower() for t in self.accelerator.log_with]
            self.accelerator.init_trackers(
                "medfm", config=flat_scalars(config or {}), init_kwargs=tracker_init_kwargs(names, run_dir)
            )
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "time": round(time.time(), 3), **metrics})
        if self.accelerator is not None:
            values = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.accelerator.log(values, step=step)
        if self.bar is not None:
            shown = {k: metrics[k] for k in ("loss", "lr", "img_s") if k in metrics}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def figure(self, step: int, name: str, image: Tensor) -> None:
        """image: (3, H, W) float in [0, 1]."""
        if not self.enabled:
            return
        folder = self.run_dir / "figures"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}-step{step:07d}.png"
        save_image(image, path)
        for tracker in self.accelerator.trackers if self.accelerator is not None else ():
            if tracker.name == "tensorboard":
                tracker.writer.add_image(f"figures/{name}", image, step)
            elif tracker.name == "wandb":
                tracker.log_images({f"figures/{name}": [image.permute(1, 2, 0).cpu().numpy()]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_artifact(str(path), artifact_path="figures")

    def message(self, text: str, **event: Any) -> None:
        """A line for the user (stderr, above the bar) and, with ``event`` fields, a JSON line."""
        if not self.enabled:
            return
        tqdm.write(text, file=sys.stderr)
        if event:
            self.event(**event)

    def event(self, **fields: Any) -> None:
        """A JSON line only (what was already said to the user elsewhere)."""
        if self.enabled:
            self._write({"time": round(time.time(), 3), **fields})

    def _write(self, record: dict[str, Any]) -> None:
        try:
            self.jsonl.write(strict_json(record) + "\n")
            self.jsonl.flush()
        except OSError as err:
            if not is_disk_full(err):
                raise
            raise disk_full(
                self.run_dir / "metrics.jsonl",
                "the checkpoints in the run directory are intact",
                "rerun the same command to resume",
            ) from err

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            try:
                self.jsonl.close()
            except OSError as err:  # a full disk: the failure that stopped the run says so already
                if not is_disk_full(err):
                    raise
        if self.enabled and self.accelerator is not None:
            for tracker in self.accelerator.trackers:  # also after a failure: what was logged reaches the disk
                tracker.finish()


CURVES = ("loss", "lr", "embedding_std", "effective_rank", "knn_acc")


def plot_training_curves(run_dir: Path) -> Path | None:
    """``figures/training_curves.png``: loss, lr and the collapse / kNN signals over steps from ``metrics.jsonl``
    (one panel each for what the run logged); None when nothing was logged yet."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if "event" in record or "step" not in record:
            continue
        for name in CURVES:
            value = record.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps, values = series.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(value)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.2), squeeze=False)
    for axis, (name, (steps, values)) in zip(axes[0], series.items(), strict=True):
        axis.plot(steps, values, linewidth=1.2)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(run_dir) / "figures" / "training_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
