"""The training optimizer: torch's Adam, with column-major weights stepped through their transposes."""

from __future__ import annotations

import copy

import torch

from scvi_cli.models import VAE
from scvi_cli.nn.sparse_input import is_column_major
from scvi_cli.training.loop import Adam, TrainSettings, make_optimizer

SETTINGS = TrainSettings(max_epochs=1, lr=1e-2, eps=0.01, weight_decay=1e-3)


def _model_and_gradients(seed: int = 0, steps: int = 4):
    torch.manual_seed(seed)
    model = VAE(40, n_latent=3, n_hidden=16)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(steps)]
    return model, grads


def _run(model, optimizer, grads):
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        optimizer.step()


def test_steps_equal_plain_adam_and_state_keeps_the_parameter_layout(monkeypatch):
    model, grads = _model_and_gradients()
    torch_steps = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: torch_steps.append(1) or original(self, closure))
    weight = model.z_encoder.encoder.fc_layers[0][0].weight
    assert is_column_major(weight) and not weight.is_contiguous()
    plain = copy.deepcopy(model)
    optimizer = make_optimizer(model, SETTINGS)
    assert isinstance(optimizer, Adam) and optimizer.defaults["fused"]
    reference = torch.optim.Adam(plain.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3, foreach=False, fused=False)
    _run(model, optimizer, grads)
    assert not torch_steps  # the fused kernel is called directly from the first step on
    _run(plain, reference, grads)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        state, want = optimizer.state[p], reference.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == p.shape
            torch.testing.assert_close(state[key], want[key], rtol=1e-6, atol=1e-9)
    assert is_column_major(weight) and weight.grad.shape == weight.shape


def test_state_dict_round_trip_continues_the_same_run():
    model, grads = _model_and_gradients(seed=1, steps=6)
    twin = copy.deepcopy(model)
    optimizer = make_optimizer(model, SETTINGS)
    _run(model, optimizer, grads)

    first = make_optimizer(twin, SETTINGS)
    _run(twin, first, grads[:3])
    resumed = make_optimizer(twin, SETTINGS)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    _run(twin, resumed, grads[3:])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_reused_step_plan_follows_changes_between_steps():
    """The direct step reuses its parameter lists while nothing they depend on changes: a
    parameter losing or regaining its gradient, its data replaced, its gradient made
    contiguous, or a loaded state dict (its moments row-major) each give a new plan, with plain
    Adam's values."""
    model, grads = _model_and_gradients(seed=3, steps=10)
    plain = copy.deepcopy(model)
    optimizer = make_optimizer(model, SETTINGS)
    reference = torch.optim.Adam(plain.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3, foreach=False, fused=False)
    params, plain_params = list(model.parameters()), list(plain.parameters())
    weight_index = next(i for i, p in enumerate(params) if is_column_major(p) and not p.is_contiguous())

    def step(k, skip=(), contiguous_grad=False):
        for i, (p, q, g) in enumerate(zip(params, plain_params, grads[k])):
            p.grad = q.grad = None if i in skip else g.clone()
            if contiguous_grad and i == weight_index:
                p.grad = p.grad.contiguous()
        optimizer.step()
        reference.step()

    step(0)
    step(1)
    plans = [optimizer._plan]
    step(2)
    assert optimizer._plan is plans[-1]  # nothing changed: the same plan
    step(3, skip=(0, weight_index))  # two parameters without a gradient this step
    step(4)
    plans.append(optimizer._plan)
    step(5, contiguous_grad=True)
    with torch.no_grad():  # new storage for one parameter's data, same values
        params[1].data = params[1].data.clone()
        plain_params[1].data = plain_params[1].data.clone()
    step(6)
    plans.append(optimizer._plan)
    saved = copy.deepcopy(optimizer.state_dict())
    for state in saved["state"].values():  # moments saved in row-major layout (another writer's)
        state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].contiguous(), state["exp_avg_sq"].contiguous()
    optimizer.load_state_dict(saved)
    assert optimizer._plan is None
    step(7)
    step(8)
    plans.append(optimizer._plan)
    assert len({id(plan) for plan in plans}) == len(plans)
    for (name, p), q in zip(model.named_parameters(), plain_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[p][key], reference.state[q][key], rtol=1e-6, atol=1e-9, msg=name)
    assert is_column_major(params[weight_index])


HOOKS_ONCE_PER_STEP = """
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from scvi_cli.models import VAE
from scvi_cli.training.loop import TrainSettings, make_optimizer
torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # torch then wraps its own Adam.step too
model = VAE(40, n_latent=3, n_hidden=16)
optimizer = make_optimizer(model, TrainSettings(max_epochs=1))
seen = []
optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append("post"))
register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
for _ in range(3):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
print(" ".join(seen))
"""


def test_step_hooks_run_once_per_step():
    """Step hooks (the optimizer's and the global ones) run once per step, direct or through
    torch's step. In a fresh interpreter, so that torch's own Adam.step is wrapped for hooks as
    in any process that made a torch Adam."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", HOOKS_ONCE_PER_STEP], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pre", "post"] * 3


def test_falls_back_to_torchs_step_where_the_fused_kernel_does_not_apply():
    model, grads = _model_and_gradients(seed=2, steps=3)
    plain = copy.deepcopy(model)
    optimizer = Adam(model.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3, fused=True, amsgrad=True)
    reference = torch.optim.Adam(plain.parameters(), lr=1e-2, eps=0.01, weight_decay=1e-3, amsgrad=True, fused=False)
    _run(model, optimizer, grads)
    _run(plain, reference, grads)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


NO_DYNAMO = """
import sys
import numpy as np
import torch
from scvi_cli.data.minibatch import Minibatch
from scvi_cli.models import VAE
from scvi_cli.training.loop import TrainSettings, fit
torch.manual_seed(0)
model = VAE(30, n_latent=3, n_hidden=8, use_observed_lib_size=True)
counts = torch.poisson(torch.full((16, 30), 2.0))
batches = [Minibatch(x=counts[:8]), Minibatch(x=counts[8:])]
class Source(list):
    def set_epoch(self, epoch):
        pass
state = fit(model, Source(batches), settings=TrainSettings(max_epochs=2))
state = fit(model, Source(batches), settings=TrainSettings(max_epochs=3), state=state)
print(state.epoch, "torch._dynamo" in sys.modules)
"""


def test_training_does_not_import_torch_dynamo():
    """torch.optim's guards import torch._dynamo on first use (0.8-1.9 s of start-up); training,
    saving and reloading the optimizer's state go without it. In a fresh interpreter."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", NO_DYNAMO], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "False"]
