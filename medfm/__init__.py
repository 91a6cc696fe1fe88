"""medfm's Python API: the ``medfm`` command's steps as functions that return result objects.

    import medfm

    pool = medfm.shard(["/archive/dicom"], "shards/pool", max_side=256)
    run = medfm.pretrain(out="runs/x", data=f"shards:{pool.out}", method="dinov2",
                         model="vit_small_patch14_dinov2", schedule={"epochs": 50})
    release = medfm.export(run.run_dir, "releases/x")
    scores = medfm.evaluate(release.out, data="medmnist:pneumoniamnist.npz", out="eval/x")
    print(scores.summary["release"]["linear"]["auc"])

Keyword arguments mirror the config schemas (``CONFIG.md``): top-level keys by name, sections as dicts
(``schedule={"epochs": 5}``) or dotted keys (``**{"schedule.epochs": 5}``), and ``overrides=["k=v", ...]``
exactly as on the command line. Failures raise ``MedfmError`` subclasses (``ConfigError`` naming the key,
``ShardError``, ``ReleaseError``, ``TrainingDiverged``, ``DistributedFailure``, ``Preempted``); the ``medfm``
command runs the same functions and turns those into its exit codes.
"""

import inspect
import types

from medfm import api
from medfm import pretrain as _pretrain_package
from medfm.api import (
    EvalResult,
    ExportResult,
    FinetuneResult,
    PretrainResult,
    ShardResult,
    evaluate,
    export,
    finetune,
    load_backbone,
    reduce,
    register_module,
    shard,
)
from medfm.data_shards.errors import ConfigError, MedfmError
from medfm.pretrain.errors import DistributedFailure, Preempted, ReleaseError, TrainingDiverged


class _CallablePackage(types.ModuleType):
    """``medfm.pretrain`` is both the pretraining package (``medfm.pretrain.config``, ...) and the API step
    ``medfm.pretrain(out, data, method, ...)``: one attribute cannot hold a function and a package, and whichever
    was bound last would win (importing a submodule rebinds it), so the package itself is callable. Python
    documents assigning a module's ``__class__`` to a ``types.ModuleType`` subclass (data model, "Customizing
    module attribute access")."""

    def __call__(self, *args, **kwargs):
        return api.pretrain(*args, **kwargs)


_pretrain_package.__class__ = _CallablePackage
_pretrain_package.__signature__ = inspect.signature(api.pretrain)
pretrain = _pretrain_package

__all__ = [
    "ConfigError",
    "DistributedFailure",
    "EvalResult",
    "ExportResult",
    "FinetuneResult",
    "MedfmError",
    "Preempted",
    "PretrainResult",
    "ReleaseError",
    "ShardError",
    "ShardResult",
    "TrainingDiverged",
    "evaluate",
    "export",
    "finetune",
    "load_backbone",
    "pretrain",
    "reduce",
    "register_module",
    "shard",
]


def __getattr__(name: str):  # ShardError's module imports webdataset (seconds): loaded when first named
    if name == "ShardError":
        from medfm.data_shards.writer import ShardError

        return ShardError
    raise AttributeError(f"module 'medfm' has no attribute {name!r}")
