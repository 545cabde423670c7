"""Training one model in several processes (``torchrun``, or ``srun`` under SLURM) with torch's
DistributedDataParallel: gloo on CPUs, NCCL on GPUs.

Each rank takes every WORLD_SIZE-th minibatch of the shared epoch order (the same (seed, epoch)
order on every rank; the last ``len % WORLD_SIZE`` minibatches of an epoch are left out so that
every rank takes the same number of steps). A step therefore equals one process's step on the
union of the ranks' minibatches: DDP averages the gradients, batch norm uses statistics over the
union (SyncBatchNorm on GPUs; on CPUs, where torch's SyncBatchNorm does not run, the same
arithmetic through differentiable all-reduces), metric sums and validation are reduced over the
ranks, and a stop signal received by any rank stops every rank after the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Seconds a rank waits for the others in a collective before failing (a dead peer is usually
# seen at once, from its closed connection); SCVI_CLI_DISTRIBUTED_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_environment(environ=os.environ) -> Ranks | None:
    """The process's place in a torchrun / SLURM job, or None when it runs alone."""
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return Ranks(int(environ["RANK"]), world, int(environ.get("LOCAL_RANK", environ["RANK"])))


def start(ranks: Ranks, device: torch.device) -> None:
    """Join the process group (NCCL for CUDA devices, gloo otherwise)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("SCVI_CLI_DISTRIBUTED_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)


def stop(wait_for_others: bool = True) -> None:
    """Leave the process group; after a normal end, first wait until every rank is done (rank
    0 may still be writing the checkpoint), so that no rank tears down the group under another
    one's last collective."""
    if not dist.is_initialized():
        return
    if wait_for_others:
        try:
            dist.barrier()
        except Exception:  # a rank that died: nothing to wait for
            pass
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``values`` over the ranks (itself when running alone)."""
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` is set on any rank: every rank gets the same answer, at the same step."""
    if not active():
        return flag
    return bool(sum_over_ranks(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)


def cell_share(train_idx: np.ndarray, validation_idx: np.ndarray, rank: int, world_size: int, batch_size: int):
    """(training cells, validation cells) this rank holds in a distributed in-memory run.

    Every rank takes every world_size-th cell of the (seeded) split, so that it reads only its
    share into memory; all training shares have the same size (the split's last few cells, fewer
    than world_size, are left out, and a share whose last minibatch would hold 1-2 cells gives
    them up, as the split does) so that the ranks' steps pair up. Validation cells are all used.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    per_rank = len(train_idx) // world_size
    remainder = per_rank % batch_size
    if 0 < remainder < 3 and per_rank > remainder:
        per_rank -= remainder
    return np.sort(train_idx[rank::world_size][:per_rank]), np.sort(validation_idx[rank::world_size])


class SyncedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the union of every rank's minibatch.

    The same parameters, buffers and state-dict names as BatchNorm1d; in eval mode, or when
    running alone, it is BatchNorm1d. In training, the per-feature count, sum and sum of squares
    are summed over the ranks with a differentiable all-reduce (its backward sums the
    gradients over the ranks too, as SyncBatchNorm's does), so values and gradients equal one
    process's BatchNorm1d on the concatenated minibatches.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        n = torch.tensor([float(x.shape[0])], device=x.device, dtype=x.dtype)
        totals = all_reduce(torch.cat([n, x.sum(0), (x * x).sum(0)]))
        count, sums, squares = totals[0], totals[1 : 1 + x.shape[1]], totals[1 + x.shape[1] :]
        mean = sums / count
        var = squares / count - mean * mean  # biased, for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def synchronise_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the union of the ranks' minibatches: torch's SyncBatchNorm on CUDA,
    SyncedBatchNorm1d elsewhere (in place for the latter; returns the model)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm1d:
                synced = SyncedBatchNorm1d(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                    device=child.weight.device if child.affine else None,
                )
                synced.load_state_dict(child.state_dict())
                setattr(module, child_name, synced)
    return model


class LossStep(nn.Module):
    """``forward(batch, kl_weight) = model.loss_for(batch, kl_weight)``: the call DDP wraps, so
    that its gradient hooks see each step as a forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, kl_weight: float):
        return self.model.loss_for(batch, kl_weight=kl_weight)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """The DDP-wrapped LossStep of ``model`` (its parameters broadcast from rank 0)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # Buffers (batch-norm running statistics) are the same on every rank already: no broadcast.
    # Some parameters take no part in a model's loss (scVI's library encoder with an observed
    # library, as in scvi-tools): DDP must look for them each step.
    return DistributedDataParallel(
        LossStep(model), device_ids=ids, forward_sync_buffers=False, find_unused_parameters=True
    )
