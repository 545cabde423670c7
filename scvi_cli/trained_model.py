"""A trained model loaded from its checkpoint, and the query data shaped to fit it.

Every command that applies a model (evaluate, embed, impute, sample, ...) starts here: the
checkpoint rebuilds the module, and query cells are matched to the model's genes (by name, in any
order) and categories (coded as in training; unknown ones are errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scvi_cli.checkpoint import Checkpoint, load_checkpoint
from scvi_cli.data import CountData, load_count_data
from scvi_cli.errors import CheckpointError
from scvi_cli.model_factory import build_model
from scvi_cli.spec import Spec


@dataclass
class TrainedModel:
    path: Path
    checkpoint: Checkpoint
    spec: Spec
    module: nn.Module

    @property
    def model_type(self) -> str:
        return self.checkpoint.model_type

    def load_query(self, data_path: str | Path, allow_missing_genes: bool = False) -> CountData:
        """The cells of ``data_path`` as the model saw its training cells."""
        return load_count_data(
            data_path,
            self.spec.data,
            categories=self.checkpoint.categories,
            gene_names=self.checkpoint.gene_names,
            allow_missing_genes=allow_missing_genes,
        )


def load_trained_model(path: str | Path, expected_type=None, device: torch.device | str = "cpu") -> TrainedModel:
    """Rebuild the module from a checkpoint, in eval mode on ``device``."""
    checkpoint = load_checkpoint(path, expected_type)
    try:
        spec = Spec.from_dict(checkpoint.spec, source=str(path))
        module = build_model(checkpoint.model_type, checkpoint.model_kwargs)
        module.load_state_dict(checkpoint.state_dict)
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: checkpoint does not rebuild its model ({first})") from error
    if len(checkpoint.gene_names) != getattr(module, "n_input", len(checkpoint.gene_names)):
        raise CheckpointError(f"{path}: checkpoint lists {len(checkpoint.gene_names)} genes for a model of {module.n_input}")
    module.to(device).eval()
    return TrainedModel(Path(path), checkpoint, spec, module)
