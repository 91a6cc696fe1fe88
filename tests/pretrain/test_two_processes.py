"""Two CPU processes over gloo (slow: process start-up dominates).

- MoCo v3 and NT-Xent losses gathered across 2 ranks give, after DDP's gradient averaging, the gradients of
  the same loss on the full batch in one process.
- A 2-process ``accelerate launch`` run really is one run of world size 2 (STACK.md: without ``cpu=True`` it
  silently becomes two independent runs), checkpoints every rank's RNG, and resumes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightly.loss import NTXentLoss

from medfm.pretrain import checkpoint as ckpt
from medfm.pretrain.methods.moco import MoCoV3Loss

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses():
    return {"moco": lambda q, k: MoCoV3Loss(0.2)(q, k.detach()), "ntxent": NTXentLoss(0.2, gather_distributed=True)}


def full_batch_grads(q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = {}
    for name, loss_fn in losses().items():
        q_full = q.clone().requires_grad_()
        loss_fn(q_full, k).backward()
        grads[name] = q_full.grad
    return grads


def worker(rank: int, port: int, q: torch.Tensor, k: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = q.shape[0] // 2
    for name, loss_fn in losses().items():
        q_local = q[rank * half : (rank + 1) * half].clone().requires_grad_()
        loss_fn(q_local, k[rank * half : (rank + 1) * half]).backward()
        # DDP averages parameter gradients over ranks; here each rank owns its half of q.
        full = torch.zeros_like(q)
        full[rank * half : (rank + 1) * half] = q_local.grad
        dist.all_reduce(full)
        out[name] = full / 2
    dist.destroy_process_group()


def test_gathered_losses_match_the_full_batch_gradient():
    torch.manual_seed(0)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    expected = full_batch_grads(q, k)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(worker, args=(free_port(), q, k, out), nprocs=2, join=True)
    for name, grad in expected.items():
        assert torch.allclose(out[name], grad, atol=1e-6), name


def test_two_process_run_is_one_run_and_resumes(tiny, tmp_path):
    overrides = tiny("mae", tmp_path, **{"train.batch_size": 4, "train.grad_accum": 2, "schedule.epochs": 1})
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        str(free_port()), "-m", "medfm.pretrain.main", "--config", str(REPO / "configs/pretrain/mae_vit_tiny_pneumonia28.yaml"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for epochs in (1, 2):
        done = subprocess.run(
            [*command, *overrides, f"schedule.epochs={epochs}"], cwd=REPO, env=env, capture_output=True, timeout=300
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert state["config"]["derived"]["world_size"] == 2 and state["config"]["derived"]["global_batch"] == 16
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert state["step"] == 8  # 64 samples / 16 per step = 4 steps per epoch, 2 epochs
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [4]
