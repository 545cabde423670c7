"""The training loop: one visible function from minibatches to fitted weights and history.

Nothing here reads files or holds global state: the model, the minibatch sources, the settings and
(when resuming) a ``TrainingState`` go in; the updated ``TrainingState`` comes out. That keeps the
step usable from the CLI, from Python, and later from one process per GPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from scvi_cli.data.minibatch import Minibatch, MinibatchSource
from scvi_cli.nn.likelihoods import compiled_likelihood
from scvi_cli.nn.sparse_input import is_column_major
from scvi_cli.training import distributed
from scvi_cli.models.outputs import LossOutput

METRICS = ("reconstruction_loss", "kl_local", "elbo")


@dataclass(frozen=True)
class TrainSettings:
    """Resolved optimisation settings (the spec's ``train`` section with defaults filled in)."""

    max_epochs: int
    lr: float = 1e-3
    eps: float = 0.01
    weight_decay: float = 1e-6
    kl_warmup_epochs: int = 400
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    validation_every_n_epochs: int | None = 1  # and at the last epoch; None: never
    compile: bool = False  # the fused likelihood through its native kernel (nn/native.py)
    precision: str = "32"  # "32", "tf32" (CUDA matmuls in TF32) or "bf16-mixed" (bf16 autocast)


@dataclass
class TrainingState:
    """Everything needed to continue a run exactly where it stopped."""

    epoch: int = 0  # the next epoch to run
    history: dict[str, list[float]] = field(default_factory=dict)
    optimizer_state: dict | None = None
    best_elbo: float = math.inf
    best_epoch: int = -1
    best_state_dict: dict[str, torch.Tensor] | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    interrupted: bool = False  # should_stop() ended the run between two steps
    step_in_epoch: int = 0  # steps of ``epoch`` already taken (non-zero only after an interruption)
    partial_sums: dict[str, float] | None = None  # the metric sums of those steps
    seconds: float = 0.0


    def to_dict(self) -> dict:
        """Plain values and tensors only, for a weights-only checkpoint."""
        return {
            "epoch": self.epoch,
            "history": {k: list(v) for k, v in self.history.items()},
            "optimizer_state": self.optimizer_state,
            "best_elbo": float(self.best_elbo),
            "best_epoch": self.best_epoch,
            "best_state_dict": self.best_state_dict,
            "epochs_without_improvement": self.epochs_without_improvement,
            "stopped_early": self.stopped_early,
            "step_in_epoch": self.step_in_epoch,
            "partial_sums": self.partial_sums,
            "seconds": float(self.seconds),
        }

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainingState":
        fields = {name: saved[name] for name in cls.__dataclass_fields__ if name in saved and name != "interrupted"}
        return cls(**fields)


def kl_weight(epoch: int, warmup_epochs: int) -> float:
    """Linear KL warm-up by epoch: 0 in the first epoch, 1 from ``warmup_epochs`` on."""
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)


def _stored_transposed(p: torch.Tensor) -> bool:
    """A column-major 2-d parameter (see nn/sparse_input.column_major_), which torch's fused
    kernel would copy: its transpose is the contiguous tensor to step."""
    return not p.is_contiguous() and is_column_major(p)


def _without_dynamo_guard(method):
    """A torch.optim.Optimizer method without its ``torch._disable_dynamo`` wrapper, whose first
    call imports torch._dynamo: 0.8-1.9 s of every training command's start-up, for a guard that
    only matters under torch.compile, which training does not use."""
    return getattr(method, "__wrapped__", method)


class Adam(torch.optim.Adam):
    """torch's Adam (its state, state dict and update), with three costs of its step removed.

    The encoders' first Linear weights are stored column-major for the sparse first layer
    (nn/sparse_input.py). torch's fused kernel copies a non-contiguous parameter (and its
    gradient and moments) to contiguous memory and back on every step: measured 425 against
    153 us for one 128 x 2000 weight on 2 threads. Adam is elementwise, so for each such
    parameter the step runs on the transposed views of its data, gradient and moments (all
    contiguous, no copy) and the views are turned back afterwards: the same update, and a
    state dict in the parameter's own shape. Where torch has the fused kernel, it is called
    directly (see ``_direct_step``), and neither the step nor the methods below import
    torch._dynamo (see ``_without_dynamo_guard``).
    """

    zero_grad = _without_dynamo_guard(torch.optim.Optimizer.zero_grad)
    state_dict = _without_dynamo_guard(torch.optim.Optimizer.state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self._plan = None
        _without_dynamo_guard(torch.optim.Optimizer.add_param_group)(self, param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        self._plan = None  # the moments are new tensors
        _without_dynamo_guard(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure=None):
        if closure is None and self._direct_step():
            return None
        flipped = [p for group in self.param_groups for p in group["params"] if _stored_transposed(p)]
        torch_step = torch.optim.Adam.step
        if getattr(torch_step, "hooked", False):  # torch's step-hook wrapper: this step already runs the hooks
            torch_step = torch_step.__wrapped__
        self._transpose(flipped)
        try:
            return torch_step(self, closure)
        finally:
            self._transpose(flipped)

    @torch.no_grad()
    def _direct_step(self) -> bool:
        """The fused update called directly, as torch's own step would (state created as torch's
        first step creates it): torch's step spends about 0.3 ms of Python per call on choosing a
        kernel and grouping tensors, a few percent of a training step at batch 128, and its first
        call imports torch._dynamo. Returns False (nothing done) where torch's step is needed."""
        kernel = getattr(torch, "_fused_adam_", None)
        if kernel is None:
            return False
        key = self._plan_key()
        plan = getattr(self, "_plan", None)
        if plan is None or plan[0] != key:
            plan = self._plan = (key, self._direct_plan())
        groups = plan[1]
        if groups is None:
            return False
        for group, (params, flips, views, exp_avgs, exp_avg_sqs, steps) in zip(self.param_groups, groups):
            if not params:
                continue
            grads = [_contiguous(p.grad.t() if flip else p.grad) for p, flip in zip(params, flips)]
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            kernel(
                views, grads, exp_avgs, exp_avg_sqs, [], steps,
                amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False, grad_scale=None, found_inf=None,
            )
        return True

    def _plan_key(self) -> tuple:
        """What the plan of ``_direct_plan`` depends on and can change between steps: the groups'
        kernel options, which parameters have a gradient, where their data and gradients live and
        in which layout."""
        return tuple(
            (group["amsgrad"], group["maximize"], group.get("fused"),
             tuple((p.data_ptr(), p.stride(), None if p.grad is None else (p.grad.stride(), p.grad.dtype, p.grad.layout))
                   for p in group["params"]))
            for group in self.param_groups
        )

    def _direct_plan(self) -> list | None:
        """Per parameter group: the parameters with a gradient, whether each is stepped through
        its transpose, and its data, moments and step count as the kernel takes them (Adam's
        state created where missing); None where torch's step is needed. Built once and reused while
        ``_plan_key`` stays the same: the checks and views cost about 0.1 ms per step."""
        groups = []
        for group in self.param_groups:
            if not group.get("fused") or group["amsgrad"] or group["maximize"]:
                return None
            if group.get("differentiable") or group.get("capturable") or group.get("decoupled_weight_decay"):
                return None
            params, flips, views, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or not p.is_floating_point():
                    return None
                state = self.state[p]
                if not state:
                    _initial_state(state, p)
                elif not torch.is_tensor(state.get("step")):
                    return None
                flip = _stored_transposed(p)
                view = p.t() if flip else p
                if not view.is_contiguous():  # the kernel reads every tensor as flat memory
                    return None
                for key in ("exp_avg", "exp_avg_sq"):  # a loaded moment may be in another layout
                    moment = state[key].t() if flip else state[key]
                    if not moment.is_contiguous():
                        state[key] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(state[key])
                params.append(p)
                flips.append(flip)
                views.append(view)
                exp_avgs.append(state["exp_avg"].t() if flip else state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"].t() if flip else state["exp_avg_sq"])
                steps.append(state["step"])
            if params and len({(t.device, t.dtype) for t in params}) != 1:
                return None
            groups.append((params, flips, views, exp_avgs, exp_avg_sqs, steps))
        return groups

    def _transpose(self, params) -> None:
        for p in params:
            p.data = p.data.t()
            if p.grad is not None:
                p.grad = p.grad.t()
            state = self.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() == 2:
                    state[key] = value.t()


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the fused kernel needs it: it reads every tensor as flat memory, so a gradient
    set in another layout than its parameter's (by hand, not by autograd) is copied."""
    return t if t.is_contiguous() else t.contiguous()


def _initial_state(state: dict, p: torch.Tensor) -> None:
    """Adam's state before its first step, as torch's fused Adam creates it: a float32 step
    count on the parameter's device and zero moments in the parameter's own layout."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """Adam with L2 weight decay added to the gradient (not decoupled), as scvi-tools does.

    The fused kernel (one multi-tensor update instead of a loop over parameters) is used where
    torch provides it for every parameter's device; it computes the same update.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    options = dict(lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay)
    try:
        return Adam(params, fused=True, **options)
    except (RuntimeError, ValueError):
        return Adam(params, **options)


PRECISIONS = ("32", "tf32", "bf16-mixed")


@contextlib.contextmanager
def arithmetic(precision: str, device: torch.device | str):
    """The training step's arithmetic. "32": float32 throughout. "tf32": float32 tensors with
    TF32 matrix products (CUDA only; about 10 mantissa bits per product, fp32 accumulation).
    "bf16-mixed": torch.autocast to bfloat16 for matrix products, float32 weights, optimizer
    and likelihood (fused_nb_nll computes in float32 whatever it is given)."""
    kind = torch.device(device).type
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "32":
        yield
    elif precision == "tf32":
        if kind != "cuda":
            raise ValueError(f"precision tf32 needs a CUDA device (training runs on {kind})")
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        with torch.autocast(device_type=kind, dtype=torch.bfloat16):
            yield


class _MetricSums:
    """Per-cell sums of the loss terms, turned into per-cell averages at the end of an epoch.

    The sums stay a tensor on the model's device (float64, as Python floats would be) until they
    are read, so a training step never waits for the device to report a number.
    """

    def __init__(self, saved: dict[str, float] | None = None):
        # the saved sums of an interrupted distributed epoch are over all ranks: rank 0 takes them
        saved = dict(saved or {}) if not distributed.active() or distributed.dist.get_rank() == 0 else {}
        self.n_cells = int(saved.pop("n_cells", 0))
        self._saved = [float(saved.get(name, 0.0)) for name in METRICS]
        self._sums: torch.Tensor | None = None

    def add(self, out: LossOutput) -> None:
        terms = torch.stack([out.reconstruction_loss.detach().sum(), out.kl_local.detach().sum(), out.elbo.detach().sum()])
        if self._sums is None:
            dtype = torch.float32 if terms.device.type == "mps" else torch.float64
            self._sums = torch.tensor(self._saved, dtype=dtype, device=terms.device)
        self._sums += terms.to(self._sums.dtype)
        self.n_cells += out.reconstruction_loss.shape[0]

    def totals(self) -> tuple[dict[str, float], int]:
        """The sums and the cell count, over every rank of a distributed run."""
        if not distributed.active():
            values = self._saved if self._sums is None else self._sums.tolist()
            return dict(zip(METRICS, values)), self.n_cells
        local = self._sums if self._sums is not None else torch.tensor(self._saved, dtype=torch.float64)
        both = distributed.sum_over_ranks(torch.cat([local, local.new_tensor([float(self.n_cells)])])).tolist()
        return dict(zip(METRICS, both[:-1])), int(both[-1])

    def to_dict(self) -> dict[str, float]:
        sums, n_cells = self.totals()
        return {**sums, "n_cells": n_cells}

    def averages(self) -> dict[str, float]:
        sums, n_cells = self.totals()
        return {name: total / max(n_cells, 1) for name, total in sums.items()}


@torch.no_grad()
def evaluate_elbo(model: torch.nn.Module, batches: Iterable[Minibatch], device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-cell averages of reconstruction NLL, KL and negative ELBO, in eval mode (kl weight 1)."""
    was_training = model.training
    model.eval()
    sums = _MetricSums()
    for batch in batches:
        sums.add(model.loss_for(batch.to(device), kl_weight=1.0))
    model.train(was_training)
    return sums.averages()


def fit(
    model: torch.nn.Module,
    train_batches: MinibatchSource,
    validation_batches: MinibatchSource | None = None,
    *,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    state: TrainingState | None = None,
    on_epoch_end: Callable[[TrainingState, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainingState:
    """Train ``model`` in place for ``settings.max_epochs`` epochs (or until early stopping).

    ``train_batches`` / ``validation_batches`` are minibatch sources (iterable, with
    ``set_epoch``). ``on_epoch_end(state, metrics)`` is called after each epoch (progress, logs,
    periodic checkpoints); ``should_stop()`` is polled after every step so that a signal ends the
    run between two steps: ``fit`` then returns with ``state.interrupted`` set, and the model's
    weights, ``state`` and the torch RNG state together resume the run exactly.
    """
    state = state or TrainingState()
    model.to(device)
    optimizer = make_optimizer(model, settings)
    if state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    # in a distributed run a rank may hold no validation cells; the reduced metrics are everyone's
    monitor = settings.early_stopping and (validation_batches is not None or distributed.active())

    # In a distributed run, DDP wraps the step (gradients averaged over the ranks) and the
    # ranks agree on stopping at every step.
    parallel_step = distributed.data_parallel(model, torch.device(device)) if distributed.active() else None
    state.interrupted = False
    with compiled_likelihood(settings.compile):  # restored on leaving, interrupted or not
        while state.epoch < settings.max_epochs and not state.stopped_early:
            started = time.perf_counter()
            weight = kl_weight(state.epoch, settings.kl_warmup_epochs)
            model.train()
            train_batches.set_epoch(state.epoch)
            sums = _MetricSums(state.partial_sums)
            # After an interruption, replay the epoch's (seeded) order and skip the steps already taken.
            for step, batch in enumerate(train_batches):
                if step < state.step_in_epoch:
                    continue
                with arithmetic(settings.precision, device):
                    batch = batch.to(device)
                    out = parallel_step(batch, weight) if parallel_step is not None else model.loss_for(batch, kl_weight=weight)
                    optimizer.zero_grad(set_to_none=True)
                    out.loss.backward()
                    optimizer.step()
                sums.add(out)
                stop = should_stop is not None and should_stop()
                if distributed.any_rank(stop, device):
                    state.step_in_epoch, state.partial_sums = step + 1, sums.to_dict()
                    state.optimizer_state = optimizer.state_dict()
                    state.seconds += time.perf_counter() - started
                    state.interrupted = True
                    return state
            state.step_in_epoch, state.partial_sums = 0, None

            metrics = {f"{name}_train": value for name, value in sums.averages().items()}
            metrics["kl_weight"] = weight
            # every rank asks (a rank whose share of validation cells is empty still takes part)
            if validates(state.epoch, settings) and distributed.any_rank(
                validation_batches is not None and len(validation_batches) > 0, device
            ):
                validation = evaluate_elbo(model, validation_batches or [], device)
                metrics.update({f"{name}_validation": value for name, value in validation.items()})
            state.seconds += time.perf_counter() - started
            metrics["seconds"] = time.perf_counter() - started
            _append(state.history, state.epoch, metrics)

            if monitor and "elbo_validation" in metrics:
                current = metrics["elbo_validation"]
                if current < state.best_elbo - settings.early_stopping_min_delta:
                    state.best_elbo, state.best_epoch = current, state.epoch
                    state.best_state_dict = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                    state.epochs_without_improvement = 0
                else:
                    state.epochs_without_improvement += 1
                    if state.epochs_without_improvement >= settings.early_stopping_patience:
                        state.stopped_early = True
            state.epoch += 1
            state.optimizer_state = optimizer.state_dict()
            if on_epoch_end is not None:
                on_epoch_end(state, metrics)

    if monitor and state.best_state_dict is not None:
        model.load_state_dict(state.best_state_dict)
    model.eval()
    return state


def validates(epoch: int, settings: TrainSettings) -> bool:
    """Whether epoch ``epoch`` (from 0) ends with a validation pass: every
    ``validation_every_n_epochs``-th epoch and the last one, so that a run's final metrics hold it."""
    every = settings.validation_every_n_epochs
    return every is not None and ((epoch + 1) % every == 0 or epoch + 1 == settings.max_epochs)


def _append(history: dict[str, list[float]], epoch: int, metrics: dict[str, float]) -> None:
    """Row ``epoch`` of the history (epochs run contiguously from 0, so the row index is the epoch);
    a metric an epoch did not measure (validation between two passes) is NaN there."""
    for name, values in history.items():
        if name not in metrics:
            values.append(math.nan)
    for name, value in metrics.items():
        history.setdefault(name, [math.nan] * epoch).append(float(value))
