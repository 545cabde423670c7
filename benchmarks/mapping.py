"""Query mapping and label transfer: scvi-cli `map` against scvi-tools' `load_query_data`.

    python benchmarks/mapping.py --work DIR [--data ../shared/data/cellbench_5batch.h5ad]
        [--query-batch sc_dropseq] [--scvi-tools-python ../scvi-tools-venv/bin/python]
        [--ref-epochs 200] [--query-epochs 200] [--threads 2] [--k 15]

The data is split by batch: the reference is every batch but ``--query-batch``, the query that
batch. Three mappings of the same query, all with default freezing and the same epochs:

* scvi-tools: trains its reference, ``load_query_data``, trains the query
  (benchmarks/scvi_tools_mapping.py, cached in DIR/scvi_tools);
* scvi-cli: ``train`` on the reference, ``map`` the query;
* scvi-cli on scvi-tools' reference: ``import-model`` of that reference, then ``map``.

For each, reference and query cells are embedded with the query model and scored with
scvi_cli.apply.integration: label transfer accuracy (a k-NN vote of reference labels, k=15, on
the query's true labels), mixing of query with reference (mixing_entropy of the two sides, k=50,
and its value for randomly mixed neighbourhoods, the proportions' entropy) and of all batches, and
label purity (k=15) of all cells.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scvi_cli.apply.integration import label_purity, mixing_entropy, proportions_entropy, transfer_by_vote  # noqa: E402


def scvi_cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scvi_cli", *map(str, args)], check=True)
    return time.perf_counter() - started


def scores(ref_z, ref_obs, query_z, query_obs, batch_key, labels_key, k) -> dict:
    predicted, share = transfer_by_vote(ref_z, ref_obs[labels_key].astype(str).to_numpy(), query_z, k)
    truth = query_obs[labels_key].astype(str).to_numpy()
    both = np.concatenate([ref_z, query_z])
    side = np.repeat(["reference", "query"], [len(ref_z), len(query_z)])
    batches = np.concatenate([ref_obs[batch_key].astype(str), query_obs[batch_key].astype(str)])
    labels = np.concatenate([ref_obs[labels_key].astype(str), truth])
    return {
        "label_transfer_accuracy": float(np.mean(predicted == truth)),
        "mean_vote_share": float(share.mean()),
        "mixing_query_reference": mixing_entropy(both, side, k=50),
        "mixing_query_reference_if_random": proportions_entropy(side),
        "mixing_batches": mixing_entropy(both, batches, k=50),
        "mixing_batches_if_random": proportions_entropy(batches),
        "label_purity": label_purity(both, labels, k=15),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cellbench_5batch.h5ad")
    parser.add_argument("--batch-key", default="batch")
    parser.add_argument("--labels-key", default="cell_type")
    parser.add_argument("--query-batch", default="sc_dropseq")
    parser.add_argument("--scvi-tools-python", default=os.environ.get("SCVI_TOOLS_PYTHON"))
    parser.add_argument("--ref-epochs", type=int, default=200)
    parser.add_argument("--query-epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=15)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    theirs = work / "scvi_tools"
    if not (theirs / "latent_query.npy").exists():
        if not args.scvi_tools_python:
            sys.exit("no cached scvi-tools results: give --scvi-tools-python (or SCVI_TOOLS_PYTHON)")
        subprocess.run(
            [args.scvi_tools_python, str(ROOT / "benchmarks" / "scvi_tools_mapping.py"), "--data", str(args.data),
             "--batch-key", args.batch_key, "--labels-key", args.labels_key, "--query-batch", args.query_batch,
             "--ref-epochs", str(args.ref_epochs), "--query-epochs", str(args.query_epochs), "--seed", str(args.seed),
             "--threads", str(args.threads), "--out", str(theirs)],
            check=True,
        )
    adata = ad.read_h5ad(args.data)
    in_query = (adata.obs[args.batch_key].astype(str) == args.query_batch).to_numpy()
    ref_path, query_path = work / "reference.h5ad", work / "query.h5ad"
    adata[~in_query].copy().write_h5ad(ref_path)
    adata[in_query].copy().write_h5ad(query_path)
    ref_obs, query_obs = adata.obs[~in_query], adata.obs[in_query]

    common = ["--threads", str(args.threads), "-q"]
    query_set = ["--set", f"train.max_epochs={args.query_epochs}", "--seed", str(args.seed)]
    timings = {}
    timings["scvi_cli_reference_train_s"] = scvi_cli(
        "train", ref_path, "--out", work / "reference.ckpt", "--set", f"data.batch_key={args.batch_key}",
        "--set", f"train.max_epochs={args.ref_epochs}", "--seed", str(args.seed), *common,
    )
    timings["scvi_cli_map_s"] = scvi_cli("map", work / "reference.ckpt", query_path, "--out", work / "query.ckpt", *query_set, *common)
    scvi_cli("import-model", theirs / "reference_model", "--out", work / "scvi_tools_reference.ckpt")
    timings["scvi_cli_map_imported_s"] = scvi_cli(
        "map", work / "scvi_tools_reference.ckpt", query_path, "--out", work / "query_on_imported.ckpt", *query_set, *common
    )
    results = {}
    for name, model in (("scvi-cli", work / "query.ckpt"), ("scvi-cli on scvi-tools' reference", work / "query_on_imported.ckpt")):
        for part, path in (("ref", ref_path), ("query", query_path)):
            scvi_cli("embed", model, path, "--out", work / f"{model.stem}.{part}.npy", *common)
        results[name] = scores(
            np.load(work / f"{model.stem}.ref.npy"), ref_obs, np.load(work / f"{model.stem}.query.npy"), query_obs,
            args.batch_key, args.labels_key, args.k,
        )
    their_rows = {}  # scvi-tools' latents, in this script's cell order
    for part, obs in (("reference", ref_obs), ("query", query_obs)):
        order = pd.read_csv(theirs / f"obs_{part}.csv", index_col=0).index.get_indexer(obs.index.astype(str))
        if (order < 0).any():
            sys.exit(f"{theirs}: obs_{part}.csv does not hold the same cells")
        their_rows[part] = np.load(theirs / f"latent_{part}.npy")[order]
    their_ref_z, their_query_z = their_rows["reference"], their_rows["query"]
    results["scvi-tools"] = scores(their_ref_z, ref_obs, their_query_z, query_obs, args.batch_key, args.labels_key, args.k)
    timings.update({f"scvi_tools_{k}": v for k, v in json.loads((theirs / "timings.json").read_text()).items()})
    report = {"query_batch": args.query_batch, "n_reference": int((~in_query).sum()), "n_query": int(in_query.sum()),
              "results": results, "timings": timings}
    (work / "mapping.json").write_text(json.dumps(report, indent=1))
    print(f"query {args.query_batch}: {report['n_query']} cells onto {report['n_reference']} reference cells")
    print(f"{'':36} {'accuracy':>9} {'mix q/ref':>10} {'(random)':>9} {'mix batch':>10} {'(random)':>9} {'purity':>7}")
    for name, r in results.items():
        print(f"{name:36} {r['label_transfer_accuracy']:9.3f} {r['mixing_query_reference']:10.3f} "
              f"{r['mixing_query_reference_if_random']:9.3f} {r['mixing_batches']:10.3f} {r['mixing_batches_if_random']:9.3f} "
              f"{r['label_purity']:7.3f}")
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
