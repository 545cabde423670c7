"""A trained model loaded from its checkpoint, and the query data shaped to fit it.

Every command that applies a model (evaluate, embed, impute, sample, ...) starts here: the
checkpoint rebuilds the module, and query cells are matched to the model's genes (by name, in any
order) and categories (coded as in training; unknown ones are errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from scvi_cli.checkpoint import Checkpoint, load_checkpoint
from scvi_cli.data import CountData, count_data_from_anndata, read_h5ad
from scvi_cli.data.categories import NO_KEY_CATEGORY
from scvi_cli.errors import CheckpointError, first_line
from scvi_cli.model_factory import build_model
from scvi_cli.spec import Spec

if TYPE_CHECKING:
    from anndata import AnnData


def model_uses_labels(module: nn.Module) -> bool:
    """Whether the module's output depends on the cells' labels: CondSCVI's always does, scVI's
    and LDVAE's only through a per-label dispersion."""
    from scvi_cli.models import VAEC

    return isinstance(module, VAEC) or getattr(module, "dispersion", None) == "gene-label"


def ignoring_labels(module: nn.Module, data_spec, categories: dict[str, list[str]]):
    """(data spec, categories) to read cells with: for a model that ignores labels, whatever the
    labels column holds (missing, NaN, new values, as query files do), every cell is coded as
    the one category; otherwise both unchanged."""
    if data_spec.labels_key is None or model_uses_labels(module):
        return data_spec, categories
    return data_spec.model_copy(update={"labels_key": None}), {**categories, "labels": [NO_KEY_CATEGORY]}


def kept_obs(adata: AnnData, data: CountData):
    """adata.obs aligned with ``data``'s cells (those with zero total counts left out)."""
    return adata.obs if data.kept_cells is None else adata.obs.iloc[np.flatnonzero(data.kept_cells)]


@dataclass
class TrainedModel:
    path: Path
    checkpoint: Checkpoint
    spec: Spec
    module: nn.Module

    @property
    def model_type(self) -> str:
        return self.checkpoint.model_type

    def load_query(
        self, data_path: str | Path, allow_missing_genes: bool = False, backed: bool = False, keep_counts: bool = True
    ) -> tuple[AnnData, CountData]:
        """(AnnData, CountData) of ``data_path`` shaped for this model: read once, the AnnData
        kept for h5ad outputs.

        Genes are matched to the model's by name (any order); missing genes are an error unless
        ``allow_missing_genes`` fills them with zeros (with a warning saying how many); unknown
        batch or label categories are an error naming them. With ``backed`` the counts stay on
        disk (the AnnData is backed, the CountData reads rows as needed). Without ``keep_counts``
        (the output is not a copy of the input file) the AnnData gives up its count matrices once
        the CountData holds them, so the counts are in memory once, not twice.
        """
        adata = read_h5ad(data_path, backed=backed)
        data_spec, categories = ignoring_labels(self.module, self.spec.data, self.checkpoint.categories)
        if backed:
            from scvi_cli.data.backed import backed_count_data

            return adata, backed_count_data(
                adata, data_spec, str(data_path), categories=categories,
                gene_names=self.checkpoint.gene_names, allow_missing_genes=allow_missing_genes,
            )
        query = count_data_from_anndata(
            adata,
            data_spec,
            str(data_path),
            categories=categories,
            gene_names=self.checkpoint.gene_names,
            allow_missing_genes=allow_missing_genes,
            consume=not keep_counts,
        )
        if not keep_counts:
            adata.X = None
            for name in list(adata.layers.keys()):
                del adata.layers[name]
            if adata.raw is not None:
                del adata.raw
        return adata, query


def load_trained_model(path: str | Path, expected_type=None, device: torch.device | str = "cpu") -> TrainedModel:
    """Rebuild the module from a checkpoint, in eval mode on ``device``."""
    checkpoint = load_checkpoint(path, expected_type)
    try:
        spec = Spec.from_dict(checkpoint.spec, source=str(path))
        module = build_model(checkpoint.model_type, checkpoint.model_kwargs)
        module.load_state_dict(checkpoint.state_dict)
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(
            f"{path}: checkpoint does not rebuild its model ({first_line(error, with_type=False)})"
        ) from error
    if len(checkpoint.gene_names) != getattr(module, "n_input", len(checkpoint.gene_names)):
        raise CheckpointError(f"{path}: checkpoint lists {len(checkpoint.gene_names)} genes for a model of {module.n_input}")
    module.to(device).eval()
    return TrainedModel(Path(path), checkpoint, spec, module)
