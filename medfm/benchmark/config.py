"""The schema of ``medfm bench quality`` (``bench/quality.yaml``): the pool, the recipes, the labeled tasks, the
frozen and fine-tuning stages, the target; ``load_quality_config`` checks it, naming the key. ``Step``: one
``medfm`` command line of the plan made from it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig

from medfm.pretrain.config import OUTPUT_PATH, Need, config_need, load_structured


@dataclass
class PoolConfig:
    """The unlabeled pretraining pool: ``medfm shard SOURCES --splits SPLITS`` (val / test images stay out)."""

    sources: list[str] = MISSING  # medfm shard SOURCEs: folders, files, medmnist:, imagefolder:, csv:
    splits: list[str] = field(default_factory=lambda: ["train"])  # kept splits of sources that define splits
    max_side: int | None = 64  # stored size; the recipes' data.img_size decides the training size
    dedup: str = "exact"  # none | exact | near


@dataclass
class PoolReduction:
    """Pretrain on a reduced pool (``medfm shard reduce``), for the same number of steps as on the whole pool."""

    model: str = MISSING  # the recipe whose release embeds the pool (it runs first), or any --model source
    keep: float = 0.5  # fraction of the pool kept
    method: str = "kcenter"  # kcenter | random (the same-size comparison)


@dataclass
class RecipeConfig:
    name: str = MISSING  # folder name under OUT/pretrain/
    config: str = MISSING  # a pretraining YAML (configs/pretrain/...)
    overrides: list[str] = field(default_factory=list)  # key=value on top (schedule, image size, ...)
    # An ablation: the name of the recipe this one varies (e.g. that recipe before a change, by overrides). It is
    # pretrained and probed like the others, then compared with it row by row under "Ablation" (same tasks, label
    # subsets and seeds); it is not fine-tuned nor counted for the target.
    ablation_of: str | None = None
    # pretrain on OUT/pool_reduced/<name> instead of the whole pool, with data.samples_per_epoch = the whole pool's
    # size (the same steps as a recipe on the whole pool)
    reduce: PoolReduction | None = None


@dataclass
class Reference:
    """A published number to compare with: test ACC / AUC and the protocol it was measured under."""

    acc: float | None = None
    auc: float | None = None
    protocol: str = ""


@dataclass
class TaskConfig:
    name: str = MISSING
    spec: str = MISSING  # a labeled dataset spec (medmnist:, imagefolder:, csv:, shards:)
    overrides: list[str] = field(default_factory=list)  # extra eval / finetune keys, e.g. backbone.img_size=64
    finetune: bool = True  # include in the fine-tuning stage
    published: dict[str, Reference] = field(default_factory=dict)


@dataclass
class FrozenStage:
    """``medfm eval``: kNN + linear probe on frozen features, release vs random init."""

    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # of the training labels
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # label subsets per fraction
    overrides: list[str] = field(default_factory=list)  # medfm eval keys, e.g. features.pooling=layers


@dataclass
class FinetuneStage:
    """``medfm finetune`` of every release and of the random init with the same recipe."""

    enabled: bool = True
    # recipe names to fine-tune (ablations included when named); empty: every recipe that is not an ablation
    recipes: list[str] = field(default_factory=list)
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    config: str | None = None  # a finetune YAML (configs/downstream/...); None: the schema's defaults
    overrides: list[str] = field(default_factory=list)  # medfm finetune keys, e.g. train.max_steps=150


@dataclass
class Target:
    """What the benchmark is trying to show; checked and stated in results.md."""

    reference: str = ""  # a key of the tasks' ``published`` to beat with a frozen linear probe (ACC and AUC)
    tasks: list[str] = field(default_factory=list)  # task names the check applies to
    finetune_fraction: float = 0.1  # fine-tuning a release on this fraction should match random init on 100 %


@dataclass
class QualityConfig:
    # everything the benchmark writes; steps/ records the finished steps
    out_dir: str = field(default="runs/bench_quality", metadata=OUTPUT_PATH)
    budget_minutes: float = 60.0  # what the YAML is sized for; the report states the measured wall time against it
    workers: int = 2  # shard reader processes
    pool: PoolConfig = field(default_factory=PoolConfig)
    recipes: list[RecipeConfig] = field(default_factory=list)  # one pretraining run each, on the pool
    tasks: list[TaskConfig] = field(default_factory=list)  # labeled tasks every release is evaluated on
    frozen: FrozenStage = field(default_factory=FrozenStage)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    target: Target = field(default_factory=Target)

    @staticmethod
    def check_config(cfg: DictConfig, need: Need) -> None:
        need(len(cfg.pool.sources) > 0, "pool.sources", "needs at least one SOURCE")
        need(len(cfg.recipes) > 0, "recipes", "needs at least one recipe")
        need(len(cfg.tasks) > 0, "tasks", "needs at least one labeled task")
        for key, items in (("recipes", cfg.recipes), ("tasks", cfg.tasks)):
            names = [item.name for item in items]
            need(len(set(names)) == len(names), key, f"names must be distinct, got {names}")
            need(all(n and "/" not in n for n in names), key, "names must be non-empty folder names")
        for i, recipe in enumerate(cfg.recipes):
            need(Path(recipe.config).is_file(), f"recipes[{i}].config", f"{recipe.config} does not exist")
        need(set(cfg.frozen.protocols) <= {"knn", "linear"}, "frozen.protocols", "must be a subset of [knn, linear]")
        need(all(0 < f <= 1 for f in cfg.frozen.fractions), "frozen.fractions", "must be in (0, 1]")
        need(all(0 < f <= 1 for f in cfg.finetune.fractions), "finetune.fractions", "must be in (0, 1]")
        names = {task.name for task in cfg.tasks}
        need(set(cfg.target.tasks) <= names, "target.tasks", f"must name tasks of {sorted(names)}")
        recipes = {recipe.name for recipe in cfg.recipes}
        need(set(cfg.finetune.recipes) <= recipes, "finetune.recipes", f"must name recipes of {sorted(recipes)}")
        for i, recipe in enumerate(cfg.recipes):
            if recipe.reduce is not None:
                need(0 < recipe.reduce.keep < 1, f"recipes[{i}].reduce.keep", "must be in (0, 1)")
                need(
                    recipe.reduce.method in ("kcenter", "random"),
                    f"recipes[{i}].reduce.method",
                    "must be kcenter or random",
                )
                earlier = [r.name for r in cfg.recipes[:i]]
                need(
                    recipe.reduce.model in earlier or Path(recipe.reduce.model).exists(),
                    f"recipes[{i}].reduce.model",
                    f"must name an earlier recipe of {earlier} or an existing model",
                )
            if recipe.ablation_of is not None:
                others = sorted(recipes - {recipe.name})
                need(recipe.ablation_of in others, f"recipes[{i}].ablation_of", f"must name another recipe of {others}")


def load_quality_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    cfg = load_structured(QualityConfig, path, list(overrides))
    QualityConfig.check_config(cfg, config_need(cfg))
    return cfg


@dataclass(frozen=True)
class Step:
    stage: str  # shard, inspect, pretrain, eval, finetune
    label: str  # what the progress line says
    argv: tuple[str, ...]

    @property
    def key(self) -> str:
        return hashlib.blake2b("\0".join(self.argv).encode(), digest_size=8).hexdigest()
