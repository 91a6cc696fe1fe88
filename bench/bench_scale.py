"""Scale-out benchmark: images/s and peak memory per rank for 1 process, 2 processes (DDP), and 2 processes with
DeepSpeed ZeRO-2 / ZeRO-3, in one run, through the real ``medfm pretrain`` entry point.

    python bench/bench_scale.py [--backbone vit_base_patch16_224] [--steps 12] [--global-batch 32]

Each setting trains SimCLR for ``--steps`` optimizer steps on PneumoniaMNIST (32 px; a ViT at 32 px has few
tokens, so the parameter-proportional work that ZeRO shards dominates, as in large-model training) with the same
global batch. Images/s: the run's own log (training time only, the first log window dropped as warm-up).
Peak memory per rank: ``ru_maxrss`` of each process on CPU (everything resident: interpreter, torch, data, model
state), ``torch.cuda.max_memory_allocated`` on GPU. CPU threads are split between the processes of a setting
(``OMP_NUM_THREADS = cores // processes``). Prints a table and writes ``bench/results/scale_{cpu|gpu}.json``.
DeepSpeed settings run in fp32 on CPU (bf16 matmuls are slower than fp32 on most CPUs), bf16 on GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/medmnist/pneumoniamnist.npz"
SETTINGS = [  # name, processes, overrides
    ("1 process", 1, []),
    ("2 processes DDP", 2, []),
    ("2 processes ZeRO-2", 2, ["dist.backend=deepspeed", "dist.zero_stage=2"]),
    ("2 processes ZeRO-3", 2, ["dist.backend=deepspeed", "dist.zero_stage=3"]),
]


def worker(out: Path, overrides: list[str]) -> int:
    """One rank: run ``medfm pretrain``, then record this process's peak memory."""
    import torch

    import medfm.pretrain.main as entry

    peak: dict = {}
    real_train = entry.train

    def measured_train(**kw):
        # Peak memory of training only: the end of the run (rank 0 consolidates a DeepSpeed checkpoint and
        # exports the backbone) is not part of what ZeRO stages change.
        step = real_train(**kw)
        peak["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return step

    entry.train = measured_train
    code = entry.pretrain(None, overrides)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "exit_code": code, **peak}))
    return code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(args: argparse.Namespace, run_dir: Path, processes: int, gpu: bool) -> list[str]:
    samples = args.global_batch * args.steps
    return [
        "method=simclr",
        f"data.spec=medmnist:{args.data}",
        "data.img_size=32",
        f"data.samples_per_epoch={samples}",
        "data.num_workers=0",
        f"model.backbone={args.backbone}",
        f"train.batch_size={args.global_batch // processes}",
        f"train.run_dir={run_dir}",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        f"checkpoint.every_steps={args.steps * 10}",  # the final checkpoint only
        f"logging.every_steps={max(1, args.steps // 4)}",
        "logging.figure_every_steps=0",
        "logging.trackers=[]",
        "logging.progress_bar=false",
        "simclr.hidden_dim=512",
        "simclr.output_dim=128",
        *(["train.precision=bf16"] if gpu else []),
    ]


def run_setting(args, name: str, processes: int, extra: list[str], gpu: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cores = os.cpu_count() or 1
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, cores // processes))}
        script = [
            str(Path(__file__).resolve()),
            "--worker",
            str(tmp),
            *overrides(args, tmp / "run", processes, gpu),
            *extra,
        ]
        if processes == 1:
            command = [sys.executable, *script]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                       str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", str(free_port()), *script]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=args.timeout)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr.decode()[-3000:]}")
        logged = [json.loads(line) for line in (tmp / "run/metrics.jsonl").read_text().splitlines()]
        img_s = [r["img_s"] for r in logged if "img_s" in r][1:]  # first window: warm-up
        ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(processes)]
    memory_key = "cuda_max_allocated_mib" if gpu else "max_rss_mib"
    return {
        "setting": name,
        "processes": processes,
        "images_per_s": sum(img_s) / len(img_s),
        "peak_memory_per_rank_mib": [round(r[memory_key], 1) for r in ranks],
        "memory_measure": memory_key,
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per setting")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if gpu else 0
    settings = [s for s in SETTINGS if not gpu or s[1] <= gpus]
    rows = []
    for name, processes, extra in settings:
        rows.append(run_setting(args, name, processes, extra, gpu))
        row = rows[-1]
        print(
            f"{name:<22} {row['images_per_s']:8.1f} img/s  peak/rank {row['peak_memory_per_rank_mib']} MiB", flush=True
        )
    memory = "GPU max allocated" if gpu else "max RSS"
    print(f"\n| setting | images/s | peak memory per rank ({memory}, MiB) |\n| --- | ---: | --- |")
    for row in rows:
        print(
            f"| {row['setting']} | {row['images_per_s']:.1f} | {' / '.join(f'{m:.0f}' for m in row['peak_memory_per_rank_mib'])} |"
        )
    result = {
        "benchmark": "scale",
        "backbone": args.backbone,
        "img_size": 32,
        "method": "simclr",
        "global_batch": args.global_batch,
        "steps": args.steps,
        "device": torch.cuda.get_device_name(0)
        if gpu
        else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "precision": "bf16" if gpu else "fp32",
        "torch": torch.__version__,
        "rows": rows,
    }
    out = args.out or REPO / "bench/results" / f"scale_{'gpu' if gpu else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(Path(sys.argv[2]), sys.argv[3:]))
    sys.exit(main())
