"""What a run reports, on the main process only: progress bar, JSON lines, TensorBoard, pictures, messages.

Collapse metrics follow Chen & He 2021 (std of L2-normalised embeddings: 0 when collapsed, about
1/sqrt(D) for an isotropic gaussian) and Garrido et al. 2023 (RankMe effective rank: 1 when collapsed).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightly.utils.debug import std_of_l2_normalized
from torch import Tensor
from torchvision.utils import save_image
from tqdm.auto import tqdm


@torch.no_grad()
def embedding_std(embeddings: Tensor) -> float:
    """Mean per-dimension std of L2-normalised (B, D) embeddings: 0 for a collapsed representation."""
    return float(std_of_l2_normalized(embeddings.float()))


@torch.no_grad()
def effective_rank(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp(entropy of the normalised singular values) of (B, D) embeddings, in [1, min(B, D)]."""
    singular = torch.linalg.svdvals(embeddings.float())
    p = singular / (singular.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


class Monitor:
    """Writes ``metrics.jsonl``, TensorBoard events and ``figures/*.png`` into the run directory."""

    def __init__(
        self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, tensorboard: bool, progress_bar: bool
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.bar = self.tb = self.jsonl = None
        if not enabled:
            return
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{name}", value, step)
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
        save_image(image, folder / f"{name}-step{step:07d}.png")
        if self.tb is not None:
            self.tb.add_image(f"figures/{name}", image, step)

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
            self.jsonl.write(json.dumps({"time": round(time.time(), 3), **fields}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        for item in (self.bar, self.tb, self.jsonl):
            if item is not None:
                item.close()


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
