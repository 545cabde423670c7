#!/usr/bin/env bash
# Install scvi-cli, then train scVI on the bundled 10x PBMC 4k dataset (4,271 cells x 2,000 genes)
# evaluate it and write its report. Everything goes to scvi-demo/ (or the folder given as first argument).
# usage: scripts/demo.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-scvi-demo}"
scripts/install.sh .venv test,report
mkdir -p "$out"
data=scvi_cli/datasets/scdcc_pbmc4k_top2000.h5ad
.venv/bin/scvi-cli train "$data" --spec example_configs/demo_pbmc4k.yaml --out "$out/pbmc4k.ckpt" --threads 2
.venv/bin/scvi-cli evaluate "$out/pbmc4k.ckpt" "$data" --threads 2 --n-mc-samples 20 | tee "$out/pbmc4k.evaluation.txt"
.venv/bin/scvi-cli report "$out/pbmc4k.ckpt" "$data" --out "$out/pbmc4k.report.html" --png-dir "$out/figures" \
    --color cell_type --labels-key cell_type --threads 2
echo "outputs in $out/: pbmc4k.ckpt (model), pbmc4k.history.csv (per-epoch metrics), pbmc4k.evaluation.txt,"
echo "pbmc4k.report.html (open it in a browser: model card, training curves, UMAP of the latent) and figures/*.png"
