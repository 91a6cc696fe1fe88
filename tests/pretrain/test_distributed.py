"""The ``dist`` config section, the DeepSpeed config it generates, the EMA modules kept outside the engine, and
failures that must end a multi-process run with a clear error instead of a hang.

The failure tests launch ranks the way ``slurm/pretrain.sbatch`` does (one process per rank, RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT in the environment, no launcher in between), with ``dist.timeout_s`` of a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfm.pretrain.backends.deepspeed import deepspeed_config, default_deepspeed_config, keep_momentum_outside_engine
from medfm.pretrain.config import ConfigError, derive, load_config
from medfm.pretrain.distributed import EXIT_DISTRIBUTED
from medfm.pretrain.methods import DINO, METHODS

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dist_section_is_validated(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"dist\.zero_stage"):
        load_config(None, tiny("mae", tmp_path, **{"dist.backend": "deepspeed", "dist.zero_stage": 4}))
    with pytest.raises(ConfigError, match=r"dist\.zero_stage.*only used with dist\.backend=deepspeed"):
        load_config(None, tiny("mae", tmp_path, **{"dist.zero_stage": 2}))
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(None, tiny("mae", tmp_path, **{"dist.backend": "deepspeed", "train.precision": "fp16"}))
    with pytest.raises(ConfigError, match=r"dist\.backend"):
        load_config(None, tiny("mae", tmp_path, **{"dist.backend": "fsdp"}))
    with pytest.raises(ConfigError, match=r"dist\.timeout_s"):
        load_config(None, tiny("mae", tmp_path, **{"dist.timeout_s": 0}))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_deepspeed_configs_are_the_generated_ones(stage):
    shipped = json.loads((REPO / f"configs/deepspeed/zero{stage}.json").read_text())
    assert shipped == default_deepspeed_config(stage)


def test_deepspeed_config_fills_auto_values_from_the_run(tiny, tmp_path):
    extra = {
        "dist.backend": "deepspeed",
        "train.batch_size": 8,
        "train.grad_accum": 2,
        "optim.clip_grad": 3.0,
        "train.precision": "bf16",
    }
    cfg = load_config(
        None, tiny("dino", tmp_path, **extra, **{"dist.deepspeed_config": "configs/deepspeed/zero3.json"})
    )
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (
        8,
        2,
        3.0,
    )
    assert "train_batch_size" not in ds  # DeepSpeed computes it from the number of processes
    assert deepspeed_config(load_config(None, tiny("dino", tmp_path, **extra)))["zero_optimization"]["stage"] == 2
    clash = tiny(
        "dino", tmp_path, **extra, **{"dist.deepspeed_config": "configs/deepspeed/zero3.json", "dist.zero_stage": 1}
    )
    with pytest.raises(ConfigError, match="contradicts"):
        deepspeed_config(load_config(None, clash))
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**default_deepspeed_config(1), "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(load_config(None, tiny("dino", tmp_path, **extra, **{"dist.deepspeed_config": str(fixed)})))


@pytest.mark.parametrize("method", ["dino", "moco"])
def test_ema_modules_leave_the_engine_but_stay_reachable(tiny, tmp_path, method):
    import torch

    cfg = derive(load_config(None, tiny(method, tmp_path)), 1, 64)
    model = METHODS[method].from_config(cfg)
    names = model.momentum_modules
    assert names and all(name in dict(model.named_children()) for name in names)
    outside = keep_momentum_outside_engine(model, torch.device("cpu"))
    assert set(outside) == set(names)
    assert not any(key.split(".")[0] in names for key in model.state_dict())
    assert not any(p is q for p in model.parameters() for m in outside.values() for q in m.parameters())
    assert all(getattr(model, name) is outside[name] for name in names)
    if isinstance(model, DINO):
        model.train()
        views = [torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28), torch.rand(2, 1, 14, 14), torch.rand(2, 1, 14, 14)]
        assert torch.isfinite(model(views, 0)["loss"])


def rank_command(tiny, run_dir: Path, **extra) -> list[str]:
    overrides = tiny("mae", run_dir, **{"dist.timeout_s": 5, **extra})
    return [
        sys.executable,
        "-m",
        "medfm.pretrain.main",
        "--config",
        str(REPO / "configs/pretrain/mae_vit_tiny_pneumonia28.yaml"),
        *overrides,
    ]


def rank_env(rank: int, port: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip


def test_a_rank_that_never_starts_ends_the_run_after_the_timeout(tiny, tmp_path):
    start = time.monotonic()
    done = subprocess.run(
        rank_command(tiny, tmp_path), cwd=REPO, env=rank_env(0, free_port()), capture_output=True, timeout=120
    )
    elapsed = time.monotonic() - start
    err = done.stderr.decode()
    assert done.returncode == EXIT_DISTRIBUTED, err[-3000:]
    assert "rendezvous of 2 processes" in err and "did not complete within dist.timeout_s=5 s" in err, err[-3000:]
    assert elapsed < 5 + 40, elapsed  # the timeout, plus start-up (imports, dataset) on a busy 2-core machine


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_mid_run_ends_the_other_with_a_clear_error(tiny, tmp_path, how):
    port, run_dir = free_port(), tmp_path / "run"
    command = rank_command(tiny, run_dir, **{"schedule.epochs": 50, "checkpoint.every_steps": 2})
    ranks = [
        subprocess.Popen(command, cwd=REPO, env=rank_env(r, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "step-0000002.pt").exists():
            assert all(r.poll() is None for r in ranks), ranks[0].stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        code = ranks[0].wait(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    err = ranks[0].stderr.read().decode()
    assert code == EXIT_DISTRIBUTED, err[-3000:]
    assert "a collective failed" in err and "another process died" in err, err[-3000:]
    assert elapsed < (5 if how == "killed" else 5 + 5) + 15, elapsed  # a hung peer: after dist.timeout_s
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e.get("event") == "distributed_failure"] == ["distributed_failure"]
