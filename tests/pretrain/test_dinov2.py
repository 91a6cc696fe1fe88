"""DINOv2: each loss term against a naive reference on the same tensors, the block masks, the student-only
layer-wise lr decay, and the released teacher ViT."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from medfm.pretrain.backbones import build_backbone
from medfm.pretrain.methods import DINOv2
from medfm.pretrain.methods.dinov2 import BlockMasks, WithBlockMasks, mask_indices


def tiny_dinov2(name: str = "vit_tiny_patch16_224", **kwargs) -> DINOv2:
    extra = {"patch_size": 7} if name.startswith("vit_tiny") else {}
    vit = build_backbone(name, img_size=28, in_chans=1, depth=2, dynamic_img_size=True, **extra, **kwargs)
    return DINOv2(vit, [0.99] * 10, [0.04] * 10, 0, 64, 32, 128, loss_weights=(1.0, 0.7, 0.2))


def naive_dino(teacher: list[torch.Tensor], student: list[torch.Tensor], t_temp: float, s_temp: float) -> torch.Tensor:
    """DINO's cross-entropy over every (teacher global view, student view) pair of different crops."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        target = F.softmax(t / t_temp, dim=-1)
        for v, s in enumerate(student):
            if v != i:
                total = total + (-(target * F.log_softmax(s / s_temp, dim=-1)).sum(-1)).mean()
                pairs += 1
    return total / pairs


def naive_ibot(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, t_temp: float, s_temp: float):
    """iBOT: per masked token cross-entropy, averaged within each image, then over the images of the batch."""
    per_token = -(F.softmax(teacher / t_temp, -1) * F.log_softmax(student / s_temp, -1)).sum(-1)
    image_of = torch.arange(mask.shape[0]).view(-1, 1, 1).expand_as(mask)[mask]
    per_image = [per_token[image_of == b].mean() for b in range(mask.shape[0]) if (image_of == b).any()]
    return torch.stack(per_image).sum() / mask.shape[0]


def naive_koleo(x: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko: -mean log distance of each normalised vector to its nearest neighbour."""
    x = F.normalize(x, dim=-1)
    distances = torch.cdist(x, x) + torch.eye(len(x)) * 1e9
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


def test_each_loss_term_equals_its_reference_on_the_same_tensors():
    torch.manual_seed(0)
    model = tiny_dinov2()
    batch, views, k = 4, 4, 128
    teacher_cls, student_cls = torch.randn(2 * batch, k), torch.randn(views * batch, k)
    mask = torch.zeros(2 * batch, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = mask[3, 1:, 3] = mask[5, 0, :] = True
    teacher_patches, student_patches = torch.randn(int(mask.sum()), k), torch.randn(int(mask.sum()), k)
    cls_tokens = torch.randn(2 * batch, 192)
    terms = model.loss_terms(
        teacher_cls, student_cls, teacher_patches, student_patches, mask, cls_tokens, num_views=views, teacher_temp=0.05
    )
    dino = naive_dino(list(teacher_cls.chunk(2)), list(student_cls.chunk(views)), 0.05, 0.1)
    ibot = naive_ibot(teacher_patches, student_patches, mask, 0.05, 0.1)
    koleo = sum(naive_koleo(c) for c in cls_tokens.chunk(2))
    assert terms["dino_loss"] == pytest.approx(float(dino), rel=1e-5)
    assert terms["ibot_loss"] == pytest.approx(float(ibot), rel=1e-5)
    assert terms["koleo_loss"] == pytest.approx(float(koleo), rel=1e-5)
    assert terms["loss"] == pytest.approx(float(dino + 0.7 * ibot + 0.2 * koleo), rel=1e-5)


def test_block_masks_are_a_function_of_the_sample_seed_and_cover_the_configured_share():
    draw = BlockMasks((4, 4), 2, probability=0.5, ratio=(0.1, 0.5))
    torch.manual_seed(3)
    first = draw()
    random.seed(123)  # python's generator is not what decides: the sample's torch stream is
    torch.manual_seed(3)
    assert torch.equal(first, draw()) and first.shape == (2, 4, 4) and first.dtype == torch.bool
    state = random.getstate()
    masks = torch.cat([draw() for _ in range(400)])
    assert random.getstate() == state  # python's generator left as it was
    masked = masks.flatten(1).any(1)
    assert 0.4 < float(masked.float().mean()) < 0.6  # mask_sample_probability
    ratios = masks.flatten(1).float().mean(1)[masked]
    assert float(ratios.min()) >= 1 / 16 and float(ratios.max()) <= 0.5 + 1 / 16


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_the_masks_of_the_views_reach_the_student_and_never_the_prefix_tokens(name):
    model = tiny_dinov2(name)
    grid = 4 if name.startswith("vit_tiny") else 2
    masks = torch.zeros(4, 2, grid, grid, dtype=torch.bool)
    masks[1, 0, 0, :] = masks[2, 1, :, 1] = True
    seen = {}
    original = model.student_backbone.encode

    def spy(images, mask=None, **kwargs):
        if mask is not None:
            seen["mask"] = mask
        return original(images, mask=mask, **kwargs)

    model.student_backbone.encode = spy
    out = model([torch.randn(4, 1, 28, 28)] * 2 + [torch.randn(4, 1, 14, 14), masks], step=0)
    prefix = model.student_backbone.vit.num_prefix_tokens
    assert prefix == (1 if name.startswith("vit_tiny") else 5)  # class token (+ 4 registers)
    assert not seen["mask"][:, :prefix].any()
    # (B, 2, h, w) -> the order of the concatenated global views: view 1 of every sample, then view 2
    assert torch.equal(seen["mask"][:, prefix:], torch.cat([masks[:, 0], masks[:, 1]]).flatten(1))
    assert out["embeddings"].shape == (4, model.student_backbone.vit.embed_dim)
    assert math.isfinite(float(out["loss"].detach()))


def test_the_transform_returns_the_views_then_the_masks(tmp_path):
    from medfm.pretrain.config import derive, load_config

    cfg = load_config(None, ["method=dinov2", "data.spec=medmnist:x.npz", "data.img_size=28", f"train.run_dir={tmp_path}",
                             "model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs.patch_size=7",
                             "dinov2.local_crop_size=14", "dinov2.num_local_crops=3"])  # fmt: skip
    views = DINOv2.build_transform(derive(cfg, 1, 1000))(torch.rand(1, 28, 28))
    assert [tuple(v.shape) for v in views] == [(1, 28, 28)] * 2 + [(1, 14, 14)] * 3 + [(2, 4, 4)]
    assert views[-1].dtype == torch.bool


def test_layer_wise_lr_decay_on_the_student_only_and_every_parameter_once():
    model = tiny_dinov2()
    groups = model.param_groups()
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(map(id, grouped))) == len(trainable)
    assert not any(p is q for p in grouped for q in model.teacher_backbone.parameters())
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    vit = model.student_backbone.vit
    # depth 2, decay 0.9, DINOv2's rule: patch embedding 0.2 x 0.9^3, mask token 0.9^3, block 0 0.9^2, the last
    # block 0.9, the final norm 1, heads 1
    assert scale_of[id(vit.patch_embed.proj.weight)] == pytest.approx(0.2 * 0.9**3)
    assert scale_of[id(model.student_backbone.mask_token)] == pytest.approx(0.9**3)
    assert scale_of[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(0.9**2)
    assert scale_of[id(vit.blocks[1].mlp.fc1.weight)] == pytest.approx(0.9)
    assert scale_of[id(vit.norm.weight)] == 1.0
    assert scale_of[id(model.student_head["dino_head"].last_layer.weight_v)] == 1.0
    wd_of = {id(p): g["wd_scale"] for g in groups for p in g["params"]}
    assert wd_of[id(vit.blocks[0].attn.qkv.bias)] == 0.0 and wd_of[id(vit.blocks[0].attn.qkv.weight)] == 1.0


def test_the_released_backbone_is_the_teacher_vit_and_follows_the_ema():
    model = tiny_dinov2(drop_path_rate=0.3)
    assert model.export_backbone() is model.teacher_backbone.vit
    assert model.student_backbone.vit.blocks[-1].drop_path1.drop_prob > 0.0
    assert model.teacher_backbone.vit.blocks[-1].drop_path1.drop_prob == 0.0  # no drop path on the teacher
    with torch.no_grad():
        for p in model.student_backbone.parameters():
            p.add_(1.0)
    before = model.teacher_backbone.vit.pos_embed.clone()
    model.update_momentum(0)  # m = 0.99
    assert torch.allclose(model.teacher_backbone.vit.pos_embed, before + 0.01, atol=1e-6)


def test_a_batch_without_any_masked_crop_gives_no_ibot_term_and_keeps_the_centre():
    model = tiny_dinov2()
    centre = model.ibot_loss.center.value.clone()
    masks = torch.zeros(4, 2, 4, 4, dtype=torch.bool)
    out = model([torch.randn(4, 1, 28, 28)] * 2 + [masks], step=0)
    assert float(out["ibot_loss"]) == 0.0 and math.isfinite(float(out["loss"].detach()))
    assert torch.equal(model.ibot_loss.center.value, centre)
    out["loss"].backward()  # still one graph


def boolean_mask_loss(model: DINOv2, views: list[torch.Tensor], masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """DINOv2's loss as it was computed before the host-sync removal: masked tokens picked by boolean-mask
    indexing, lightly's ``IBOTPatchLoss`` given the mask (step 0, teacher temperature 0.04)."""
    vit, head = model.student_backbone.vit, "dino_head"
    global_views = torch.cat(views[:2])
    block_mask = masks.transpose(0, 1).flatten(0, 1)
    token_mask = torch.zeros(len(block_mask), vit.num_prefix_tokens + block_mask[0].numel(), dtype=torch.bool)
    token_mask[:, vit.num_prefix_tokens :] = block_mask.flatten(1)
    with torch.no_grad():
        teacher_tokens = model.teacher_backbone.encode(global_views)
        teacher_cls = model.teacher_head[head](teacher_tokens[:, 0])
        teacher_patches = model.teacher_head[head](teacher_tokens[token_mask])
    student_tokens = model.student_backbone.encode(global_views, mask=token_mask)
    local_tokens = model.student_backbone.encode(torch.cat(views[2:]))
    student_cls = model.student_head[head](torch.cat([student_tokens[:, 0], local_tokens[:, 0]]))
    student_patches = model.student_head[head](student_tokens[token_mask])
    dino = model.dino_loss(list(teacher_cls.chunk(2)), list(student_cls.chunk(len(views))), teacher_temp=0.04)
    ibot = model.ibot_loss(teacher_patches, student_patches, mask=block_mask, teacher_temp=0.04)
    koleo = sum(model.koleo_loss(tokens) for tokens in student_tokens[:, 0].chunk(2))
    return {"loss": dino + 0.7 * ibot + 0.2 * koleo, "dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo}


def test_indexing_with_the_collates_indices_gives_the_boolean_mask_loss_and_gradients():
    torch.manual_seed(0)
    new, old = tiny_dinov2(), tiny_dinov2()
    old.load_state_dict(new.state_dict())
    views = [torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.randn(4, 1, 14, 14)]
    masks = torch.rand(4, 2, 4, 4) < 0.4
    masks[1, 0] = False  # a crop without masked patches: weighted as lightly weights it (clamp to 1)
    samples = [{"views": [v[i] for v in views] + [masks[i]], "label": 0, "key": str(i)} for i in range(4)]
    batch = WithBlockMasks.collate(samples)
    assert torch.equal(batch["views"][-1], mask_indices(masks)) and len(batch["views"][-1]) == int(masks.sum())
    out = new(batch["views"], step=0)
    reference = boolean_mask_loss(old, views, masks)
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        assert float(out[key].detach()) == pytest.approx(float(reference[key].detach()), rel=1e-6, abs=1e-7), key
    out["loss"].backward()
    reference["loss"].backward()
    for (name, p), q in zip(new.named_parameters(), old.parameters(), strict=True):
        if p.grad is not None or q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    assert torch.allclose(new.ibot_loss.center.value, old.ibot_loss.center.value, atol=1e-7)


def test_ibot_patch_loss_with_given_weights_is_lightlys():
    from lightly.loss import IBOTPatchLoss

    from medfm.pretrain.methods.dinov2 import ibot_patch_loss, mask_weights

    torch.manual_seed(1)
    mask = torch.rand(6, 3, 3) < 0.3
    mask[2] = False
    teacher, student = torch.randn(int(mask.sum()), 32), torch.randn(int(mask.sum()), 32)
    theirs, ours = IBOTPatchLoss(output_dim=32), IBOTPatchLoss(output_dim=32)
    for loss in (theirs, ours):
        loss.center.center.normal_(generator=torch.Generator().manual_seed(2))
    expected = theirs(teacher, student, mask=mask, teacher_temp=0.05)
    weights = mask_weights(mask, mask.flatten().nonzero().flatten())
    assert float(ibot_patch_loss(ours, teacher, student, weights, len(mask), 0.05)) == pytest.approx(
        float(expected), rel=1e-6
    )
    assert torch.equal(ours.center.value, theirs.center.value)


def clustered(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Embeddings around one direction (cosine ~0.99 between any two), as chest X-rays give."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, d, generator=generator) * 10 + torch.randn(n, d, generator=generator)


def test_koleo_and_the_centres_are_fp32_under_a_bf16_autocast():
    """DINOv2 turns autocast off for KoLeo and computes the centres in fp32: under the step's bf16 autocast, the
    terms and the centre buffers equal the fp32 ones (before: KoLeo's nearest neighbours came from a bf16 matmul)."""
    torch.manual_seed(0)
    batch, views, k = 8, 4, 128
    teacher_cls, student_cls = clustered(2 * batch, k, 1), torch.randn(views * batch, k)
    mask = torch.zeros(2 * batch, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = mask[3, 1:, 3] = True
    teacher_patches, student_patches = clustered(int(mask.sum()), k, 2), torch.randn(int(mask.sum()), k)
    cls_tokens = clustered(2 * batch, 192, 3)
    args = (teacher_cls, student_cls, teacher_patches, student_patches, mask, cls_tokens)
    reference, model = tiny_dinov2(), tiny_dinov2()
    model.load_state_dict(reference.state_dict())
    expected = reference.loss_terms(*args, num_views=views, teacher_temp=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model.loss_terms(*args, num_views=views, teacher_temp=0.05)
    koleo = sum(naive_koleo(c) for c in cls_tokens.chunk(2))
    assert terms["koleo_loss"] == pytest.approx(float(koleo), rel=1e-5)
    for name in ("dino_loss", "ibot_loss", "koleo_loss", "loss"):
        assert terms[name].dtype == torch.float32 and terms[name] == pytest.approx(float(expected[name]), rel=1e-6)
    for centre, fp32_centre in (
        (model.dino_loss.center, reference.dino_loss.center),
        (model.ibot_loss.center.value, reference.ibot_loss.center.value),
    ):
        assert centre.dtype == torch.float32 and torch.equal(centre, fp32_centre)


def test_the_dino_centre_is_averaged_in_fp32_under_a_bf16_autocast(monkeypatch):
    """The teacher outputs reach DINO's loss and centre in fp32 (before: the head's bf16 outputs, averaged in bf16)."""
    from medfm.pretrain.methods import DINO

    vit = build_backbone("vit_tiny_patch16_224", img_size=28, in_chans=1, depth=2, patch_size=7)
    model = DINO(vit, [0.99] * 10, [0.04] * 10, 0, 64, 32, 128)
    seen, update = [], model.criterion.update_center
    monkeypatch.setattr(model.criterion, "update_center", lambda x: (seen.append(x.dtype), update(x)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.randn(4, 1, 28, 28) for _ in range(2)], step=0)
    assert seen == [torch.float32] and model.criterion.center.dtype == torch.float32
    assert out["loss"].dtype == torch.float32


def reference_lr_decay_rate(name: str, lr_decay_rate: float, num_layers: int) -> float:
    """dinov2 ``utils/param_groups.py`` ``get_vit_lr_decay_rate`` as written there, for the backbone
    (``force_is_backbone=True``, ``chunked_blocks=False``)."""
    layer_id = num_layers + 1
    # its first two branches (".pos_embed" ..., then "pos_embed" ... when force_is_backbone) in one
    if "pos_embed" in name or "patch_embed" in name or "mask_token" in name or "cls_token" in name:
        layer_id = 0
    elif ".blocks." in name and ".residual." not in name:
        layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
    elif "blocks." in name and "residual." not in name:
        layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_the_students_lr_and_weight_decay_multipliers_are_dinov2s(name):
    """Every student ViT parameter: lr multiplier = the reference's ``get_vit_lr_decay_rate`` (x 0.2 for the patch
    embedding, ``patch_embed_lr_mult``); the last block decay^1, block i decay^(depth - i), the patch embedding
    0.2 x decay^(depth + 1); no weight decay on norms, biases and LayerScale."""
    depth, decay = 3, 0.8
    extra = {"patch_size": 7} if name.startswith("vit_tiny") else {"patch_size": 7, "img_size": 28}
    vit = build_backbone(name, **{"img_size": 28, "in_chans": 1, "depth": depth, "dynamic_img_size": True, **extra})
    model = DINOv2(vit, [0.99] * 10, [0.04] * 10, 0, 64, 32, 128, layer_decay=decay)
    groups = model.param_groups()
    lr_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["wd_scale"] for g in groups for p in g["params"]}
    for param_name, param in model.student_backbone.named_parameters():
        # the reference names the backbone's parameters from the backbone: "blocks.0.attn.qkv.weight"
        reference = reference_lr_decay_rate(param_name.removeprefix("vit."), decay, depth)
        if "patch_embed" in param_name:
            reference *= 0.2
        assert lr_of[id(param)] == pytest.approx(reference, rel=1e-12), param_name
        if param.ndim <= 1:  # biases, norms, LayerScale gammas: the reference's names "bias" / "norm" / "gamma"
            assert wd_of[id(param)] == 0.0, param_name
    for i, block in enumerate(vit.blocks):
        assert lr_of[id(block.attn.qkv.weight)] == pytest.approx(decay ** (depth - i))
        assert wd_of[id(block.attn.qkv.weight)] == 1.0 and wd_of[id(block.norm1.weight)] == 0.0
    assert lr_of[id(vit.blocks[-1].mlp.fc2.weight)] == pytest.approx(decay)
    assert lr_of[id(vit.patch_embed.proj.weight)] == pytest.approx(0.2 * decay ** (depth + 1))
    if name.endswith("dinov2"):  # LayerScale and register tokens (full lr, as the reference's name rules give)
        assert wd_of[id(vit.blocks[0].ls1.gamma)] == 0.0
        assert lr_of[id(vit.reg_token)] == 1.0
    head = [p for p in model.student_head.parameters() if p.requires_grad]
    assert all(lr_of[id(p)] == 1.0 and wd_of[id(p)] == (0.0 if p.ndim <= 1 else 1.0) for p in head)


def test_patch_embed_lr_mult_and_centering_come_from_the_config():
    from medfm.pretrain.config import derive, load_config
    from medfm.pretrain.methods.dino import Centering, SinkhornKnoppDINOLoss

    cfg = load_config(None, ["method=dinov2", "data.spec=medmnist:x.npz", "data.img_size=28", "model.backbone=vit_tiny_patch16_224",
                             "model.backbone_kwargs={patch_size: 7, depth: 2}", "dinov2.num_local_crops=0",
                             "dinov2.patch_embed_lr_mult=0.5", "dinov2.centering=sinkhorn_knopp", "train.run_dir=run"])  # fmt: skip
    model = DINOv2.from_config(derive(cfg, world_size=1, dataset_size=1000))
    assert model.centering is Centering.sinkhorn_knopp and isinstance(model.dino_loss, SinkhornKnoppDINOLoss)
    lr_of = {id(p): g["lr_scale"] for g in model.param_groups() for p in g["params"]}
    assert lr_of[id(model.student_backbone.vit.patch_embed.proj.weight)] == pytest.approx(0.5 * 0.9**3)
