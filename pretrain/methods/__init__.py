"""The pretraining objectives, by config name. Adding one: a file here, a line below, a config section, a test."""

from medfm.pretrain.methods.base import SSLMethod
from medfm.pretrain.methods.dino import DINO
from medfm.pretrain.methods.dinov2 import DINOv2
from medfm.pretrain.methods.distill import Distill
from medfm.pretrain.methods.mae import MAE
from medfm.pretrain.methods.moco import MoCo
from medfm.pretrain.methods.simclr import SimCLR
from medfm.pretrain.methods.spark import SparK

METHODS: dict[str, type[SSLMethod]] = {
    "mae": MAE,
    "dino": DINO,
    "simclr": SimCLR,
    "moco": MoCo,
    "dinov2": DINOv2,
    "distill": Distill,
    "spark": SparK,
}

__all__ = ["DINO", "MAE", "METHODS", "DINOv2", "Distill", "MoCo", "SSLMethod", "SimCLR", "SparK"]
