"""Reference differential expression from scvi-tools 1.5.1, for comparison with scvi-cli.

Trains default scVI (SCVI.setup_anndata with the batch key, SCVI(adata) defaults, train_size
0.9, batch size 128) and saves it, then runs ``model.differential_expression`` in ``change``
mode (note: 1.5.1's own default is ``vanilla``) with every other argument at its default:

- ``de_one_vs_rest.csv``: each group of ``--groupby`` against the rest;
- ``de_pairwise.csv``: ``--group1`` against ``--group2`` (default A549 vs H1975, or the first
  two groups);
- ``de_one_vs_rest_batch_corrected.csv``: one-vs-rest with ``batch_correction=True``;
- ``de_one_vs_rest_vanilla.csv``: one-vs-rest in 1.5.1's default ``vanilla`` mode;
- with ``--rerun-seed R``, ``de_one_vs_rest_seed{R}.csv`` (the one-vs-rest call again, seeded
  R) and ``consistency.json``: per comparison, the Spearman correlation of ``lfc_mean`` between
  the two runs and the Jaccard index of their top-50 genes (scvi-tools' order, and |lfc_mean|),
  i.e. scvi-tools' own run-to-run noise.

``scvi.settings.seed`` is set to ``--seed`` before training and again before each DE call, so
each table is reproducible on its own. Every table has the gene name in a column ``gene``.
``timings.json`` has the seconds of training and of each DE call and the peak RSS.
Run with the scvi-tools virtualenv:

    /work/scvi-tools-venv/bin/python benchmarks/scvi_tools_de.py \\
        --data /work/shared/data/cellbench_5batch.h5ad --batch-key batch --groupby cell_type \\
        --epochs 200 --seed 0 --threads 2 --out /work/bench/de/scvi_tools --rerun-seed 1
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scvi
import torch
from scipy.stats import spearmanr


def write_table(df: pd.DataFrame, path: Path) -> None:
    df.rename_axis("gene").reset_index().to_csv(path, index=False)


def consistency(a: pd.DataFrame, b: pd.DataFrame, top: int = 50) -> dict:
    out = {}
    for comp, ga in a.groupby("comparison", sort=False):
        gb = b[b["comparison"] == comp]
        lfc_b = gb["lfc_mean"].reindex(ga.index)
        by_abs = lambda g: set(g["lfc_mean"].abs().sort_values(ascending=False).index[:top])  # noqa: E731
        jac = lambda x, y: len(x & y) / len(x | y)  # noqa: E731
        out[comp] = {
            "spearman_lfc_mean": float(spearmanr(ga["lfc_mean"], lfc_b).statistic),
            f"jaccard_top{top}_scvi_order": jac(set(ga.index[:top]), set(gb.index[:top])),
            f"jaccard_top{top}_abs_lfc_mean": jac(by_abs(ga), by_abs(gb)),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--groupby", default="cell_type")
    p.add_argument("--group1", default="A549")
    p.add_argument("--group2", default="H1975")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rerun-seed", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    timings: dict[str, float] = {}

    adata = ad.read_h5ad(args.data)
    scvi.model.SCVI.setup_anndata(adata, batch_key=args.batch_key)
    model = scvi.model.SCVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, train_size=0.9, batch_size=128, accelerator="cpu")
    timings["train_s"] = time.perf_counter() - t0
    model.save(str(out / "model"), overwrite=True, save_anndata=False)

    groups = adata.obs[args.groupby].astype("category").cat.categories.tolist()
    g1, g2 = (args.group1, args.group2) if {args.group1, args.group2} <= set(groups) else groups[:2]

    def de(name: str, seed: int, **kwargs) -> pd.DataFrame:
        scvi.settings.seed = seed
        t = time.perf_counter()
        df = model.differential_expression(groupby=args.groupby, silent=True, **kwargs)
        timings[f"{name}_s"] = time.perf_counter() - t
        write_table(df, out / f"{name}.csv")
        return df

    ovr = de("de_one_vs_rest", args.seed, mode="change")
    de("de_pairwise", args.seed, mode="change", group1=g1, group2=g2)
    de("de_one_vs_rest_batch_corrected", args.seed, mode="change", batch_correction=True)
    de("de_one_vs_rest_vanilla", args.seed, mode="vanilla")
    if args.rerun_seed is not None:
        rerun = de(f"de_one_vs_rest_seed{args.rerun_seed}", args.rerun_seed, mode="change")
        (out / "consistency.json").write_text(json.dumps(consistency(ovr, rerun), indent=2) + "\n")

    timings["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
