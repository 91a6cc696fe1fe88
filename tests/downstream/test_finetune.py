"""Fine-tuning recipe: layer-wise lr decay groups, frozen blocks, a few real steps, best-on-val, multi-label BCE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from medfm.downstream.config import FinetuneConfig, load_config
from medfm.downstream.finetune import run_finetune
from medfm.downstream.finetune_run import freeze_blocks, freeze_norm_statistics, optimizer_groups
from medfm.downstream.load import load_backbone
from medfm.pretrain.backbones import build_backbone
from medfm.pretrain.errors import ConfigError


def test_layer_wise_lr_decay_scales_by_depth(tiny_release: Path):
    model = load_backbone(tiny_release, num_classes=2)  # 2 blocks: stem 0, blocks 1-2, head 3
    scales = {}
    for group in optimizer_groups(model, weight_decay=0.05, layer_decay=0.5):
        for param in group["params"]:
            scales[next(n for n, p in model.named_parameters() if p is param)] = (
                group["lr_scale"],
                group["weight_decay"],
            )
    assert scales["patch_embed.proj.weight"] == (0.5**3, 0.05)
    assert scales["pos_embed"][0] == 0.5**3
    assert scales["blocks.0.attn.qkv.weight"] == (0.5**2, 0.05)
    assert scales["blocks.1.mlp.fc1.weight"] == (0.5, 0.05)
    assert scales["blocks.1.mlp.fc1.bias"] == (0.5, 0.0)  # no decay on 1-D parameters
    assert scales["head.weight"] == (1.0, 0.05)


def test_freezing_the_first_blocks_and_stages():
    vit = build_backbone("vit_tiny_patch16_224", 28, 1, patch_size=7, depth=3)
    vit.reset_classifier(2)
    frozen = freeze_blocks(vit, 1)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= set(frozen)
    assert not any(n.startswith(("blocks.1.", "blocks.2.", "head.", "norm.")) for n in frozen)
    assert all(p.requires_grad == (n not in frozen) for n, p in vit.named_parameters())
    freeze_blocks(vit, -1)  # everything but the classifier
    assert {n for n, p in vit.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}

    resnet = build_backbone("resnet18", 32, 1)
    resnet.reset_classifier(2)
    frozen = freeze_blocks(resnet, 2)
    assert {n.split(".")[0] for n in frozen} == {"conv1", "bn1", "layer1", "layer2"}
    resnet.train()
    freeze_norm_statistics(resnet)
    assert not resnet.layer2[0].bn1.training and resnet.layer3[0].bn1.training
    before = resnet.layer1[0].bn1.running_mean.clone()
    resnet(torch.rand(4, 1, 32, 32))
    assert torch.equal(resnet.layer1[0].bn1.running_mean, before)  # frozen stage: statistics kept


def finetune(release: Path, spec: str, out_dir: Path, *overrides: str) -> dict:
    base = [f"out_dir={out_dir}", f"backbone.path={release}", f"data.spec={spec}", "train.batch_size=16"]
    return run_finetune(load_config(FinetuneConfig, None, [*base, *overrides]))


def test_a_few_steps_on_pneumoniamnist_with_llrd_keep_the_best_val_checkpoint(tiny_release, medmnist, tmp_path):
    out = tmp_path / "ft"
    steps = ("train.max_steps=6", "train.eval_every_epochs=0.001", "train.warmup_epochs=0.002", "train.freeze_blocks=1")
    results = finetune(
        tiny_release,
        f"medmnist:{medmnist('pneumoniamnist')}",
        out,
        *steps,
        "train.layer_decay=0.65",
        "train.label_smoothing=0.1",
        "train.class_weights=true",
        "robustness.corruptions=[gaussian_blur]",
    )
    result = results["release"]
    assert result["task"]["kind"] == "binary" and result["settings"]["total_steps"] == 6
    history = [json.loads(line) for line in (out / "release" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[0]["lr"] < history[1]["lr"] and history[-1]["lr"] == pytest.approx(1e-6)  # warm-up, cosine
    best = max(history, key=lambda h: (h["val_auc"], -h["step"]))
    assert result["settings"]["best_step"] == best["step"] and result["val"]["auc"] == pytest.approx(best["val_auc"])
    assert result["test"]["n"] == 624 and result["robustness"][0]["corruption"] == "gaussian_blur"
    assert all((out / "release" / f).is_file() for f in ("results.json", "results.md", "roc.png", "confusion.png"))
    # the best checkpoint is a plain timm classifier state dict
    config = json.loads((tiny_release / "config.json").read_text())
    model = timm.create_model(config["architecture"], num_classes=2, **config["model_args"])
    model.load_state_dict(load_file(str(out / "release" / "best.safetensors")))
    assert "| release | `medmnist:" in (out / "summary.md").read_text()


def test_frozen_blocks_do_not_move_and_random_init_uses_the_same_recipe(tiny_release, medmnist, tmp_path):
    spec = f"medmnist:{medmnist('breastmnist')}"
    results = finetune(
        tiny_release,
        spec,
        tmp_path / "ft",
        "train.max_steps=3",
        "train.freeze_blocks=1",
        "backbone.inits=[release,random]",
        "plots=false",
    )
    released = load_backbone(tiny_release)
    tuned = load_file(str(tmp_path / "ft" / "release" / "best.safetensors"))
    assert torch.equal(tuned["blocks.0.attn.qkv.weight"], released.state_dict()["blocks.0.attn.qkv.weight"])
    assert torch.equal(tuned["patch_embed.proj.weight"], released.state_dict()["patch_embed.proj.weight"])
    assert not torch.equal(tuned["blocks.1.attn.qkv.weight"], released.state_dict()["blocks.1.attn.qkv.weight"])
    assert results["release"]["settings"]["recipe"] == results["random"]["settings"]["recipe"]
    assert results["random"]["backbone"]["init"] == "random"


def test_multilabel_finetuning_uses_bce_and_per_label_auc(tiny_release, shapes_csv, tmp_path):
    csv = shapes_csv(tmp_path / "shapes")
    results = finetune(
        tiny_release,
        f"csv:{csv}",
        tmp_path / "ft",
        "train.epochs=2",
        "train.class_weights=true",
        "train.lr=1e-2",
        "train.layer_decay=1.0",
    )
    result = results["release"]
    assert result["task"] == {"kind": "multilabel", "class_names": ["square", "bar", "dot"]}
    assert [row["class"] for row in result["test"]["per_class"]] == ["square", "bar", "dot"]
    assert result["test"]["n"] == 25 and "exact_match" in result["test"]
    assert result["summary"]["auc"] > 0.6  # 10 steps on bright shapes
    assert not (tmp_path / "ft" / "release" / "confusion.png").exists()


def test_label_budgets_over_seeds(tiny_release, medmnist, tmp_path):
    results = finetune(
        tiny_release,
        f"medmnist:{medmnist('breastmnist')}",
        tmp_path / "ft",
        "train.max_steps=2",
        "efficiency.per_class=[5]",
        "efficiency.seeds=[0,1]",
        "plots=false",
    )
    (row,) = results["release"]["label_efficiency"]
    assert row["budget"] == "5/class" and row["n_train"] == 10 and len(row["runs"]) == 2
    assert row["test"]["auc"]["n"] == 2


def test_a_killed_finetune_resumes_where_it_was_checkpointed(tiny_release, medmnist, tmp_path, monkeypatch):
    from medfm.pretrain.checkpoint import TorchStore

    spec = f"medmnist:{medmnist('breastmnist')}"
    steps = ("train.max_steps=5", "train.eval_every_epochs=0.001", "train.drop_path=0.1", "plots=false")
    whole = finetune(tiny_release, spec, tmp_path / "whole", *steps)["release"]

    save = TorchStore.save

    def killed_after_step_3(self, step, meta):
        save(self, step, meta)
        if step == 3:
            raise KeyboardInterrupt  # what a kill leaves: the step-3 checkpoint, nothing after it

    monkeypatch.setattr(TorchStore, "save", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_release, spec, tmp_path / "killed", *steps)
    assert (tmp_path / "killed" / ".checkpoints" / "release" / "last.pt").is_file()
    monkeypatch.setattr(TorchStore, "save", save)
    resumed = finetune(tiny_release, spec, tmp_path / "killed", *steps)["release"]

    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    for got, want in zip(resumed["history"], whole["history"], strict=True):
        assert got == pytest.approx(want, nan_ok=True)
    assert resumed["settings"]["best_step"] == whole["settings"]["best_step"]
    tuned = [load_file(str(tmp_path / run / "release" / "best.safetensors")) for run in ("whole", "killed")]
    assert all(torch.equal(tuned[0][k], tuned[1][k]) for k in tuned[0])
    assert not (tmp_path / "killed" / ".checkpoints").exists()  # removed once every result is written


def test_finetuning_the_general_purpose_baseline_with_the_same_recipe(
    tiny_release, medmnist, general_snapshot, tmp_path
):
    results = finetune(
        tiny_release,
        f"medmnist:{medmnist('breastmnist')}",
        tmp_path / "ft",
        "train.max_steps=2",
        "backbone.inits=[release,baseline]",
        f"backbone.baseline={general_snapshot}",
        "plots=false",
    )
    assert results["baseline"]["backbone"]["architecture"] == "vit_tiny_patch16_224"
    assert results["baseline"]["backbone"]["input_size"] == results["release"]["backbone"]["input_size"]
    assert results["baseline"]["settings"]["recipe"] == results["release"]["settings"]["recipe"]
    assert "| baseline |" in (tmp_path / "ft" / "summary.md").read_text()


def test_head_from_the_linear_probe_predicts_what_the_probe_predicts(tiny_release, medmnist, tmp_path):
    """LP-FT: the classifier is the probe fitted on the frozen features, its standardisation folded into the layer,
    so that before any step the model's scores are the probe's; then a budgeted run trains from there."""
    from medfm.downstream.data import EvalTransform, infer_task, open_split, split_labels
    from medfm.downstream.features import dataset_features
    from medfm.downstream.finetune_run import init_head_from_probe
    from medfm.downstream.linear import select_linear_probe

    spec = f"medmnist:{medmnist('breastmnist')}"
    model = load_backbone(tiny_release, num_classes=2)
    cfg = model.pretrained_cfg
    transform = EvalTransform(cfg["input_size"][-1], cfg["mean"], cfg["std"])
    train, val = (open_split(spec, split, transform, channels=1) for split in ("train", "val"))
    task = infer_task(split_labels(train))
    init_head_from_probe(model, train, val, task, metric="auc", class_weights=True, batch_size=256)
    features = {name: dataset_features(model, split) for name, split in (("train", train), ("val", val))}
    probe = select_linear_probe(*(((f.features, f.labels)) for f in features.values()), task, class_weights=True).probe
    images = torch.stack([val[i]["image"] for i in range(32)])
    with torch.no_grad():
        scores = model.eval()(images).softmax(dim=1)
    assert torch.allclose(scores, probe.scores(features["val"].features[:32]), atol=1e-4)

    results = finetune(
        tiny_release,
        spec,
        tmp_path / "ft",
        "train.max_steps=2",
        "train.head_init=linear_probe",
        "efficiency.per_class=[5]",
        "efficiency.seeds=[0]",
        "plots=false",
        "backbone.inits=[release,random]",
    )
    assert results["release"]["label_efficiency"][0]["n_train"] == 10
    derived = {init: results[init]["settings"]["derived"] for init in ("release", "random")}
    assert derived == {"release": derived["release"], "random": {**derived["release"], "head_init": "new"}}
    assert derived["release"]["head_init"] == "linear_probe"  # random features are no probe to start from
    with pytest.raises(ConfigError, match=r"train\.head_init"):
        finetune(tiny_release, spec, tmp_path / "bad", "train.head_init=probe")


def test_the_fine_tuning_blur_sigma_is_given_at_224_px_and_scaled_to_the_input():
    from torchvision.transforms import v2

    from medfm.downstream.finetune_run import finetune_augment

    cfg = load_config(FinetuneConfig, None, ["backbone.path=x", "data.spec=x", "out_dir=x", "augment.blur_prob=1.0"])
    blurs = {
        size: [op for op in finetune_augment(cfg, size, [0.5], [0.5]).ops.transforms if isinstance(op, v2.RandomApply)]
        for size in (224, 28)
    }
    assert blurs[224][0].transforms[0].sigma == pytest.approx([0.1, 2.0])
    assert blurs[28][0].transforms[0].sigma == pytest.approx([0.0125, 0.25])
