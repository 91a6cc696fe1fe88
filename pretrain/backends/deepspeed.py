"""The DeepSpeed ZeRO backend: the one place that knows how DeepSpeed differs from a plain / DDP run.

DeepSpeed enters through Accelerate's DeepSpeed plugin (``medfm.pretrain.distributed.build_accelerator`` passes it the
config built here); the engine then owns the parameters (bf16 copies under ``precision: bf16``, sharded under
ZeRO-3), the optimizer state and its checkpoints. What that means for medfm, all handled here:

- The config: ``configs/deepspeed/zero{1,2,3}.json`` or ``dist.deepspeed_config``, its "auto" values filled from
  the run (``deepspeed_config``); fp16 refused (its loss scaler skips steps our non-finite accounting counts).
- ``prepare``: the EMA teacher / momentum encoder stays an fp32 module outside the engine
  (``keep_momentum_outside_engine``); under bf16 the running statistics of every normalisation layer are cast to
  bf16 with its weights (DeepSpeed >= 0.19.2 casts parameters only, and a BatchNorm with bf16 weights and fp32
  statistics does not run: SimCLR / MoCo heads, every ResNet); ZeRO-3: parameters read outside their module's
  forward are registered.
- ``autocast`` / ``inference``: torch autocast in bf16 for the step *and* for every other forward (figures, kNN),
  because the engine's parameters are bf16 and DeepSpeed does not cast inputs.
- ``gathered``: ZeRO-3 gathers the whole student for the EMA update.
- Checkpoints: directories of ZeRO partitions (``medfm.pretrain.backends.zero_checkpoint``); the release is built from
  the consolidated fp32 weights of the newest one.
- ``runs_models_on_one_process``: False under ZeRO-3 (one rank cannot run a sharded model alone): figures and
  the kNN monitor are off there.

``import deepspeed`` happens only inside functions of this package.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import DictConfig
from torch import nn

from medfm.pretrain.backends.base import TrainingBackend
from medfm.pretrain.backends.zero_checkpoint import DeepSpeedStore
from medfm.pretrain.config import Backend, Precision
from medfm.pretrain.errors import ConfigError

if TYPE_CHECKING:
    from medfm.pretrain.runs import RunBackbone


class DeepSpeedBackend(TrainingBackend):
    """DeepSpeed ZeRO 1-3 through Accelerate (see the module docstring)."""

    name = "deepspeed"

    @property
    def stage(self) -> int:
        return zero_stage(self.accelerator)

    @property
    def bf16(self) -> bool:
        return self.cfg is not None and self.cfg.train.precision == Precision.bf16

    @property
    def runs_models_on_one_process(self) -> bool:
        return self.stage != 3

    def prepare(
        self, method: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self.cfg is not None and self.cfg.train.compile:  # backend auto: DeepSpeed chosen after config checks
            raise ConfigError("config key 'train.compile': not supported with DeepSpeed (dist.backend=ddp compiles)")
        method = self.before_prepare(method)
        optimizer = make_optimizer(method)
        keep_momentum_outside_engine(method, self.device)
        if self.bf16:
            cast_norm_statistics(method, torch.bfloat16)
        engine, optimizer = self.accelerator.prepare(method, optimizer)
        if self.stage == 3:
            register_external_parameters(self.accelerator.unwrap_model(engine))
        return engine, optimizer

    def autocast(self) -> AbstractContextManager:
        # The engine's parameters are bf16 and DeepSpeed does not cast inputs (accelerate's autocast is a no-op
        # under DeepSpeed): torch autocast casts the fp32 images, and runs the fp32 EMA modules in bf16 too.
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @contextmanager
    def inference(self) -> Iterator[None]:
        with torch.no_grad(), self.autocast():
            yield

    def gathered(self, module: nn.Module) -> AbstractContextManager:
        """Context in which ``module``'s parameters are whole on every rank (read-only): ZeRO-3 only."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)

    def store(self, run_dir: Path, keep: int, model: nn.Module, optimizer: Any) -> DeepSpeedStore:
        return DeepSpeedStore(self.accelerator, run_dir, keep, model, lambda: self.accelerator.unwrap_model(model))

    def released_backbone(self, model: nn.Module, run_dir: Path, step: int) -> RunBackbone:
        # The engine's parameters may be sharded (ZeRO-3) and in bf16: release from the consolidated fp32 state of
        # the newest checkpoint, strictly loaded, as `medfm export` does.
        from medfm.pretrain.runs import load_run

        return load_run(run_dir)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of a DeepSpeed run; 0 otherwise."""
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def cast_norm_statistics(method: nn.Module, dtype: torch.dtype) -> None:
    """The floating buffers of normalisation layers (BatchNorm / InstanceNorm running statistics) in ``dtype``,
    the dtype DeepSpeed gives their weights. Other buffers (e.g. rotary frequencies) stay as they are, as DeepSpeed
    leaves them. The EMA modules, outside the engine, stay fp32 (call after ``keep_momentum_outside_engine``)."""
    for module in method.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point():
                    setattr(module, name, buffer.to(dtype))


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


# --- the DeepSpeed config -----------------------------------------------------------------------------------------


def deepspeed_file_precision(cfg: DictConfig) -> str | None:
    """The precision a DeepSpeed JSON (``dist.deepspeed_config``) enables: ``bf16``, ``no`` (bf16 disabled), or
    None when it leaves it to the run ("auto" or absent). fp16 is refused: DeepSpeed's loss scaler skips steps
    that the engine's non-finite-step accounting would count as divergence."""
    if cfg.dist.backend != Backend.deepspeed or cfg.dist.deepspeed_config is None:
        return None
    ds = _read_deepspeed_json(cfg.dist.deepspeed_config)
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(
            f"config key 'dist.deepspeed_config': {cfg.dist.deepspeed_config} enables fp16; use bf16 (or fp32)"
        )
    enabled = ds.get("bf16", {}).get("enabled", "auto")
    return None if enabled == "auto" else ("bf16" if enabled else "fp32")


def _read_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key 'dist.deepspeed_config': cannot read {path}: {err}") from err


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
            raise ConfigError(
                f"config key 'dist.deepspeed_config': {d.deepspeed_config} enables fp16; use bf16 (or fp32)"
            )
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
