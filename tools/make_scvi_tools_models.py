"""Make the scvi-tools model fixtures under tests/data/scvi_tools_models/ (run once, in a venv
with scvi-tools 1.5.1; the tests that read them need no scvi-tools).

    ../scvi-tools-venv/bin/python tools/make_scvi_tools_models.py

Input: tests/data/pbmc_small_seurat.h5ad, its first 40 genes, with a batch category "unused"
that no cell has (scvi-tools keeps it in the model's mapping). For each model type it trains
a few epochs on 2 CPU threads, saves the model directory (MODEL/model.pt) and what scvi-tools
computes from it on the same cells: the latent mean, px_scale x 1e4 decoded from that mean (not
for CondSCVI), and get_elbo's mean over 20 seeds (it draws z once per cell).
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scvi
import torch

HERE = Path(__file__).resolve().parents[1]
OUT = HERE / "tests" / "data" / "scvi_tools_models"


def data() -> ad.AnnData:
    adata = ad.read_h5ad(HERE / "tests" / "data" / "pbmc_small_seurat.h5ad")[:, :40].copy()
    adata.obs["batch"] = pd.Categorical(adata.obs["batch"].astype(str), categories=["g1", "g2", "unused"])
    adata.obs = adata.obs[["batch", "cell_type", "nCount_RNA"]]
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).astype("category")
    adata.uns = {}
    adata.obsm = {}
    return adata


def with_unused(adata: ad.AnnData) -> None:
    """Batch categories g1, g2 and "unused" (no cell): anndata drops unused categories when it
    subsets, so this is set again right before use."""
    adata.obs["batch"] = pd.Categorical(adata.obs["batch"].astype(str), categories=["g1", "g2", "unused"])


@torch.no_grad()
def scale_at_posterior_mean(model, adata) -> np.ndarray:
    """px_scale decoded from z = the posterior mean (scvi-tools' get_normalized_expression decodes
    a posterior draw instead, so it cannot be compared exactly)."""
    module = model.module
    module.eval()
    blocks = []
    for tensors in model._make_data_loader(adata=adata, batch_size=1000, shuffle=False):
        inference = module.inference(**module._get_inference_input(tensors))
        generative_input = module._get_generative_input(tensors, inference)
        generative_input["z"] = inference["qz"].loc
        blocks.append(module.generative(**generative_input)["px"].scale.numpy())
    return np.concatenate(blocks).astype(np.float32)


def main() -> None:
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    adata = data()
    keep = adata.X.sum(1).A1 > 0 if hasattr(adata.X, "toarray") else adata.X.sum(1) > 0
    adata = adata[np.asarray(keep).reshape(-1)].copy()
    with_unused(adata)
    adata.write_h5ad(OUT / "cells.h5ad")
    facts = {"scvi_tools": scvi.__version__, "models": {}}
    models = {
        "scvi": (scvi.model.SCVI, dict(batch_key="batch"), dict(n_hidden=16, n_latent=4)),
        "scvi_latent_library": (
            scvi.model.SCVI, dict(batch_key="batch", labels_key="cell_type"),
            dict(n_hidden=16, n_latent=3, n_layers=2, use_observed_lib_size=False, gene_likelihood="nb", dispersion="gene-batch"),
        ),
        "linear_scvi": (scvi.model.LinearSCVI, dict(batch_key="batch"), dict(n_hidden=16, n_latent=3)),
        "condscvi": (scvi.model.CondSCVI, dict(labels_key="cell_type", batch_key="batch"), dict(n_hidden=16, n_latent=3)),
    }
    for name, (cls, setup, init) in models.items():
        scvi.settings.seed = 0
        copy = adata.copy()
        with_unused(copy)
        cls.setup_anndata(copy, **setup)
        model = cls(copy, **init)
        model.train(max_epochs=5, accelerator="cpu", devices=1, batch_size=32)
        model.save(OUT / name, overwrite=True)
        latent = model.get_latent_representation(copy)
        np.save(OUT / f"{name}.latent.npy", latent.astype(np.float32))
        entry = {"setup": setup, "init": init}
        if cls is not scvi.model.CondSCVI:
            np.save(OUT / f"{name}.normalized_1e4.npy", scale_at_posterior_mean(model, copy) * np.float32(1e4))
            # get_elbo draws z once per cell: its mean over 20 seeds, with the spread of one call
            elbos = []
            for seed in range(20):
                scvi.settings.seed = seed
                elbos.append(float(model.get_elbo(copy)))
            entry["elbo_mean_of_20"], entry["elbo_sd"] = float(np.mean(elbos)), float(np.std(elbos))
        facts["models"][name] = entry
    (OUT / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")


if __name__ == "__main__":
    main()
