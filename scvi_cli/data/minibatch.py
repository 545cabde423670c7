"""The unit of work a training or inference step consumes: a few cells' counts and covariates.

Kept free of AnnData and of any model so that minibatch sources (in-memory CSR today, backed
h5ad or distributed shards later) and models can change independently.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from scvi_cli.nn.sparse_input import SparseRows


class Minibatch:
    """Counts of B cells with their covariates.

    The counts come dense (``x``), as CSR rows (``rows``), or both. ``x`` is made from ``rows``
    on first use when only they were given, so a step that only encodes (embed) never densifies,
    while the likelihood, which needs every entry, reads ``x``. ``counts`` is what an encoder
    reads: the rows when present (a sparse first layer), else ``x``.
    """

    __slots__ = ("_x", "rows", "batch_index", "labels", "cat_covs", "cont_covs")

    def __init__(
        self,
        x: torch.Tensor | None = None,  # (B, G) float32 counts
        batch_index: torch.Tensor | None = None,  # (B, 1) int64 batch codes (zeros without a batch key)
        labels: torch.Tensor | None = None,  # (B, 1) int64 label codes (zeros without a labels key)
        cat_covs: torch.Tensor | None = None,  # (B, K) int64 codes of extra categorical covariates
        cont_covs: torch.Tensor | None = None,  # (B, M) float32 continuous covariates
        rows: SparseRows | None = None,  # the same counts as CSR rows
    ):
        if x is None and rows is None:
            raise ValueError("a Minibatch needs its counts: x, rows or both")
        self._x = x
        self.rows = rows
        n = len(self)
        zeros = None
        if batch_index is None or labels is None:
            zeros = torch.zeros((n, 1), dtype=torch.int64, device=(x if x is not None else rows).device)
        self.batch_index = zeros if batch_index is None else batch_index
        self.labels = zeros if labels is None else labels
        self.cat_covs = cat_covs
        self.cont_covs = cont_covs

    @property
    def x(self) -> torch.Tensor:
        if self._x is None:
            self._x = self.rows.to_dense()
        return self._x

    @property
    def counts(self) -> torch.Tensor | SparseRows:
        return self.rows if self.rows is not None else self._x

    def to(self, device: torch.device | str) -> "Minibatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Minibatch(
            x=move(self._x),
            batch_index=move(self.batch_index),
            labels=move(self.labels),
            cat_covs=move(self.cat_covs),
            cont_covs=move(self.cont_covs),
            rows=move(self.rows),
        )

    def __len__(self) -> int:
        return self._x.shape[0] if self._x is not None else len(self.rows)


@runtime_checkable
class MinibatchSource(Protocol):
    """What the training loop iterates: in-memory CSR today, a backed (on-disk) or per-process
    shard source later. The order of an epoch depends only on ``set_epoch``'s argument (and the
    source's seed), so a resumed or distributed run replays it without saved RNG state."""

    def __iter__(self) -> Iterator[Minibatch]: ...

    def __len__(self) -> int:  # minibatches per epoch
        ...

    def set_epoch(self, epoch: int) -> None: ...
