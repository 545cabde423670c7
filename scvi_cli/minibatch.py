"""The unit of work a training or inference step consumes: a few cells' counts and covariates.

Kept free of AnnData and of any model so that minibatch sources (in-memory CSR today, backed
h5ad or distributed shards later) and models can change independently.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Minibatch:
    x: torch.Tensor  # (B, G) float32 counts
    batch_index: torch.Tensor  # (B, 1) int64 batch codes (zeros without a batch key)
    labels: torch.Tensor  # (B, 1) int64 label codes (zeros without a labels key)
    cat_covs: torch.Tensor | None = None  # (B, K) int64 codes of extra categorical covariates
    cont_covs: torch.Tensor | None = None  # (B, M) float32 continuous covariates

    def to(self, device: torch.device | str) -> "Minibatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Minibatch(
            x=move(self.x),
            batch_index=move(self.batch_index),
            labels=move(self.labels),
            cat_covs=move(self.cat_covs),
            cont_covs=move(self.cont_covs),
        )

    def __len__(self) -> int:
        return self.x.shape[0]


@runtime_checkable
class MinibatchSource(Protocol):
    """What the training loop iterates: in-memory CSR today, a backed (on-disk) or per-process
    shard source later. The order of an epoch depends only on ``set_epoch``'s argument (and the
    source's seed), so a resumed or distributed run replays it without saved RNG state."""

    def __iter__(self) -> Iterator[Minibatch]: ...

    def __len__(self) -> int:  # minibatches per epoch
        ...

    def set_epoch(self, epoch: int) -> None: ...
