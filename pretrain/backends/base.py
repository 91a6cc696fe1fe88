"""The backend interface, and its plain / DDP implementation (one process, or Accelerate's DDP on gloo or NCCL).

Everything that differs between a plain (or DDP) run and a DeepSpeed run goes through a :class:`TrainingBackend`;
the engine, the methods, ``medfm.pretrain.main`` and the release call only this interface:

- ``prepare(method, make_optimizer)``: the GPU speed settings, SyncBatchNorm, precision casts, the optimizer and
  ``accelerator.prepare``; returns the model and optimizer the loop trains.
- ``to_device(images)``: a batch on the device, in the model's memory layout.
- ``autocast()``: the training step's forward precision.
- ``inference()``: every forward that is not the training step (method figures, the kNN monitor, export checks)
  runs under it: no gradients, and the same precision as the step, so that inputs and parameters agree on dtype
  (DeepSpeed bf16 holds the parameters in bf16).
- ``gathered(module)``: the EMA update reads whole student parameters in it (ZeRO-3 shards them).
- ``runs_models_on_one_process``: whether the main process alone can run the model (figures, kNN monitor).
- ``store(run_dir, keep, model, optimizer)``: the run's checkpoint store (``medfm.pretrain.checkpoint`` contract).
- ``released_backbone(model, run_dir, step)``: the backbone to release, whole, fp32, on the main process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from timm.layers import convert_sync_batchnorm
from torch import nn

from medfm.pretrain import checkpoint as ckpt

if TYPE_CHECKING:
    from medfm.pretrain.runs import RunBackbone


class TrainingBackend:
    """Plain / DDP training through Accelerate (see the module docstring for the interface)."""

    name = "ddp"

    def __init__(self, accelerator: Accelerator, cfg: DictConfig | None = None):
        self.accelerator, self.cfg = accelerator, cfg
        self.channels_last = False  # set by prepare

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def runs_models_on_one_process(self) -> bool:
        return True

    def prepare(
        self, method: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Speed settings, SyncBatchNorm (several CUDA processes), optimizer, ``accelerator.prepare``."""
        method = self.before_prepare(method)
        optimizer = make_optimizer(method)
        return self.accelerator.prepare(method, optimizer)

    def before_prepare(self, method: nn.Module) -> nn.Module:
        """What every backend does to the method before its optimizer is built."""
        set_speed_settings(self.device, cudnn_benchmark=self.cfg is None or bool(self.cfg.train.cudnn_benchmark))
        if self.accelerator.num_processes > 1 and self.device.type == "cuda":
            method = to_sync_batchnorm(method)
        self.channels_last = self.cfg is not None and use_channels_last(self.cfg, method, self.device)
        if self.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if self.cfg is not None and self.cfg.train.compile:
            # In place (Module.compile): the state dict keeps its keys, so checkpoints and releases are unchanged.
            method.compile()
        return method

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the run's device, in the model's memory layout (NHWC when channels_last)."""
        layout = torch.channels_last if self.channels_last and images.ndim == 4 else torch.preserve_format
        return images.to(self.device, non_blocking=True, memory_format=layout)

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast()

    @contextmanager
    def inference(self) -> Iterator[None]:
        with torch.no_grad(), self.autocast():
            yield

    def gathered(self, module: nn.Module) -> AbstractContextManager:
        return nullcontext()

    def store(self, run_dir: Path, keep: int, model: nn.Module, optimizer: Any) -> ckpt.CheckpointStore:
        return ckpt.TorchStore(self.accelerator, run_dir, keep, model, optimizer)

    def released_backbone(self, model: nn.Module, run_dir: Path, step: int) -> RunBackbone:
        from medfm.pretrain.runs import run_backbone

        return run_backbone(self.accelerator.unwrap_model(model), self.cfg, step, ckpt.find_resume(run_dir))


def to_sync_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm, as the DINO and MoCo v3 references do when several GPUs train: a per-GPU batch of
    32-64 gives noisy statistics, and MoCo's BN heads see their batch only. timm's conversion: torch's would turn
    timm's fused ``BatchNormAct2d`` into a plain ``SyncBatchNorm`` whose ``act`` / ``drop`` are never called
    (EfficientNet, MobileNet, RegNet, CSP backbones would train without activations). Call before building the
    optimizer (the parameters are kept, the modules replaced)."""
    return convert_sync_batchnorm(module)


_CNN_LAYERS = (nn.Conv2d,)


def use_channels_last(cfg: DictConfig, method: nn.Module, device: torch.device) -> bool:
    """``train.channels_last``: true / false, or null = CUDA and the method's model is mostly convolutions (NHWC
    is what cuDNN's fastest conv kernels use; a ViT's only conv is its patch embedding)."""
    setting = cfg.train.channels_last
    if setting is not None:
        return bool(setting)
    if device.type != "cuda":
        return False
    convs = sum(1 for m in method.modules() if isinstance(m, _CNN_LAYERS))
    return convs > 4


def set_speed_settings(device: torch.device, cudnn_benchmark: bool = True) -> None:
    """GPU settings every medfm command uses: TF32 for fp32 matmuls and convolutions on Ampere and later (fp32
    work that autocast leaves, and ``precision: fp32`` runs), cuDNN autotuning (fixed input sizes)."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = cudnn_benchmark
