"""Distributed and precision setup: the one place that knows about process groups, timeouts and DeepSpeed.

- ``make_accelerator(cfg)``: the run's ``Accelerator``: DDP (gloo on CPU, NCCL on GPUs) or DeepSpeed ZeRO 1/2/3
  through Accelerate's DeepSpeed plugin (``dist.backend``), with ``dist.timeout_s`` on the rendezvous and on every
  collective. A rendezvous that does not complete raises :class:`DistributedFailure` after the timeout.
- ``collective_failure(err)``: tells a dead / hung peer apart from other errors, so that the run ends with a
  clear message and :data:`EXIT_DISTRIBUTED` rather than a traceback deep in gloo or a hang.
- DeepSpeed setup (the engine owns parameters and optimizer state): ``keep_momentum_outside_engine`` (the EMA
  teacher / momentum encoder stays an fp32, unsharded module beside the engine), ``gathered_parameters`` (full
  student parameters for the EMA update under ZeRO-3). Its checkpoints are ``pretrain.checkpoint``'s business.
- ``shutdown(accelerator)``: barrier + ``destroy_process_group`` (a 2-process ZeRO-3 run aborted at exit without).

Accelerate 1.15 with DeepSpeed on CPU: with ``Accelerator(cpu=True)`` accelerate never takes its DeepSpeed path,
and with ``cpu=False`` it picks no process-group backend when there is no GPU, so it counts one process while
DeepSpeed counts all of them (batch-size check ``16 != 16 * 1 * 2``). The workaround: ``cpu=False`` and
``InitProcessGroupKwargs(backend="gloo")``, a public setting that accelerate passes to DeepSpeed's
``init_distributed``; launches are the usual ``accelerate launch`` / ``torchrun`` / one Slurm task per process.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from omegaconf import DictConfig
from torch import nn

from pretrain.config import Backend, Precision
from pretrain.errors import EXIT_DISTRIBUTED, ConfigError, DistributedFailure
from pretrain.monitor import offline_tracker_defaults

__all__ = ["EXIT_DISTRIBUTED", "DistributedFailure", "make_accelerator", "shutdown"]
DEEPSPEED_TAG = "zero"  # sub-folder of a checkpoint directory that DeepSpeed writes
META = "medfm.pt"  # our part of a DeepSpeed checkpoint: step, data position, RNG, config, EMA modules
LAST_DIR = "last"  # symlink to the newest DeepSpeed checkpoint directory


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
        raise ConfigError(f"config key 'train.precision': fp16 ({precision_note}) does not run with DeepSpeed: use bf16 or no")  # fmt: skip
    deepspeed = deepspeed_config(cfg) if cfg.dist.backend == Backend.deepspeed else None
    trackers = list(cfg.logging.trackers)
    tracker_notes = offline_tracker_defaults(trackers, Path(cfg.train.run_dir))
    accelerator = build_accelerator(precision, cfg.train.grad_accum, cfg.dist.timeout_s, deepspeed,
                                    log_with=trackers, project_dir=cfg.train.run_dir)  # fmt: skip
    accelerator.medfm_environ = environ
    return accelerator, [precision_note, *([backend_note] if backend_note else []), *tracker_notes]


def deepspeed_file_precision(cfg: DictConfig) -> str | None:
    """The precision a DeepSpeed JSON (``dist.deepspeed_config``) enables: ``bf16``, ``no`` (bf16 disabled), or
    None when it leaves it to the run ("auto" or absent). fp16 is refused: DeepSpeed's loss scaler skips steps
    that the engine's non-finite-step accounting would count as divergence."""
    if cfg.dist.backend != Backend.deepspeed or cfg.dist.deepspeed_config is None:
        return None
    ds = _read_deepspeed_json(cfg.dist.deepspeed_config)
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"config key 'dist.deepspeed_config': {cfg.dist.deepspeed_config} enables fp16; use bf16 (or no)")  # fmt: skip
    enabled = ds.get("bf16", {}).get("enabled", "auto")
    return None if enabled == "auto" else ("bf16" if enabled else "no")


def _read_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key 'dist.deepspeed_config': cannot read {path}: {err}") from err


# What `accelerate launch` sets from an Accelerate config that chose DeepSpeed (accelerate.utils.launch).
_DEEPSPEED_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                  "ACCELERATE_GRADIENT_CLIPPING")  # fmt: skip


def resolve_precision(requested: str, deepspeed_file: str | None = None) -> tuple[str, str]:
    """``(precision, where it came from)``. ``auto`` defers to Accelerate: the precision the run's DeepSpeed config
    file enables (``deepspeed_file``), else the mixed precision that ``accelerate config`` / ``accelerate launch
    --mixed_precision`` chose (``ACCELERATE_MIXED_PRECISION``), else ``no``, as ``Accelerator(mixed_precision=None)``
    reads it; an explicit value wins over both."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() or None
    if requested == "auto" and deepspeed_file is not None:
        return deepspeed_file, f"precision {deepspeed_file} (train.precision=auto: the DeepSpeed config file)"
    if requested == "auto":
        value = launcher or "no"
        origin = "the Accelerate config / launch" if launcher else "no Accelerate setting: fp32"
        return value, f"precision {value} (train.precision=auto: {origin})"
    ignored = f"; the Accelerate setting {launcher} is not used" if launcher and launcher != requested else ""
    return requested, f"precision {requested} (train.precision={requested}{ignored})"


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
        raise ConfigError(f"config key 'dist.backend': auto takes the ZeRO stage or config file of the Accelerate config, not {unsupported}: put offloading in a DeepSpeed JSON (dist.deepspeed_config)")  # fmt: skip
    accumulation = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accumulation is not None and int(accumulation) != cfg.train.grad_accum:
        raise ConfigError(f"config key 'train.grad_accum': {cfg.train.grad_accum}, but the Accelerate config sets gradient_accumulation_steps={accumulation}: make them agree")  # fmt: skip
    clipping = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clipping is not None and float(clipping) != float(cfg.optim.clip_grad):
        raise ConfigError(f"config key 'optim.clip_grad': {cfg.optim.clip_grad}, but the Accelerate config sets gradient_clipping={clipping}: make them agree")  # fmt: skip
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
    ``precision``: ``no``, ``bf16``, ``fp16`` or ``auto`` (``resolve_precision``)."""
    environ = dict(os.environ)
    precision = resolve_precision(precision)[0]
    if deepspeed_config is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _clear_deepspeed_env()  # no DeepSpeed asked for here (fine-tuning, bench): a plain process group
    cuda = torch.cuda.is_available()
    deepspeed = deepspeed_config is not None
    if deepspeed and not _launched() and not torch_dist.is_initialized():
        # Plain `python -m pretrain.main` with DeepSpeed: a process group of one, as a launcher would set up.
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
            mixed_precision=precision,
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


# --- DeepSpeed ---------------------------------------------------------------------------------------------------

# What the files in configs/deepspeed/ hold; "auto" values are filled from the run's config by deepspeed_config.
_ZERO = {
    1: {"stage": 1, "overlap_comm": False, "contiguous_gradients": True},
    2: {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    3: {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_max_live_parameters": 1000000000,
        "stage3_max_reuse_distance": 1000000000,
        "stage3_gather_16bit_weights_on_model_save": False,
    },
}


def default_deepspeed_config(stage: int) -> dict[str, Any]:
    """The DeepSpeed config of ``configs/deepspeed/zero{stage}.json`` (batch sizes, clipping, bf16: "auto")."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": dict(_ZERO[stage]),
        "steps_per_print": 1000000000,
        "wall_clock_breakdown": False,
    }


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for a run: ``dist.deepspeed_config`` (or the default of ``dist.zero_stage``) with
    its "auto" values taken from ``train`` and ``optim``: micro batch = train.batch_size, accumulation =
    train.grad_accum, clipping = optim.clip_grad, bf16 = train.precision. Any other "auto" is an error."""
    d = cfg.dist
    if d.deepspeed_config is not None:
        ds = _read_deepspeed_json(d.deepspeed_config)
        if ds.get("fp16", {}).get("enabled") is True:
            raise ConfigError(f"config key 'dist.deepspeed_config': {d.deepspeed_config} enables fp16; use bf16 (or no)")  # fmt: skip
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if d.zero_stage is not None and d.zero_stage != stage:
            raise ConfigError(
                f"config key 'dist.zero_stage': {d.zero_stage} contradicts zero_optimization.stage={stage} in "
                f"{d.deepspeed_config} (set one of them)"
            )
        if stage not in (1, 2, 3):
            raise ConfigError(f"config key 'dist.deepspeed_config': {d.deepspeed_config} needs ZeRO stage 1, 2 or 3")
    else:
        ds = default_deepspeed_config(d.zero_stage or 2)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": float(cfg.optim.clip_grad),
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(
                f"config key 'dist.deepspeed_config': {key}={ds[key]!r} in {d.deepspeed_config} differs from the "
                f'run\'s {value!r}; set it to "auto"'
            )
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]  # DeepSpeed computes micro batch x accumulation x processes
    bf16 = cfg.train.precision == Precision.bf16
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW (param groups with wd_scale)
    autos = [key for key, value in _flatten(ds).items() if value == "auto"]
    if autos:
        raise ConfigError(f"config key 'dist.deepspeed_config': no value known for {', '.join(autos)} (\"auto\")")
    return ds


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of a DeepSpeed run; 0 otherwise."""
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def autocast(accelerator: Accelerator, cfg: DictConfig):
    """The forward's precision context. DeepSpeed bf16 holds the engine's parameters in bf16 and does not cast
    inputs (accelerate's autocast is then a no-op): torch autocast casts the fp32 images and runs the fp32 EMA
    modules in bf16 too."""
    if uses_deepspeed(accelerator) and cfg.train.precision == Precision.bf16:
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16)
    return accelerator.autocast()


def keep_momentum_outside_engine(method: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    """Unregister the method's EMA modules (``method.momentum_modules``) so that DeepSpeed neither shards, casts
    to bf16 nor checkpoints them; they stay plain fp32 modules, reachable under the same attribute names.

    Why: under ZeRO-3 each rank holds a shard of every engine parameter (an EMA update of ``.data`` silently
    changes nothing), and a bf16 teacher cannot follow an EMA with momentum ~0.996 (updates below bf16's
    resolution round away). Returns ``{name: module}``; their states travel in our checkpoint part (``medfm.pt``).
    """
    outside = {}
    for name in method.momentum_modules:
        module = getattr(method, name)
        delattr(method, name)  # out of method._modules: not in parameters(), state_dict() or the engine
        object.__setattr__(method, name, module.to(device))  # still method.<name> for forward and export
        outside[name] = module
    return outside


def prepare_deepspeed(
    accelerator: Accelerator, cfg: DictConfig, method: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Any, Any]:
    """``accelerator.prepare`` for DeepSpeed: EMA modules kept outside the engine; under ZeRO-3 + bf16 the floating
    buffers cast to bf16 (ZeRO-1/2 cast the whole module, ZeRO-3 only the parameters it partitions: a BatchNorm
    with bf16 weights and fp32 running statistics does not run); parameters read outside their module's forward
    registered. Returns (engine, optimizer)."""
    keep_momentum_outside_engine(method, accelerator.device)
    stage3 = zero_stage(accelerator) == 3
    if stage3 and cfg.train.precision == Precision.bf16:
        for buffer in method.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(torch.bfloat16)
    engine, optimizer = accelerator.prepare(method, optimizer)
    if stage3:
        register_external_parameters(accelerator.unwrap_model(engine))
    return engine, optimizer


def sync_batchnorm(module: nn.Module, accelerator: Accelerator) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when several CUDA processes train, as the DINO and MoCo v3 references do: a
    per-GPU batch of 32-64 gives noisy statistics, and MoCo's BN heads see their batch only. CPU processes (gloo)
    keep BatchNorm: torch has no SyncBatchNorm kernel for them. Call before building the optimizer."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def gathered_parameters(accelerator: Accelerator, model: nn.Module):
    """Context in which ``model``'s parameters are whole on every rank (read-only): ZeRO-3 only."""
    if zero_stage(accelerator) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def register_external_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters when that module's forward is called. Parameters read elsewhere
    (a timm ViT's ``pos_embed`` / ``cls_token``, read in ``forward_features`` that the methods call directly;
    weight-norm's ``weight_g`` / ``weight_v``, read by a forward pre-hook) are declared as used by the root
    module, so they are gathered for its whole forward. They are small (embeddings, tokens, one head layer)."""
    import deepspeed

    for module in model.modules():
        if module is model:
            continue
        if next(module.children(), None) is not None or module._forward_pre_hooks:
            for param in module.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(model, param)


@contextmanager
def as_collective_failure(cfg: DictConfig) -> Iterator[None]:
    """Re-raise a failed collective as DistributedFailure with a message that says what happened."""
    try:
        yield
    except (torch_dist.DistError, RuntimeError) as err:
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1 and collective_failure(err):
            raise DistributedFailure(failure_message(err, cfg)) from err
        raise
