"""scvi-cli's `de` against scvi-tools 1.5.1's `differential_expression` on the same weights.

    python benchmarks/de_fidelity.py --work DIR [--data ../shared/data/cellbench_5batch.h5ad]
        [--scvi-tools-python ../scvi-tools-venv/bin/python] [--epochs 200] [--threads 2]

scvi-tools trains default scVI (batch key ``batch``) and runs its DE (benchmarks/scvi_tools_de.py,
cached in DIR/scvi_tools); scvi-cli imports that model (``import-model``) and runs ``de`` with
the same settings: one-vs-rest, A549 vs H1975, and one-vs-rest with ``--batch-correction``. Per
comparison it prints the Spearman correlation of ``lfc_mean`` and the Jaccard index of the top
50 genes (ranked by proba_de, ties by |lfc_mean|; and by |lfc_mean| alone), beside the same
figures between two scvi-tools runs with different seeds (scvi-tools' own sampling noise), and
the seconds and peak RSS of each tool's DE calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]


def top_genes(table: pd.DataFrame, n: int = 50, by_lfc: bool = False) -> set[str]:
    ranked = table.assign(abs_lfc=table["lfc_mean"].abs())
    keys = ["abs_lfc"] if by_lfc else ["proba_de", "abs_lfc"]
    return set(ranked.sort_values(keys, ascending=False, kind="stable")["gene"].head(n))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def compare(ours: pd.DataFrame, theirs: pd.DataFrame) -> dict[str, dict[str, float]]:
    result = {}
    for name, part in ours.groupby("comparison", sort=False):
        other = theirs[theirs["comparison"] == name].set_index("gene").loc[part["gene"]].reset_index()
        result[name] = {
            "spearman_lfc_mean": float(spearmanr(part["lfc_mean"], other["lfc_mean"])[0]),
            "jaccard_top50": jaccard(top_genes(part), top_genes(other)),
            "jaccard_top50_abs_lfc": jaccard(top_genes(part, by_lfc=True), top_genes(other, by_lfc=True)),
            "de_calls": f"{int(part['is_de_fdr_0.05'].sum())} / {int(other['is_de_fdr_0.05'].sum())}",
        }
    return result


def run_scvi_cli(args: list[str], threads: int) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one scvi-cli command in its own process."""
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "scvi_cli", *args, "--threads", str(threads), "-q"], check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - started, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cellbench_5batch.h5ad")
    parser.add_argument("--scvi-tools-python", default=os.environ.get("SCVI_TOOLS_PYTHON"))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    reference = args.work / "scvi_tools"
    if not (reference / "de_one_vs_rest.csv").exists():
        if not args.scvi_tools_python:
            sys.exit("no cached scvi-tools results: give --scvi-tools-python (or SCVI_TOOLS_PYTHON)")
        subprocess.run(
            [args.scvi_tools_python, str(ROOT / "benchmarks" / "scvi_tools_de.py"), "--data", str(args.data),
             "--epochs", str(args.epochs), "--threads", str(args.threads), "--out", str(reference), "--rerun-seed", "1"],
            check=True,
        )
    model = args.work / "imported.ckpt"
    subprocess.run([sys.executable, "-m", "scvi_cli", "import-model", str(reference / "model"), "--out", str(model)], check=True)
    runs = {
        "de_one_vs_rest": [],
        "de_pairwise": ["--group1", "A549", "--group2", "H1975"],
        "de_one_vs_rest_batch_corrected": ["--batch-correction"],
    }
    timings = json.loads((reference / "timings.json").read_text())
    report = {}
    for name, extra in runs.items():
        out = args.work / f"scvi_cli_{name}.csv"
        seconds, rss = run_scvi_cli(["de", str(model), str(args.data), "--groupby", "cell_type", "--out", str(out), *extra], args.threads)
        report[name] = {
            "comparisons": compare(pd.read_csv(out), pd.read_csv(reference / f"{name}.csv")),
            "scvi_cli_seconds": round(seconds, 1),
            "scvi_tools_seconds": round(timings.get(f"{name}_s", float("nan")), 1),
            "scvi_cli_peak_rss_mib": round(rss),
        }
    seed1 = reference / "de_one_vs_rest_seed1.csv"
    if seed1.exists():
        report["scvi_tools_seed0_vs_seed1"] = compare(pd.read_csv(reference / "de_one_vs_rest.csv"), pd.read_csv(seed1))
    report["scvi_tools_peak_rss_mib"] = timings.get("peak_rss_mib")
    (args.work / "de_fidelity.json").write_text(json.dumps(report, indent=1))
    for name, entry in report.items():
        if isinstance(entry, dict) and "comparisons" in entry:
            print(f"{name}: scvi-cli {entry['scvi_cli_seconds']} s (peak {entry['scvi_cli_peak_rss_mib']} MiB), "
                  f"scvi-tools {entry['scvi_tools_seconds']} s")
            rows = entry["comparisons"]
        elif isinstance(entry, dict):
            print(f"{name}:")
            rows = entry
        else:
            continue
        for comparison, figures in rows.items():
            print(f"  {comparison:<16} spearman {figures['spearman_lfc_mean']:.4f}  jaccard top50 "
                  f"{figures['jaccard_top50']:.3f}  (|lfc| {figures['jaccard_top50_abs_lfc']:.3f})  calls {figures['de_calls']}")
    print(f"wrote {args.work / 'de_fidelity.json'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
