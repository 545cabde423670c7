"""Held-out fit of a trained model: per-cell reconstruction NLL, KL, negative ELBO, log-likelihood."""

from __future__ import annotations

import math

import torch

from scvi_cli.data import CountData, iterate_in_order
from scvi_cli.device import count_layout
from scvi_cli.training.loop import evaluate_elbo

# Importance samples are drawn in chunks so memory stays at chunk x batch x genes floats.
_MC_CHUNK = 25


@torch.no_grad()
def marginal_log_likelihood(module, batches, n_mc_samples: int, device) -> float:
    """Per-cell mean of the importance-sampling estimate of log p(x), over all cells of ``batches``."""
    total, n_cells = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        chunks = []
        remaining = n_mc_samples
        while remaining > 0:
            size = min(_MC_CHUNK, remaining)
            # Each chunk's estimate is logsumexp - log(size); undo the mean to merge chunks exactly.
            chunks.append(module.marginal_ll(batch, n_mc_samples=size) + math.log(size))
            remaining -= size
        per_cell = torch.logsumexp(torch.stack(chunks), dim=0) - math.log(n_mc_samples)
        total += per_cell.sum().item()
        n_cells += per_cell.shape[0]
    return total / max(n_cells, 1)


def evaluate_model(
    module, data: CountData, *, n_mc_samples: int = 100, batch_size: int = 256, seed: int = 0, device="cpu"
) -> dict[str, float]:
    """Per-cell averages on every cell of ``data``; seeded, so the same call gives the same numbers.

    ``negative_elbo = reconstruction_nll + kl_local`` (KL weight 1); ``marginal_ll`` is the
    importance-sampled log p(x) (higher is better; -marginal_ll <= negative_elbo in expectation).
    """
    module.eval()
    layout = count_layout(device)
    torch.manual_seed(seed)
    elbo = evaluate_elbo(module, iterate_in_order(data, batch_size, layout=layout), device)
    metrics = {
        "n_cells": data.n_cells,
        "reconstruction_nll": elbo["reconstruction_loss"],
        "kl_local": elbo["kl_local"],
        "negative_elbo": elbo["elbo"],
    }
    if n_mc_samples > 0:
        torch.manual_seed(seed)
        metrics["marginal_ll"] = marginal_log_likelihood(module, iterate_in_order(data, batch_size, layout=layout), n_mc_samples, device)
    return metrics
