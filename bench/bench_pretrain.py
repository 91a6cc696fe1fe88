"""Engine overhead: training images/s and peak memory of a step, medfm's engine vs a bare PyTorch loop.

For each objective, the same model, batch, precision and optimizer run (a) through ``pretrain.engine.train``
(Accelerate, schedules, non-finite guard, collapse metrics and JSON logging every ``--log-every`` steps) and
(b) through a bare loop (forward, backward, clip, AdamW step, EMA update), alternating in one process so
that both see the same machine load. The batch is made once from real PneumoniaMNIST images with the
method's own augmentation, so data loading is excluded from both. Peak memory: the largest resident set of
the process during the timed steps (CPU; a sampling thread) or torch.cuda.max_memory_allocated (GPU).

    python bench/bench_pretrain.py                       # CPU recipes at 28 px
    python bench/bench_pretrain.py --steps 50 --precision bf16 --json bench/results/pretrain_cpu.json
    python bench/bench_pretrain.py --precision bf16 --flops --count-syncs \
        --recipe mae=mae_vit_b16_224.yaml dino=dino_vit_s16_224.yaml    # GPU (bench/gpu_check.sh)

``--flops`` counts the model FLOPs of one training step (forward + backward, torch's FlopCounterMode) and reports
model FLOP utilisation against ``--peak-tflops`` (dense bf16 of the GPU; H100 / H200 SXM: 989). ``--count-syncs``
counts the engine's host-device synchronisations per step (torch.cuda sync debug mode; CUDA only).
Without ``--data`` (or when it is missing) the batch is made of random images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from data_shards.specs import MedMNISTDataset
from pretrain.config import derive, load_config
from pretrain.distributed import build_accelerator
from pretrain.engine import Schedules, build_optimizer, train
from pretrain.methods import METHODS
from pretrain.monitor import Monitor

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "mae": "mae_vit_tiny_pneumonia28.yaml",
    "dino": "dino_vit_tiny_pneumonia28.yaml",
    "simclr": "simclr_resnet18_pneumonia28.yaml",
    "moco": "moco_v3_vit_tiny_pneumonia28.yaml",
}


class PeakRSS:
    """Largest resident set (bytes) of this process while active, sampled every millisecond from /proc.

    Absolute, not an increase: after the warm-up block the allocator reuses freed memory, so a step adds
    little to the resident set; both paths run in one process with both models resident."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.base, self.running = self._rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


class FixedBatches:
    """Stands in for ``EpochLoader``: the same batch, ``steps`` times per epoch."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def epoch(self, epoch: int, skip: int = 0):
        for _ in range(self.steps - skip):
            yield self.batch


def make_batch(cfg, method_cls, batch_size: int, data: Path | None) -> dict:
    transform = method_cls.build_transform(cfg)
    if data is not None and data.is_file():
        dataset = MedMNISTDataset(data, "train")
        images = [dataset[i]["image"] for i in range(batch_size)]
    else:
        generator = torch.Generator().manual_seed(0)
        images = [torch.rand(1, cfg.data.img_size, cfg.data.img_size, generator=generator) for _ in range(batch_size)]
    views = [transform(image) for image in images]
    return {"views": [torch.stack([v[j] for v in views]) for j in range(len(views[0]))]}


def bare_loop(model, optimizer, views, steps: int, clip: float, autocast) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        with autocast():
            loss = model(views, step)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        model.before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_momentum(step)


def step_flops(model, views: list[torch.Tensor], autocast) -> int:
    """Model FLOPs of one training step (forward + backward) as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            loss = model(views, 0)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def count_syncs(run) -> int:
    """Host-device synchronisations while ``run()`` executes (CUDA sync debug mode warns once per sync)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(method: str, args: argparse.Namespace, accelerator: Accelerator) -> dict:
    overrides = [
        f"train.batch_size={args.batch}",
        f"train.precision='{args.precision}'",  # quoted: YAML reads a bare no as false
        f"logging.every_steps={args.log_every}",
        "logging.progress_bar=false",
        "logging.trackers=[]",
        "logging.figure_every_steps=0",
        "knn.spec=null",
        "schedule.epochs=1",  # one epoch = the timed steps of one block
        "schedule.warmup_epochs=0",
        f"data.samples_per_epoch={args.steps * args.batch}",
        f"data.spec=medmnist:{args.data}",
    ]
    if args.data is None or not args.data.is_file():
        overrides.remove(f"data.spec=medmnist:{args.data}")
        overrides.append(f"data.spec=shards:{tempfile.gettempdir()}")  # never read: the batch is made here
    recipes = {**RECIPES, **dict(item.split("=", 1) for item in args.recipe)}
    cfg = load_config(REPO / "configs" / "pretrain" / recipes[method], overrides)
    derive(cfg, 1, args.steps * args.batch)
    assert cfg.derived.total_steps == args.steps, cfg.derived
    method_cls = METHODS[cfg.method]
    views = [v.to(accelerator.device) for v in make_batch(cfg, method_cls, args.batch, args.data)["views"]]
    torch.manual_seed(0)
    engine_model = method_cls.from_config(cfg)
    torch.manual_seed(0)  # the same initial weights (deepcopy fails on weight-normed heads)
    bare_model = method_cls.from_config(cfg).to(accelerator.device)
    engine_opt = build_optimizer(engine_model, cfg)
    bare_opt = torch.optim.AdamW([p for p in bare_model.parameters() if p.requires_grad], lr=cfg.derived.lr)
    engine_model, engine_opt = accelerator.prepare(engine_model, engine_opt)
    clip = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def bare_autocast():
        return torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None)

    times: dict[str, list[float]] = {"engine": [], "bare": []}
    memory: dict[str, int] = {"engine": 0, "bare": 0}
    with tempfile.TemporaryDirectory() as run_dir:
        for block in range(args.repeats + 1):  # block 0 warms up both paths
            for name in ("bare", "engine"):
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    if name == "bare":
                        bare_loop(bare_model, bare_opt, views, args.steps, clip, bare_autocast)
                    else:
                        monitor = Monitor(Path(run_dir), enabled=True, total_steps=args.steps, start_step=0,
                                          progress_bar=False)  # fmt: skip
                        batch = {"views": views}
                        train(cfg=cfg, accelerator=accelerator, model=engine_model, optimizer=engine_opt,
                              loader=FixedBatches(batch, args.steps), schedules=Schedules.from_config(cfg),
                              monitor=monitor, save=lambda step: None, start_step=0)  # fmt: skip
                        monitor.close()
                    if accelerator.device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                if block > 0:
                    times[name].append(seconds)
                    memory[name] = max(memory[name], rss.peak)
                    if accelerator.device.type == "cuda":
                        memory[name] = max(memory[name], torch.cuda.max_memory_allocated())
    images = args.steps * args.batch
    engine_rate = images / statistics.median(times["engine"])
    bare_rate = images / statistics.median(times["bare"])
    extra: dict = {}
    if args.flops:
        flops = step_flops(bare_model, views, bare_autocast)
        extra["step_tflop"] = flops / 1e12
        extra["engine_tflops_s"] = flops * engine_rate / args.batch / 1e12
        extra["mfu_pct"] = 100.0 * extra["engine_tflops_s"] / args.peak_tflops
    if args.count_syncs and accelerator.device.type == "cuda":
        with tempfile.TemporaryDirectory() as run_dir:
            monitor = Monitor(Path(run_dir), enabled=True, total_steps=args.steps, start_step=0,
                              progress_bar=False)  # fmt: skip

            def engine_block() -> None:
                train(cfg=cfg, accelerator=accelerator, model=engine_model, optimizer=engine_opt,
                      loader=FixedBatches({"views": views}, args.steps), schedules=Schedules.from_config(cfg),
                      monitor=monitor, save=lambda step: None, start_step=0)  # fmt: skip

            extra["engine_syncs_per_step"] = count_syncs(engine_block) / args.steps
            extra["bare_syncs_per_step"] = count_syncs(lambda: bare_loop(bare_model, bare_opt, views, args.steps, clip, bare_autocast)) / args.steps  # fmt: skip
            monitor.close()
    return {
        "backbone": cfg.model.backbone,
        "img_size": cfg.data.img_size,
        "engine_img_s": engine_rate,
        "bare_img_s": bare_rate,
        "overhead_pct": 100.0 * (bare_rate / engine_rate - 1.0),
        "engine_peak_mb": memory["engine"] / 2**20,
        "bare_peak_mb": memory["bare"] / 2**20,
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
    )
    parser.add_argument("--methods", nargs="+", help="default: the --recipe names, else mae dino moco simclr")
    parser.add_argument("--recipe", nargs="*", default=[], metavar="METHOD=YAML", help="recipe of configs/pretrain/ per method (default: the 28 px CPU ones)")  # fmt: skip
    parser.add_argument("--flops", action="store_true", help="model FLOPs per step and FLOP utilisation")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for --flops (H100/H200 SXM: 989)")  # fmt: skip
    parser.add_argument("--count-syncs", action="store_true", help="host-device synchronisations per step (CUDA)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per path (median reported)")
    parser.add_argument("--log-every", type=int, default=20, help="engine logging cadence (the recipes' default)")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.methods = args.methods or [item.split("=", 1)[0] for item in args.recipe] or sorted(RECIPES)
    if not args.data.is_file():
        print(f"{args.data} not found: the batches are random images")
    accelerator = build_accelerator(args.precision)
    results = {"device": str(accelerator.device), "threads": torch.get_num_threads(), "batch": args.batch,
               "precision": args.precision, "methods": {}}  # fmt: skip
    print(f"{'method':<8} {'backbone':<24} {'engine img/s':>12} {'bare img/s':>11} {'overhead':>9} "
          f"{'engine MB':>10} {'bare MB':>8}")  # fmt: skip
    for method in args.methods:
        row = measure(method, args, accelerator)
        results["methods"][method] = row
        extra = "".join(f"  {key}={row[key]:.3g}" for key in ("step_tflop", "engine_tflops_s", "mfu_pct",
                        "engine_syncs_per_step", "bare_syncs_per_step") if key in row)  # fmt: skip
        print(f"{method:<8} {row['backbone']:<24} {row['engine_img_s']:>12.1f} {row['bare_img_s']:>11.1f} "
              f"{row['overhead_pct']:>8.1f}% {row['engine_peak_mb']:>10.1f} {row['bare_peak_mb']:>8.1f}{extra}", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
