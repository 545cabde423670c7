#!/usr/bin/env bash
# The GPU check in one run: CUDA results against the CPU's, then the GPU speed figures.
#
# Made for a lent machine that has Python 3.12 with torch, scipy, h5py, pandas, typer, rich,
# pyyaml and pytest, but not anndata or pydantic, and no network:
#
#   bash benchmarks/gpu_check.sh prepare   # here, once: wheels for Python 3.12 into .whl/, the
#                                          # scaling-set script and its source into .gpu/
#   bash benchmarks/gpu_check.sh run       # there, with .whl and .gpu carried; results in $OUT
#
# `run` installs the wheels into /tmp/site, then
#   1. trains default scVI for 3 epochs on the bundled pbmc4k (3.8k cells x 2k genes) on the
#      GPU (precision 32, tf32, bf16-mixed) and on the CPU, and embeds and imputes with the same
#      GPU-trained model on both devices: the latent and the expression must agree to float
#      tolerance, the validation ELBOs within 2% (the two devices draw different noise);
#   2. runs benchmarks/speed.py on 1M x 2k cells (`--sizes 1m --device cuda`, 2 epochs): seconds
#      per epoch at batch 128 and 1024, start-up, embed and impute cells/s, peak RSS.
# Environment: GPU_CHECK_DEVICE (default cuda), GPU_CHECK_SIZE (default 1m), GPU_CHECK_EPOCHS
# (default 2), SKIP_WHEELS=1 to use the Python on PATH as it is (a CPU rehearsal here:
# `SKIP_WHEELS=1 GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=tiny OUT=/tmp/gpu bash benchmarks/gpu_check.sh run`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python="${PYTHON:-python3}"

prepare() {
    for folder in /.whl/ /.gpu/; do
        grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
    done
    mkdir -p .whl .gpu
    # anndata, pydantic (with everything they need) and isal: what the GPU image lacks, at the pinned versions
    local names=(anndata array-api-compat legacy-api-wrap natsort scverse-misc zarr numcodecs donfig
                 google-crc32c session-info2 pydantic pydantic_core annotated-types typing-inspection typing_extensions
                 isal)
    for name in "${names[@]}"; do
        pin=$(grep -i "^${name}==" requirements/constraints.txt)
        "$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$pin"
    done
    cp ../shared/data/make_scaling_set.py ../shared/data/scdcc_pbmc4k_top2000.h5ad .gpu/
    du -sh .whl .gpu
}

run() {
    local out="${OUT:-/tmp/gpu-check}" device="${GPU_CHECK_DEVICE:-cuda}"
    mkdir -p "$out"
    if [ "${SKIP_WHEELS:-0}" != 1 ]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    mkdir -p /tmp/site/bin
    printf '#!/usr/bin/env bash\nexec %s -m scvi_cli "$@"\n' "$(command -v "$python")" > /tmp/site/bin/scvi-cli
    chmod +x /tmp/site/bin/scvi-cli
    export PYTHONPATH="/tmp/site:$repo${PYTHONPATH:+:$PYTHONPATH}" SCVI_CLI_SHARED_DATA="$repo/.gpu" PYTHONUNBUFFERED=1
    local cli=/tmp/site/bin/scvi-cli data="$repo/scvi_cli/datasets/scdcc_pbmc4k_top2000.h5ad" work=/tmp/gpu-work
    mkdir -p "$work"
    { nvidia-smi || true; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
        2>&1 | tee "$out/machine.txt"

    echo "== 1. the GPU against the CPU (3 epochs on pbmc4k)" | tee "$out/check.log"
    for precision in 32 tf32 bf16-mixed; do
        [ "$device" = cpu ] && [ "$precision" != 32 ] && continue   # tf32 and bf16-mixed are GPU settings here
        "$cli" train "$data" --out "$work/gpu_$precision.ckpt" --device "$device" --seed 0 --quiet \
            --set train.max_epochs=3 --set train.precision="$precision" 2>&1 | tee -a "$out/check.log"
    done
    "$cli" train "$data" --out "$work/cpu.ckpt" --device cpu --threads 8 --seed 0 --quiet --set train.max_epochs=3 \
        2>&1 | tee -a "$out/check.log"
    for where in "$device" cpu; do
        "$cli" embed "$work/gpu_32.ckpt" "$data" --out "$work/z_$where.npy" --device "$where" --quiet
        "$cli" impute "$work/gpu_32.ckpt" "$data" --out "$work/x_$where.npy" --library-size 1e4 --device "$where" --quiet
    done
    "$python" - "$work" "$device" <<'PY' 2>&1 | tee -a "$out/check.log"
import csv, sys
import numpy as np
work, device = sys.argv[1], sys.argv[2]
def last_elbo(name):
    rows = list(csv.DictReader(open(f"{work}/{name}.history.csv")))
    return float(rows[-1]["elbo_validation"])
cpu = last_elbo("cpu")
failed = []
for precision in ("32", "tf32", "bf16-mixed"):
    try:
        value = last_elbo(f"gpu_{precision}")
    except FileNotFoundError:
        continue
    ok = abs(value / cpu - 1) < 0.02
    failed += [] if ok else [f"elbo {precision}"]
    print(f"validation ELBO after 3 epochs, {device} precision {precision}: {value:.2f} (CPU {cpu:.2f}, {value / cpu - 1:+.2%})", "ok" if ok else "FAILED")
for stem, label in (("z", "latent"), ("x", "expression (library 1e4)")):
    a, b = np.load(f"{work}/{stem}_{device}.npy"), np.load(f"{work}/{stem}_cpu.npy")
    error = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    ok = error < 1e-4
    failed += [] if ok else [label]
    print(f"{label}, {device} against CPU with the same weights: max |difference| / max |value| = {error:.2e}", "ok" if ok else "FAILED")
print("check:", "FAILED " + ", ".join(failed) if failed else "all ok")
PY

    echo "== 2. speed on ${GPU_CHECK_SIZE:-1m} cells, --device $device"
    "$python" benchmarks/speed.py --work /tmp/speed --sizes "${GPU_CHECK_SIZE:-1m}" --epochs "${GPU_CHECK_EPOCHS:-2}" \
        --device "$device" --threads 8 --scvi-cli "$cli" 2>&1 | tee "$out/speed.log"
    cp /tmp/speed/table.md /tmp/speed/results.json "$out/"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
