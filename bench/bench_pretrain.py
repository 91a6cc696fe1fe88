"""Engine overhead: training images/s and peak memory of a step, medfm's engine vs a bare PyTorch loop.

For each objective, the same model, batch, precision and optimizer run (a) through ``medfm.pretrain.engine.train``
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
model FLOP utilisation against ``--peak-tflops`` (dense bf16 of the GPU; H100 / H200 SXM: 989).

``--count-syncs`` counts the host-device synchronisations of one optimizer step, on CPU and GPU alike
(``medfm.pretrain.host_syncs.HostSyncCounter``: the operations that make the host wait for a GPU), for the engine and
the bare loop: a further block of ``--steps`` steps is counted step by step and the figure is the median over the
steps that are neither the first nor a logging step (the engine logs every ``--log-every`` steps and at the last
step); ``engine_sync_sites`` lists the ``file:line`` of each sync of such a step. On CUDA, torch's sync debug mode
counts alongside as a cross-check (``*_cuda_debug_syncs_per_step``); on CPU, copies between host and device do
not exist and are not counted.

The JSON (``--json``) is rewritten after every timed block and every count, so a run stopped by a time limit
keeps every figure it had (``"complete": false`` on an unfinished method).
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
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from itertools import pairwise
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import default_collate

from medfm.data_shards.specs import MedMNISTDataset
from medfm.pretrain.backends import backend_for
from medfm.pretrain.config import derive, load_config
from medfm.pretrain.distributed import build_accelerator
from medfm.pretrain.engine import Schedules, build_optimizer, train
from medfm.pretrain.host_syncs import HostSyncCounter
from medfm.pretrain.methods import METHODS
from medfm.pretrain.monitor import Monitor

REPO = Path(__file__).resolve().parents[1]
RECIPES = {  # distill is left out: it needs a teacher model on disk
    "mae": "mae_vit_tiny_pneumonia28.yaml",
    "dino": "dino_vit_tiny_pneumonia28.yaml",
    "dinov2": "dinov2_vit_tiny_pneumonia28.yaml",
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
    """Stands in for ``EpochLoader``: the same batch, ``steps`` times per epoch; ``on_batch()`` before each."""

    def __init__(self, batch: dict, steps: int, on_batch: Callable[[], None] | None = None):
        self.batch, self.steps, self.on_batch = batch, steps, on_batch

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        for _ in range(self.steps - skip):
            if self.on_batch is not None:
                self.on_batch()
            yield self.batch


def make_batch(cfg, method_cls, batch_size: int, data: Path | None) -> dict:
    """One batch as the training loader makes it: the method's views of each image, then its collate (DINOv2
    adds its mask indices there) or torch's."""
    transform = method_cls.build_transform(cfg)
    if data is not None and data.is_file():
        dataset = MedMNISTDataset(data, "train")
        images = [dataset[i]["image"] for i in range(batch_size)]
    else:
        generator = torch.Generator().manual_seed(0)
        images = [torch.rand(1, cfg.data.img_size, cfg.data.img_size, generator=generator) for _ in range(batch_size)]
    samples = [{"views": transform(image), "label": 0, "key": str(i)} for i, image in enumerate(images)]
    return getattr(transform, "collate", default_collate)(samples)


def bare_loop(model, optimizer, views, steps: int, clip: float, autocast, on_step=None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        if on_step is not None:
            on_step()
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


class StepSyncs:
    """Host syncs of each optimizer step of a run: ``HostSyncCounter`` (any device) and, on CUDA, torch's sync debug
    mode alongside. ``step()`` is called as each step starts; the segments are then: before the first step, step
    0, step 1, ... (the last one closed by leaving the context)."""

    def __init__(self, cuda: bool):
        self.counter = HostSyncCounter(count_cpu=not cuda)
        self.cuda, self.debug_marks = cuda, []

    def __enter__(self) -> StepSyncs:
        self._warnings = warnings.catch_warnings(record=True) if self.cuda else nullcontext([])
        self.caught = self._warnings.__enter__()
        if self.cuda:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.counter.__enter__()
        return self

    def step(self) -> None:
        self.counter.mark()
        self.debug_marks.append(self._debug_count())

    def __exit__(self, *exc: object) -> None:
        self.step()
        self.counter.__exit__(*exc)
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)

    def _debug_count(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self.caught)

    def summary(self, prefix: str, normal: Callable[[int], bool]) -> dict:
        """Median syncs over the steps ``k`` with ``normal(k)``, the sites of the first such step and (CUDA) the
        debug mode's median over the same steps."""
        counts = self.counter.segments()[1:]  # drop what ran before the first step
        steps = [k for k in range(len(counts)) if normal(k)] or list(range(len(counts)))
        row: dict = {f"{prefix}_syncs_per_step": statistics.median(counts[k] for k in steps)}
        row[f"{prefix}_sync_sites"] = dict(self.counter.segment_sites(steps[0] + 1))
        if self.cuda:
            debug = [b - a for a, b in pairwise(self.debug_marks)]  # marks start at the first step
            row[f"{prefix}_cuda_debug_syncs_per_step"] = statistics.median(debug[k] for k in steps)
        return row


def measure(method: str, args: argparse.Namespace, accelerator: Accelerator, report: Callable[[dict], None]) -> dict:
    """The row of one method; ``report(row)`` after every timed block and count (the JSON is rewritten)."""
    overrides = [
        f"train.batch_size={args.batch}",
        f"train.precision={args.precision}",
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
    backend = backend_for(accelerator, cfg)
    engine_model, engine_opt = backend.prepare(engine_model, lambda model: build_optimizer(model, cfg))
    bare_opt = torch.optim.AdamW([p for p in bare_model.parameters() if p.requires_grad], lr=cfg.derived.lr)
    clip = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    cuda = accelerator.device.type == "cuda"

    def bare_autocast() -> AbstractContextManager:
        return torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None)

    def run_engine(run_dir: str, on_batch: Callable[[], None] | None = None) -> None:
        monitor = Monitor(Path(run_dir), enabled=True, total_steps=args.steps, start_step=0, progress_bar=False)
        batches = FixedBatches({"views": views}, args.steps * cfg.train.grad_accum, on_batch)
        train(cfg=cfg, accelerator=accelerator, backend=backend, model=engine_model, optimizer=engine_opt,
              loader=batches, schedules=Schedules.from_config(cfg), monitor=monitor, save=lambda step: None,
              start_step=0)  # fmt: skip
        monitor.close()

    row: dict = {"backbone": cfg.model.backbone, "img_size": cfg.data.img_size, "complete": False}
    times: dict[str, list[float]] = {"engine": [], "bare": []}
    memory: dict[str, int] = {"engine": 0, "bare": 0}
    images = args.steps * args.batch
    with tempfile.TemporaryDirectory() as run_dir:
        for block in range(args.repeats + 1):  # block 0 warms up both paths
            for name in ("bare", "engine"):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    if name == "bare":
                        bare_loop(bare_model, bare_opt, views, args.steps, clip, bare_autocast)
                    else:
                        run_engine(run_dir)
                    if cuda:
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                if block > 0:
                    times[name].append(seconds)
                    memory[name] = max(memory[name], rss.peak)
                    if cuda:
                        memory[name] = max(memory[name], torch.cuda.max_memory_allocated())
            if block > 0:
                engine_rate = images / statistics.median(times["engine"])
                bare_rate = images / statistics.median(times["bare"])
                row.update(
                    engine_img_s=engine_rate,
                    bare_img_s=bare_rate,
                    repeats_done=block,
                    overhead_pct=100.0 * (bare_rate / engine_rate - 1.0),
                    engine_peak_mb=memory["engine"] / 2**20,
                    bare_peak_mb=memory["bare"] / 2**20,
                )
                report(row)
        if args.flops:
            flops = step_flops(bare_model, views, bare_autocast)
            row["step_tflop"] = flops / 1e12
            row["engine_tflops_s"] = flops * row["engine_img_s"] / args.batch / 1e12
            row["mfu_pct"] = 100.0 * row["engine_tflops_s"] / args.peak_tflops
            report(row)
        if args.count_syncs:
            accum, every = cfg.train.grad_accum, cfg.logging.every_steps
            with StepSyncs(cuda) as engine_syncs:
                fetched = iter(range(args.steps * accum))

                def on_batch() -> None:  # the first micro-batch of each optimizer step starts a step
                    if next(fetched) % accum == 0:
                        engine_syncs.step()

                run_engine(run_dir, on_batch)
            # step k logs when k + 1 is a multiple of logging.every_steps, and at the last step
            normal = lambda k: 0 < k < args.steps - 1 and (k + 1) % every != 0  # noqa: E731
            row.update(engine_syncs.summary("engine", normal))
            logging_steps = [k for k in range(1, args.steps) if (k + 1) % every == 0 or k == args.steps - 1]
            row["engine_syncs_logging_step"] = engine_syncs.counter.segments()[1:][logging_steps[0]]
            with StepSyncs(cuda) as bare_syncs:
                bare_loop(bare_model, bare_opt, views, args.steps, clip, bare_autocast, on_step=bare_syncs.step)
            row.update(bare_syncs.summary("bare", lambda k: k > 0))
            report(row)
    row["complete"] = True
    report(row)
    return row


def write_json(path: Path, results: dict) -> None:
    """Atomically (a stopped run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
    )
    parser.add_argument("--methods", nargs="+", help="default: the --recipe names, else " + " ".join(sorted(RECIPES)))
    parser.add_argument(
        "--recipe",
        nargs="*",
        default=[],
        metavar="METHOD=YAML",
        help="recipe of configs/pretrain/ per method (default: the 28 px CPU ones)",
    )
    parser.add_argument("--flops", action="store_true", help="model FLOPs per step and FLOP utilisation")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak for --flops (H100/H200 SXM: 989)"
    )
    parser.add_argument("--count-syncs", action="store_true", help="host-device synchronisations per optimizer step")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per path (median reported)")
    parser.add_argument("--log-every", type=int, default=20, help="engine logging cadence (the recipes' default)")
    parser.add_argument("--precision", choices=("fp32", "no", "bf16", "fp16"), default="fp32")  # no: fp32
    parser.add_argument("--json", type=Path, help="rewritten after every block and count")
    args = parser.parse_args()
    args.methods = args.methods or [item.split("=", 1)[0] for item in args.recipe] or sorted(RECIPES)
    if not args.data.is_file():
        print(f"{args.data} not found: the batches are random images")
    accelerator = build_accelerator(args.precision)
    results = {
        "device": str(accelerator.device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps": args.steps,
        "precision": args.precision,
        "methods": {},
    }
    if accelerator.device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name()

    def report(method: str, row: dict) -> None:
        results["methods"][method] = row
        if args.json:
            write_json(args.json, results)

    print(
        f"{'method':<8} {'backbone':<24} {'engine img/s':>12} {'bare img/s':>11} {'overhead':>9} "
        f"{'engine MB':>10} {'bare MB':>8}"
    )
    for method in args.methods:
        row = measure(method, args, accelerator, lambda row, method=method: report(method, row))
        extra = "".join(f"  {key}={row[key]:.3g}" for key in ("step_tflop", "engine_tflops_s", "mfu_pct",
                        "engine_syncs_per_step", "engine_syncs_logging_step", "bare_syncs_per_step",
                        "engine_cuda_debug_syncs_per_step", "bare_cuda_debug_syncs_per_step") if key in row)  # fmt: skip
        print(
            f"{method:<8} {row['backbone']:<24} {row['engine_img_s']:>12.1f} {row['bare_img_s']:>11.1f} "
            f"{row['overhead_pct']:>8.1f}% {row['engine_peak_mb']:>10.1f} {row['bare_peak_mb']:>8.1f}{extra}",
            flush=True,
        )
        for site, count in row.get("engine_sync_sites", {}).items():
            print(f"         engine step sync x{count}: {site}")


if __name__ == "__main__":
    main()
