"""The pretraining objectives, by config name. Adding one: a file here, a line below, a config section, a test."""

from pretrain.methods.base import SSLMethod
from pretrain.methods.dino import DINO
from pretrain.methods.dinov2 import DINOv2
from pretrain.methods.distill import Distill
from pretrain.methods.mae import MAE
from pretrain.methods.moco import MoCo
from pretrain.methods.simclr import SimCLR
from pretrain.methods.spark import SparK

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
