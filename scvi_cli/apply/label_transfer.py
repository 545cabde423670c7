"""Labels of query cells from a reference's, by a kNN vote in a mapped model's latent space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scvi_cli.apply import queries
from scvi_cli.apply.integration import transfer_by_vote
from scvi_cli.data.categories import _obs_column
from scvi_cli.errors import DataError
from scvi_cli.trained_model import TrainedModel, kept_obs


@dataclass
class LabelTransfer:
    predictions: pd.DataFrame  # one row per query cell: predicted, vote_share, uncertainty
    n_reference: int  # reference cells that voted (labelled, non-zero counts)
    n_unlabelled: int  # reference cells without a label, left out
    agreement: float | None  # share of query cells whose own label (when the query has one) is predicted


def _embed(trained: TrainedModel, path, allow_missing_genes, backed, batch_size, device):
    adata, data = trained.load_query(path, allow_missing_genes, backed=backed, keep_counts=False)
    latent = np.concatenate(list(queries.iter_latent(trained.module, data, batch_size=batch_size, device=device)))
    obs = kept_obs(adata, data)
    return latent, obs, data


def transfer_labels(
    trained: TrainedModel,
    reference_path: str | Path,
    query_path: str | Path,
    labels_key: str,
    *,
    k: int = 15,
    batch_size: int = queries.DEFAULT_BATCH_SIZE,
    device="cpu",
    allow_missing_genes: bool = False,
    backed: bool = False,
    workers: int = 1,
) -> LabelTransfer:
    """Embed the reference and the query cells (posterior mean) and give each query cell the
    label most common among its k nearest labelled reference cells; vote_share is that label's
    share of the k votes, uncertainty 1 - vote_share."""
    ref_latent, ref_obs, _ = _embed(trained, reference_path, allow_missing_genes, backed, batch_size, device)
    column = _obs_column(ref_obs, labels_key, "--labels-key", str(reference_path))
    labelled = column.notna().to_numpy()
    n_labelled = int(labelled.sum())
    if n_labelled < k:
        raise DataError(f"{reference_path}: obs[{labels_key!r}] labels {n_labelled} cells, fewer than k={k}")
    query_latent, query_obs, _ = _embed(trained, query_path, allow_missing_genes, backed, batch_size, device)
    predicted, share = transfer_by_vote(
        ref_latent[labelled], column[labelled].astype(str).to_numpy(), query_latent, k, workers=workers
    )
    predictions = pd.DataFrame(
        {"predicted": predicted, "vote_share": share, "uncertainty": 1.0 - share}, index=query_obs.index
    )
    agreement = None
    if labels_key in query_obs.columns and query_obs[labels_key].notna().any():
        own = query_obs[labels_key]
        known = own.notna().to_numpy()
        agreement = float(np.mean(own[known].astype(str).to_numpy() == predicted[known]))
    return LabelTransfer(predictions, n_labelled, int((~labelled).sum()), agreement)
