"""Normalised expression averaged over posterior draws and transform batches, for every model.

A model answers two public calls, ``posterior_draws(batch, n_samples)`` -> (z, library) and
``scale_head(z, batch, transform_batch)`` -> its decoder's px_scale layer (a ScaleHead); this
module only averages. It is the one implementation behind VAE, LDVAE and VAEC's sample_scale /
sample_rate, so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from scvi_cli.nn.decoders import ScaleHead

# transform_batch of the expression queries: None (each cell's own batch), one batch code, or
# several, whose decodings are averaged.
TransformBatch = int | Sequence[int] | None


def transform_codes(transform_batch: TransformBatch) -> list[int | None]:
    """The batch codes to decode with, as a list: [None] decodes each cell as its own batch."""
    if transform_batch is None or np.ndim(transform_batch) == 0:
        return [None if transform_batch is None else int(transform_batch)]
    codes = [int(code) for code in transform_batch]
    if not codes:
        raise ValueError("transform_batch: an empty list of batches (None decodes each cell as its own batch)")
    return codes


@torch.no_grad()
def average_expression(
    module,
    batch,
    transform_batch: TransformBatch,
    n_samples: int,
    gene_index,
    gene_chunk: int | None,
    rate: bool,
) -> torch.Tensor:
    """px_scale (or px_rate = library x px_scale with ``rate``) of ``gene_index`` for the cells
    of ``batch``, averaged over ``module``'s posterior draws and the transform batches.

    ``n_samples`` = 0 decodes the posterior mean, S > 0 averages S joint draws of z and library
    (count scale). Every transform batch decodes the same draws, one draw at a time,
    ``gene_chunk`` genes at a time: memory is cells x wanted genes plus one gene chunk.
    """
    codes = transform_codes(transform_batch)
    z, library = module.posterior_draws(batch, n_samples)
    genes = None if gene_index is None else torch.as_tensor(gene_index, dtype=torch.long, device=z.device)
    total = None
    for code in codes:
        for s in range(z.shape[0]):
            head: ScaleHead = module.scale_head(z[s], batch, code)
            values = head.columns(genes, gene_chunk)
            if rate:
                values = values * library[s]
            total = values if total is None else total + values
    return total / (len(codes) * z.shape[0])
