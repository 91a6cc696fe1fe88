"""``optim.name: lars``: lightly's LARS with SimCLR's settings, built in ``build_optimizer``; biases and norms get
neither the trust ratio nor the decay; one engine step moves the weights as LARS says; the checkpoint resumes it."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from lightly.utils.lars import LARS

from medfm.pretrain.checkpoint import TorchStore
from medfm.pretrain.config import derive, load_config
from medfm.pretrain.engine import Optimization, build_optimizer, train_step
from medfm.pretrain.errors import ConfigError
from medfm.pretrain.methods import METHODS

LR, WEIGHT_DECAY = 0.5, 1e-3  # a decay large enough to show in the update


class GradientSnapshot:
    """Engine hooks: the parameters and their (clipped) gradients just before ``optimizer.step()``."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.before = model, {}

    def before_optimizer_step(self, step: int) -> None:
        self.before = {
            n: (p.detach().clone(), p.grad.clone()) for n, p in self.model.named_parameters() if p.grad is not None
        }

    def update_momentum(self, step: int) -> None:
        pass


def lars_config(tmp_path, pretrain_overrides, **extra):
    overrides = pretrain_overrides("simclr", "medmnist:x.npz", tmp_path, **{"optim.name": "lars", **extra})
    return derive(load_config(None, overrides), 1, 32)


def prepared(cfg):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    method = METHODS["simclr"].from_config(cfg)
    model, optimizer = accelerator.prepare(method, build_optimizer(method, cfg))
    return accelerator, model, optimizer


def step_on(opt: Optimization, views: list[torch.Tensor], step: int):
    return train_step(opt, step, [views], lambda batch: opt.model(batch, step), lr=LR, weight_decay=WEIGHT_DECAY)


def test_lars_has_simclrs_settings_and_no_decay_on_biases_and_norms(tmp_path, pretrain_overrides):
    cfg = lars_config(tmp_path, pretrain_overrides)
    method = METHODS["simclr"].from_config(cfg)
    optimizer = build_optimizer(method, cfg)
    assert isinstance(optimizer, LARS)
    assert {(g["momentum"], g["trust_coefficient"]) for g in optimizer.param_groups} == {(0.9, 0.001)}
    undecayed = [p for g in optimizer.param_groups if g["wd_scale"] == 0 for p in g["params"]]
    assert undecayed and all(p.ndim <= 1 for p in undecayed)  # biases, norm weights
    assert {id(p) for p in undecayed} == {id(p) for p in method.parameters() if p.ndim <= 1}


def test_an_engine_step_with_lars_adapts_and_decays_weights_but_not_biases_and_norms(tmp_path, pretrain_overrides):
    accelerator, model, optimizer = prepared(lars_config(tmp_path, pretrain_overrides))
    hooks = GradientSnapshot(model)
    opt = Optimization(accelerator, model, optimizer, hooks=hooks)
    outcome = step_on(opt, [torch.rand(8, 1, 28, 28) for _ in range(2)], 0)
    assert outcome.updated and len(hooks.before) > 10
    after = dict(model.named_parameters())
    for name, (param, grad) in hooks.before.items():
        if param.ndim <= 1:  # plain SGD: lr x gradient (the momentum buffer starts at the first update)
            expected = param - LR * grad
        else:  # lr x trust ratio x (gradient + decay x weight)
            p_norm, g_norm = param.norm(), grad.norm()
            trust = 0.001 * p_norm / (g_norm + WEIGHT_DECAY * p_norm + 1e-8)
            expected = param - LR * trust * (grad + WEIGHT_DECAY * param)
        torch.testing.assert_close(after[name].detach(), expected, msg=name)
        assert not torch.equal(after[name].detach(), param) or not grad.any(), name


def test_a_checkpoint_resumes_the_lars_momentum(tmp_path, pretrain_overrides):
    cfg = lars_config(tmp_path, pretrain_overrides)
    views = [[torch.rand(8, 1, 28, 28) for _ in range(2)] for _ in range(2)]
    accelerator, model, optimizer = prepared(cfg)
    opt = Optimization(accelerator, model, optimizer)
    step_on(opt, views[0], 0)
    store = TorchStore(accelerator, tmp_path, 1, model, optimizer)
    store.save(1, {"rng": [], "config": {}})

    resumed_accelerator, resumed_model, resumed_optimizer = prepared(cfg)  # fresh weights and empty momentum
    TorchStore(resumed_accelerator, tmp_path, 1, resumed_model, resumed_optimizer).load_latest()
    assert all("momentum_buffer" in state for state in resumed_optimizer.state_dict()["state"].values())
    step_on(opt, views[1], 1)
    step_on(Optimization(resumed_accelerator, resumed_model, resumed_optimizer), views[1], 1)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("key", ["optim.weight_decay", "optim.weight_decay_end"])
def test_lars_without_weight_decay_is_refused_naming_the_key(key, tmp_path, pretrain_overrides):
    cfg = lars_config(tmp_path, pretrain_overrides, **{key: 0.0})
    with pytest.raises(ConfigError, match=key):
        build_optimizer(METHODS["simclr"].from_config(cfg), cfg)
