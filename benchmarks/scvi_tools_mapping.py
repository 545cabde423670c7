"""scArches query mapping with scvi-tools 1.5.1: the baseline for scvi-cli's reference mapping.

Splits an h5ad by batch into a reference (every batch but ``--query-batch``) and a query (that
batch), trains default scVI on the reference (train_size 0.9, batch size 128, no early
stopping), saves it, then maps the query the standard scvi-tools way
(``SCVI.prepare_query_anndata`` + ``SCVI.load_query_data`` with default freezing) and trains
it with weight_decay 0. Both reference and query cells are then embedded (posterior mean) with
the query model, which covers every batch. Run it with the scvi-tools virtualenv:

    ../scvi-tools-venv/bin/python benchmarks/scvi_tools_mapping.py \\
        --data ../shared/data/cellbench_5batch.h5ad --query-batch sc_dropseq \\
        --ref-epochs 200 --query-epochs 200 --seed 0 --out ../bench/mapping/scvi_tools

Writes to ``--out``: ``reference_model/`` and ``query_model/`` (scvi-tools saves, no AnnData),
``latent_reference.npy`` / ``latent_query.npy`` (rows in the order of ``obs_*.csv``),
``obs_reference.csv`` / ``obs_query.csv`` (obs_names, batch, labels), ``timings.json``
(training seconds and cell counts) and ``frozen_check.json``: which reference tensors of the
state dict (parameters and buffers) query training changed, compared on the reference's slice
of tensors that the query extends (and how much their new part moved), with the
``requires_grad`` flags that load_query_data set.

With scvi-tools 1.5.1 and Lightning 2.6 the query trains with the module in eval mode
(load_query_data calls ``module.eval()`` and Lightning only warns): dropout is off and batch
norm uses, and keeps, the reference's running statistics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import scvi
from scvi.model import SCVI


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--labels-key", default="cell_type")
    p.add_argument("--query-batch", required=True)
    p.add_argument("--ref-epochs", type=int, default=200)
    p.add_argument("--query-epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def frozen_check(
    before: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], module: torch.nn.Module
) -> dict:
    """Compare the reference state dict with the query module's, on the reference's slice.

    Tensors the query extends (new batch columns) are also listed under ``extended``, with the
    largest change query training made to their new part (against the state after loading).
    """
    after = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    changed, unchanged, extended = {}, [], {}
    for name, old in before.items():
        new = after[name]
        ref_part = tuple(slice(0, n) for n in old.shape)
        if new.shape != old.shape:
            delta = (new.double() - loaded[name].double()).abs()
            delta[ref_part] = 0
            extended[name] = {
                "reference_shape": list(old.shape),
                "query_shape": list(new.shape),
                "new_part_max_abs_diff": delta.max().item(),
            }
            new = new[ref_part]
        diff = (new.double() - old.double()).abs().max().item() if old.numel() else 0.0
        if diff > 0:
            changed[name] = diff
        else:
            unchanged.append(name)
    return {"changed_max_abs_diff": changed, "unchanged": unchanged, "extended": extended}


def main() -> None:
    args = parse_args()
    scvi.settings.seed = args.seed
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ref_dir, query_dir = args.out / "reference_model", args.out / "query_model"

    adata = ad.read_h5ad(args.data)
    is_query = (adata.obs[args.batch_key] == args.query_batch).to_numpy()
    ref, query = adata[~is_query].copy(), adata[is_query].copy()

    SCVI.setup_anndata(ref, batch_key=args.batch_key)
    model = SCVI(ref)
    t0 = time.perf_counter()
    model.train(max_epochs=args.ref_epochs, train_size=0.9, batch_size=128, early_stopping=False)
    ref_seconds = time.perf_counter() - t0
    model.save(str(ref_dir), overwrite=True, save_anndata=False)
    before = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}

    SCVI.prepare_query_anndata(query, str(ref_dir))
    q = SCVI.load_query_data(query, str(ref_dir))
    requires_grad = {k: p.requires_grad for k, p in q.module.named_parameters()}
    loaded = {k: v.detach().cpu().clone() for k, v in q.module.state_dict().items()}
    t0 = time.perf_counter()
    q.train(
        max_epochs=args.query_epochs,
        plan_kwargs=dict(weight_decay=0.0),
        train_size=0.9,
        batch_size=128,
    )
    query_seconds = time.perf_counter() - t0
    q.save(str(query_dir), overwrite=True, save_anndata=False)

    # Embed both with the query model: a fresh copy of the reference and query cells, set up
    # from the query model's registry (its batch mapping covers all five batches).
    full = adata[np.concatenate([np.flatnonzero(~is_query), np.flatnonzero(is_query)])].copy()
    SCVI.prepare_query_anndata(full, str(query_dir))
    latent = q.get_latent_representation(adata=full)
    n_ref = int((~is_query).sum())
    np.save(args.out / "latent_reference.npy", latent[:n_ref])
    np.save(args.out / "latent_query.npy", latent[n_ref:])
    obs = full.obs[[args.batch_key, args.labels_key]].rename(
        columns={args.batch_key: "batch", args.labels_key: "labels"}
    )
    obs.iloc[:n_ref].to_csv(args.out / "obs_reference.csv", index_label="obs_names")
    obs.iloc[n_ref:].to_csv(args.out / "obs_query.csv", index_label="obs_names")

    timings = {
        "reference_train_seconds": ref_seconds,
        "query_train_seconds": query_seconds,
        "reference_cells": n_ref,
        "query_cells": int(is_query.sum()),
        "ref_epochs": args.ref_epochs,
        "query_epochs": args.query_epochs,
        "threads": args.threads,
        "scvi_tools_version": scvi.__version__,
    }
    (args.out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    check = frozen_check(before, loaded, q.module)
    check["requires_grad_after_load_query_data"] = requires_grad
    (args.out / "frozen_check.json").write_text(json.dumps(check, indent=2) + "\n")
    print(json.dumps(timings, indent=2))
    print("changed:", sorted(check["changed_max_abs_diff"]))


if __name__ == "__main__":
    main()
