"""Distributed and precision setup: the one place that knows about process groups, launchers and timeouts.

- ``make_accelerator(cfg)``: the run's ``Accelerator``: DDP (gloo on CPU, NCCL on GPUs) or DeepSpeed ZeRO 1/2/3
  through Accelerate's DeepSpeed plugin (``dist.backend``; the plugin's config comes from
  ``medfm.pretrain.backends.deepspeed``), with ``dist.timeout_s`` on the rendezvous and on every collective. A
  rendezvous that does not complete raises :class:`DistributedFailure` after the timeout.
- ``collective_failure(err)``: tells a dead / hung peer apart from other errors, so that the run ends with a
  clear message and :data:`EXIT_DISTRIBUTED` rather than a traceback deep in gloo or a hang.
- ``shutdown(accelerator)``: barrier + ``destroy_process_group`` (a 2-process ZeRO-3 run aborted at exit without).

How a run trains once its Accelerator exists (precision casts, autocast, EMA gathering, checkpoints) is the
business of its backend (``medfm.pretrain.backends``).

Accelerate 1.15 with DeepSpeed on CPU: with ``Accelerator(cpu=True)`` accelerate never takes its DeepSpeed path,
and with ``cpu=False`` it picks no process-group backend when there is no GPU, so it counts one process while
DeepSpeed counts all of them (batch-size check ``16 != 16 * 1 * 2``). The workaround: ``cpu=False`` and
``InitProcessGroupKwargs(backend="gloo")``, a public setting that accelerate passes to DeepSpeed's
``init_distributed``; launches are the usual ``accelerate launch`` / ``torchrun`` / one Slurm task per process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration
from omegaconf import DictConfig

from medfm.pretrain.backends.deepspeed import deepspeed_config, deepspeed_file_precision
from medfm.pretrain.config import Backend, Precision, precision_name
from medfm.pretrain.errors import EXIT_DISTRIBUTED, ConfigError, DistributedFailure
from medfm.pretrain.monitor import offline_tracker_defaults

__all__ = ["EXIT_DISTRIBUTED", "DistributedFailure", "make_accelerator", "shutdown"]


def _launched() -> bool:
    """A launcher (accelerate launch, torchrun, Slurm tasks) set up this process as one of a group."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_accelerator(cfg: DictConfig) -> tuple[Accelerator, list[str]]:
    """The Accelerator of a pretraining run (``cfg.dist`` / ``cfg.train``), and lines saying where its precision
    and backend came from. ``auto`` values are resolved (``resolve_backend``, ``resolve_precision``) and written
    back into ``cfg``, so the saved config holds what ran. ``shutdown`` restores the environment as it was here."""
    environ = dict(os.environ)
    backend_note = resolve_backend(cfg)  # first: a DeepSpeed config file can carry the precision
    precision, precision_note = resolve_precision(cfg.train.precision.value, deepspeed_file_precision(cfg))
    cfg.train.precision = Precision(precision)
    if cfg.dist.backend == Backend.deepspeed and cfg.train.precision == Precision.fp16:
        raise ConfigError(
            f"config key 'train.precision': fp16 ({precision_note}) does not run with DeepSpeed: use bf16 or fp32"
        )
    deepspeed = deepspeed_config(cfg) if cfg.dist.backend == Backend.deepspeed else None
    trackers = list(cfg.logging.trackers)
    tracker_notes = offline_tracker_defaults(trackers, Path(cfg.train.run_dir))
    accelerator = build_accelerator(
        precision, cfg.train.grad_accum, cfg.dist.timeout_s, deepspeed, log_with=trackers, project_dir=cfg.train.run_dir
    )
    accelerator.medfm_environ = environ
    return accelerator, [precision_note, *([backend_note] if backend_note else []), *tracker_notes]


# What `accelerate launch` sets from an Accelerate config that chose DeepSpeed (accelerate.utils.launch).
_DEEPSPEED_ENV = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_CONFIG_DS_FIELDS",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "ACCELERATE_GRADIENT_CLIPPING",
)


def resolve_precision(requested: str, deepspeed_file: str | None = None) -> tuple[str, str]:
    """``(precision, where it came from)``. ``auto`` defers to Accelerate: the precision the run's DeepSpeed config
    file enables (``deepspeed_file``), else the mixed precision that ``accelerate config`` / ``accelerate launch
    --mixed_precision`` chose (``ACCELERATE_MIXED_PRECISION``), else bf16 on a GPU that supports it (Ampere and
    later: fp32 there wastes most of the tensor cores), else ``fp32``; an explicit value wins over all of them (``no`` is ``fp32``)."""
    launcher = precision_name(os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()) or None
    requested = precision_name(requested)
    if requested == "auto" and deepspeed_file is not None:
        return deepspeed_file, f"precision {deepspeed_file} (train.precision=auto: the DeepSpeed config file)"
    if requested == "auto" and launcher:
        return launcher, f"precision {launcher} (train.precision=auto: the Accelerate config / launch)"
    if requested == "auto" and gpu_supports_bf16():
        return "bf16", "precision bf16 (train.precision=auto: no Accelerate setting, a GPU with bf16)"
    if requested == "auto":
        return "fp32", "precision fp32 (train.precision=auto: no Accelerate setting)"
    ignored = f"; the Accelerate setting {launcher} is not used" if launcher and launcher != requested else ""
    return requested, f"precision {requested} (train.precision={requested}{ignored})"


def gpu_supports_bf16() -> bool:
    """A GPU with native bf16 (Ampere and later); emulated bf16 (V100, T4) would be slower than fp32."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 counts native support only
        return torch.cuda.is_bf16_supported()


def resolve_backend(cfg: DictConfig) -> str | None:
    """``dist.backend=auto``: DeepSpeed when ``accelerate launch`` ran with an Accelerate config that chose it
    (its ZeRO stage or DeepSpeed config file become ``dist.zero_stage`` / ``dist.deepspeed_config``), else DDP.
    An explicit backend wins and the launcher's DeepSpeed settings are cleared (Accelerate would otherwise build a
    DeepSpeed plugin from them behind a DDP run, or refuse ours). Returns a line for the log, or None."""
    env = os.environ
    launched_deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    requested = cfg.dist.backend
    if requested == Backend.auto:
        cfg.dist.backend = Backend.deepspeed if launched_deepspeed else Backend.ddp
    if not launched_deepspeed:
        return None
    if requested != Backend.auto:
        _clear_deepspeed_env()
        return f"dist.backend={requested.value}: the Accelerate config's DeepSpeed settings are not used"
    unsupported = {k: v for k, v in env.items() if k.startswith("ACCELERATE_DEEPSPEED_OFFLOAD") and v != "none"}
    if unsupported:
        raise ConfigError(
            f"config key 'dist.backend': auto takes the ZeRO stage or config file of the Accelerate config, not {unsupported}: put offloading in a DeepSpeed JSON (dist.deepspeed_config)"
        )
    accumulation = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accumulation is not None and int(accumulation) != cfg.train.grad_accum:
        raise ConfigError(
            f"config key 'train.grad_accum': {cfg.train.grad_accum}, but the Accelerate config sets gradient_accumulation_steps={accumulation}: make them agree"
        )
    clipping = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clipping is not None and float(clipping) != float(cfg.optim.clip_grad):
        raise ConfigError(
            f"config key 'optim.clip_grad': {cfg.optim.clip_grad}, but the Accelerate config sets gradient_clipping={clipping}: make them agree"
        )
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        cfg.dist.deepspeed_config = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
        origin = f"config file {cfg.dist.deepspeed_config}"
    else:
        cfg.dist.zero_stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        origin = f"ZeRO stage {cfg.dist.zero_stage}"
    _clear_deepspeed_env()  # the plugin is built from dist.*, with the run's batch and accumulation filled in
    return f"dist.backend=auto: DeepSpeed from the Accelerate config ({origin})"


def _clear_deepspeed_env() -> None:
    for key in [k for k in os.environ if k in _DEEPSPEED_ENV or k.startswith("ACCELERATE_DEEPSPEED_")]:
        del os.environ[key]


def build_accelerator(
    precision: str,
    grad_accum: int = 1,
    timeout_s: float = 600.0,
    deepspeed_config: dict[str, Any] | None = None,
    *,
    log_with: list[str] | None = None,
    project_dir: str | Path | None = None,
) -> Accelerator:
    """The one way every medfm command (pretrain, finetune, bench) gets its Accelerator: CPU processes on gloo
    (``cpu=True``: without it a 2-process CPU launch gives two unsynchronised runs), DeepSpeed when
    ``deepspeed_config`` is given, a rendezvous timeout. Raises DistributedFailure when the rendezvous fails.
    ``precision``: ``fp32`` (or ``no``), ``bf16``, ``fp16`` or ``auto`` (``resolve_precision``)."""
    environ = dict(os.environ)
    precision = resolve_precision(precision)[0]
    if deepspeed_config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _clear_deepspeed_env()  # no DeepSpeed asked for here (fine-tuning, bench): a plain process group
    cuda = torch.cuda.is_available()
    deepspeed = deepspeed_config is not None
    if deepspeed and not _launched() and not torch_dist.is_initialized():
        # Plain `python -m medfm.pretrain.main` with DeepSpeed: a process group of one, as a launcher would set up.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    init: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if not cuda and _launched():
        init["backend"] = "gloo"  # see the module docstring: accelerate picks none for DeepSpeed on CPU
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config) if deepspeed else None
    try:
        accelerator = Accelerator(
            # DeepSpeed: accelerate only takes its DeepSpeed path with cpu=False (the device is still the CPU).
            cpu=not cuda and not deepspeed,
            mixed_precision="no" if precision == "fp32" else precision,  # Accelerate's word for fp32
            gradient_accumulation_steps=grad_accum,
            deepspeed_plugin=plugin,
            kwargs_handlers=[InitProcessGroupKwargs(**init)],
            log_with=log_with or None,
            # trackers: TensorBoard writes PROJECT_DIR/tensorboard/medfm; wandb / mlflow name the project "medfm"
            project_config=None
            if project_dir is None
            else ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(Path(project_dir) / "tensorboard")),
        )
    except (torch_dist.DistError, RuntimeError) as err:
        if not collective_failure(err) and not isinstance(err, torch_dist.DistError):
            raise
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedFailure(
            f"rendezvous of {os.environ.get('WORLD_SIZE', '?')} processes at {where} did not complete within "
            f"dist.timeout_s={timeout_s:g} s (rank {os.environ.get('RANK', '?')}): a process or machine "
            f"did not start or cannot reach the master address. Cause: {_first_line(err)}"
        ) from err
    # the environment before this run changed it (a process group of one, accelerate's ACCELERATE_USE_DEEPSPEED, the
    # launcher's DeepSpeed variables cleared): shutdown restores it, so that a later run in the same Python process
    # (the API, tests) starts from the user's environment
    accelerator.medfm_environ = environ
    if _launched() and accelerator.num_processes != int(os.environ.get("WORLD_SIZE", accelerator.num_processes)):
        raise DistributedFailure(  # STACK.md: the silent trap of independent, unsynchronised copies
            f"launched as one of {os.environ['WORLD_SIZE']} processes but the Accelerator counts "
            f"{accelerator.num_processes}: the processes would train independently"
        )
    return accelerator


def collective_failure(err: BaseException) -> bool:
    """True for errors raised by a collective whose peer died, hung past the timeout or never joined."""
    if isinstance(err, torch_dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("gloo", "NCCL", "Timed out", "Connection reset", "Connection closed")
    )


def failure_message(err: BaseException, cfg: DictConfig, step: int | None = None) -> str:
    at = f" at step {step}" if step is not None else ""
    return (
        f"a collective failed{at}: another process died, was killed or stopped answering for more than "
        f"dist.timeout_s={cfg.dist.timeout_s:g} s (see its log for the first error). Relaunching resumes from "
        f"the last checkpoint in {cfg.train.run_dir}. Cause: {_first_line(err)}"
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def shutdown(accelerator: Accelerator, failed: bool = False) -> None:
    """End of a run: every process reaches the barrier, then the process group is destroyed.

    After a collective failure the barrier would fail (or wait for a dead peer): destroy only. Then Accelerate's
    process-wide state is reset and the environment restored as it was before the run (``make_accelerator``,
    ``build_accelerator``): another run in the same Python process starts afresh, with other settings."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        if not failed:
            accelerator.wait_for_everyone()
        torch_dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    environ = getattr(accelerator, "medfm_environ", None)
    if environ is not None:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)


@contextmanager
def as_collective_failure(cfg: DictConfig) -> Iterator[None]:
    """Re-raise a failed collective as DistributedFailure with a message that says what happened."""
    try:
        yield
    except (torch_dist.DistError, RuntimeError) as err:
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1 and collective_failure(err):
            raise DistributedFailure(failure_message(err, cfg)) from err
        raise
