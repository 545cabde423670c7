"""Speed and peak memory of scvi-cli against scvi-tools 1.5.1 on CPU: train, embed, impute.

One command, run from the repository root with the scvi-cli virtualenv's Python:

    python benchmarks/speed.py --work DIR [--sizes 20k,100k] [--epochs 5] [--threads 2]
        [--scvi-tools-python ../scvi-tools-venv/bin/python] [--repeats 1] [--keep-outputs]

(``--scvi-tools-python`` defaults to the environment variable SCVI_TOOLS_PYTHON; without either,
only scvi-cli runs and the scvi-tools column of the table stays empty.)

Sizes (cached in DIR/data by ../shared/data/make_scaling_set.py, seed 0: real cells drawn
with replacement and binomially thinned; for speed and memory only, never for accuracy):

    tiny        2,000 cells x 2,000 genes from scdcc_pbmc4k_top2000.h5ad, no batch  (smoke test)
    tiny-batch  2,000 cells x 9,015 genes from kang_ifnb_ctrl_stim_2k.h5ad, batch_key=batch
    20k        20,000 cells x 2,000 genes from scdcc_pbmc4k_top2000.h5ad, no batch
    100k      100,000 cells x 9,015 genes from kang_ifnb_ctrl_stim_2k.h5ad, batch_key=batch (ctrl/stim)
    1m      1,000,000 cells x 2,000 genes from scdcc_pbmc4k_top2000.h5ad, no batch  (the GPU figure:
            ``--device cuda --sizes 1m --epochs 3`` without scvi-tools)

What is measured, per size, with both tools alternating which goes first job by job:

* train, batch size 128 and 1024, default scVI, ``--epochs`` epochs, train_size 0.9, CPU, N threads.
  scvi-cli runs ``scvi-cli train ... --threads N`` as a subprocess, its stderr lines stamped as
  they arrive; start-up is process start to the first step (the ``epoch 1/N`` line's arrival minus
  epoch 1's own seconds: interpreter, imports, reading the h5ad, building the model and the
  optimizer); the per-epoch seconds are the ``seconds`` column of
  MODEL.history.csv (the loop's own timer, a validation pass included if one ran); steady state is the median
  of epochs 2..N. scvi-tools runs a script (written to DIR/scvi_tools_job.py) in its own Python:
  ``SCVI.setup_anndata``, ``SCVI(adata)``, ``.train(...)`` with a Lightning callback stamping every
  epoch start; start-up is process start to the first training batch.
* embed and impute (``--library-size 1e4``) as whole commands on the batch-128 model: cells/s
  including interpreter start, imports, reading the model and the h5ad and writing a .npy.
  For scvi-tools the same whole command is a script that loads the saved model and calls
  ``get_latent_representation()`` / ``get_normalized_expression(library_size=1e4, return_numpy=True)``;
  the training script also times those two calls in-process.
* peak RSS of every process (``/usr/bin/time -v``, else ``getrusage(RUSAGE_CHILDREN)`` in a wrapper).
  The scvi-tools training script reports its peak before the in-process inference calls.
* the arithmetic floor of an epoch: matmul FLOPs of the default scVI (encoder G->128, 128->10 twice;
  decoder 10(+batches)->128, 128->G for px_scale and px_dropout; the library encoder and px_r are
  not evaluated by default in either tool), forward + 2 x backward, over a measured fp32 sgemm
  rate (2048^3 at N threads); and the same GEMMs timed one by one at the step's own shapes.

Validation: scvi-tools evaluates no validation ELBO unless asked (early stopping), scvi-cli by
default after every epoch; the benchmark trains scvi-cli as scvi-tools, with
``train.validation_every_n_epochs=null`` (``--cli-validation every-epoch`` times scvi-cli's own
default instead). scvi-cli trains with ``train.compile`` as ``--cli-compile`` says (default
``auto``: on the CPU with a C compiler, the likelihood through its native kernel, built in under a
second on first use and cached; ``false``: the eager passes). Inference batch: 1024 in scvi-cli and 128 in scvi-tools, their defaults
(``--scvi-tools-inference-batch-size`` changes the latter). Results: a Markdown table on stdout,
DIR/table.md, DIR/results.json (raw numbers), DIR/logs/<run>/ (every command's stderr, stamped).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SHARED_DATA = Path(os.environ.get("SCVI_CLI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SIZES = {
    "tiny": dict(source="scdcc_pbmc4k_top2000.h5ad", n_cells=2_000, n_genes=2_000, batch_key=None, n_batch=1),
    "tiny-batch": dict(source="kang_ifnb_ctrl_stim_2k.h5ad", n_cells=2_000, n_genes=9_015, batch_key="batch", n_batch=2),
    "20k": dict(source="scdcc_pbmc4k_top2000.h5ad", n_cells=20_000, n_genes=2_000, batch_key=None, n_batch=1),
    "100k": dict(source="kang_ifnb_ctrl_stim_2k.h5ad", n_cells=100_000, n_genes=9_015, batch_key="batch", n_batch=2),
    "1m": dict(source="scdcc_pbmc4k_top2000.h5ad", n_cells=1_000_000, n_genes=2_000, batch_key=None, n_batch=1),
}
TRAIN_BATCH_SIZES = (128, 1024)
TRAIN_SIZE = 0.9
N_HIDDEN, N_LATENT = 128, 10
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")

# ---------------------------------------------------------------------------------------------
# The scvi-tools side: one script, three modes (train / embed / impute), run in its own Python.
# Times are wall-clock (time.time()) relative to BENCH_T0, the parent's clock just before Popen.

SCVI_TOOLS_JOB = r'''
import json, os, resource, sys, time
T0 = float(os.environ["BENCH_T0"])
now = lambda: time.time() - T0
job = json.loads(sys.argv[1])
stamps = {"python_started": now()}
import numpy as np
import torch
torch.set_num_threads(job["threads"])
try:
    torch.set_num_interop_threads(job["threads"])
except RuntimeError:
    pass
import anndata
import lightning.pytorch as pl
import scvi
stamps["imported"] = now()
adata = anndata.read_h5ad(job["data"])
stamps["read"] = now()
scvi.settings.seed = 0
peak_kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = {"stamps": stamps, "scvi_tools": scvi.__version__, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "n_cells": adata.n_obs}
inference = {} if job["inference_batch_size"] is None else {"batch_size": job["inference_batch_size"]}

if job["mode"] == "train":
    scvi.model.SCVI.setup_anndata(adata, batch_key=job["batch_key"])
    model = scvi.model.SCVI(adata)
    stamps["model_built"] = now()

    class Stamps(pl.Callback):
        def __init__(self):
            self.epoch_starts, self.first_batch, self.train_end = [], None, None
        def on_train_epoch_start(self, trainer, module):
            self.epoch_starts.append(now())
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if self.first_batch is None:
                self.first_batch = now()
        def on_train_end(self, trainer, module):
            self.train_end = now()

    cb = Stamps()
    model.train(max_epochs=job["epochs"], batch_size=job["batch_size"], accelerator="cpu", devices=1,
                train_size=job["train_size"], callbacks=[cb])
    ends = cb.epoch_starts[1:] + [cb.train_end]
    result.update(
        first_step=cb.first_batch,
        epoch_seconds=[b - a for a, b in zip(cb.epoch_starts, ends)],
        train_end=cb.train_end,
        train_peak_rss_mib=peak_kib() / 1024,
        n_train=int(round(adata.n_obs * job["train_size"])),
    )
    if job.get("inference"):
        started = time.perf_counter()
        latent = model.get_latent_representation(**inference)
        result["latent_seconds"] = time.perf_counter() - started
        del latent
        started = time.perf_counter()
        normalized = model.get_normalized_expression(library_size=1e4, return_numpy=True, **inference)
        result["normalized_seconds"] = time.perf_counter() - started
        result["normalized_shape"] = list(normalized.shape)
        del normalized
        result["peak_rss_after_inference_mib"] = peak_kib() / 1024
    if job.get("save"):
        model.save(job["save"], overwrite=True)
else:
    model = scvi.model.SCVI.load(job["model"], adata=adata, accelerator="cpu")
    stamps["model_loaded"] = now()
    if job["mode"] == "embed":
        values = model.get_latent_representation(**inference)
    else:
        values = model.get_normalized_expression(library_size=1e4, return_numpy=True, **inference)
    stamps["computed"] = now()
    np.save(job["out"], np.asarray(values, dtype=np.float32))
    stamps["written"] = now()
    result["shape"] = list(values.shape)
with open(job["result"], "w") as fh:
    json.dump(result, fh)
'''

# The fallback peak-RSS wrapper when /usr/bin/time is missing: the child's ru_maxrss, in KiB.
RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def gnu_time() -> str | None:
    path = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if path is None:
        return None
    probe = subprocess.run([path, "-v", "true"], capture_output=True, text=True)
    return path if "Maximum resident set size" in probe.stderr else None


class Runner:
    """Runs one command with wall time, stderr lines stamped on arrival, and its peak RSS."""

    def __init__(self, work: Path, threads: int, probe: bool = True):
        self.probe, self.probes = probe, []
        if probe:
            import torch

            torch.set_num_threads(threads)
        self.logs = work / "logs" / time.strftime("%Y%m%d-%H%M%S")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.time = gnu_time()
        self.env = dict(os.environ, **{v: str(threads) for v in THREAD_VARIABLES}, PYTHONUNBUFFERED="1")
        self.count = 0

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        self.count += 1
        rss_file = self.logs / f"{self.count:02d}-{name}.rss"
        log_file = self.logs / f"{self.count:02d}-{name}.log"
        if self.time:
            full = [self.time, "-v", "-o", str(rss_file), *cmd]
        else:
            full = [sys.executable, "-c", RSS_WRAPPER, str(rss_file), *cmd]
        probe_before = contention_probe() if self.probe else None
        t0 = time.time()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(self.env, BENCH_T0=repr(t0), **(env or {})))
        lines: list[tuple[float, str]] = []

        def read_stderr():
            for line in proc.stderr:
                lines.append((time.time() - t0, line.rstrip("\n")))

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        stdout = proc.stdout.read()
        rc = proc.wait()
        wall = time.time() - t0
        reader.join()
        probe_after = contention_probe() if self.probe else None
        with open(log_file, "w") as fh:
            fh.write(" ".join(cmd) + "\n")
            fh.writelines(f"{t:9.3f} {text}\n" for t, text in lines)
            fh.write(stdout)
        if rc != 0:
            tail = "\n".join(text for _, text in lines[-15:])
            raise RuntimeError(f"{name}: exit {rc} (log {log_file}):\n{tail}")
        probes = [p for p in (probe_before, probe_after) if p is not None]
        self.probes.extend(probes)
        return {"wall_s": wall, "peak_rss_mib": self._peak(rss_file), "stderr": lines, "stdout": stdout,
                "log": str(log_file), "probe_gflops": probes}

    def _peak(self, rss_file: Path) -> float | None:
        text = rss_file.read_text() if rss_file.exists() else ""
        if self.time:
            for line in text.splitlines():
                if "Maximum resident set size" in line:
                    return int(line.rsplit(":", 1)[1]) / 1024
            return None
        return int(text) / 1024 if text.strip() else None


# ---------------------------------------------------------------------------------------------
# Data


def make_dataset(work: Path, size: str) -> Path:
    spec = SIZES[size]
    out = work / "data" / f"{size}.h5ad"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial.h5ad")
    print(f"[data] making {out} ({spec['n_cells']} cells from {spec['source']})", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(SHARED_DATA / "make_scaling_set.py"), str(SHARED_DATA / spec["source"]),
                    str(partial), str(spec["n_cells"]), "0"], check=True, stdout=subprocess.DEVNULL)
    partial.rename(out)
    return out


# ---------------------------------------------------------------------------------------------
# scvi-cli jobs


def spread(seconds: list[float]) -> float:
    """Slowest steady epoch over fastest: above SPREAD, other load hit the run during some epoch
    (bursts of it last seconds, so the probes around a command can miss them). Epoch 1 is left
    out where there are others: it carries each tool's warm-up (and scvi-cli's kernel build)."""
    steady_epochs = seconds[1:] if len(seconds) > 2 else seconds
    return max(steady_epochs) / min(steady_epochs)


def steady(seconds: list[float]) -> float:
    """Median of epochs 2..N (the first pays for allocation and warm-up); epoch 1 if that is all."""
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def read_history_seconds(path: Path) -> list[float]:
    with open(path, newline="") as fh:
        return [float(row["seconds"]) for row in csv.DictReader(fh)]


def first_line_time(lines: list[tuple[float, str]], prefix: str) -> float | None:
    return next((t for t, text in lines if text.startswith(prefix)), None)


def cli_train(runner: Runner, scvi_cli: str, data: Path, size: str, batch_size: int, args, out: Path) -> dict:
    cmd = [scvi_cli, "train", str(data), "--out", str(out), "--device", args.device, "--threads", str(args.threads),
           "--seed", "0", "--json", "--set", f"train.max_epochs={args.epochs}", "--set", f"train.batch_size={batch_size}"]
    if SIZES[size]["batch_key"]:
        cmd += ["--set", f"data.batch_key={SIZES[size]['batch_key']}"]
    if args.cli_validation == "none":
        cmd += ["--set", "train.validation_every_n_epochs=null"]
    cmd += ["--set", f"train.compile={args.cli_compile}"]
    r = runner.run(f"{size}-cli-train-b{batch_size}", cmd)
    seconds = read_history_seconds(out.with_name(out.stem + ".history.csv"))
    ready = first_line_time(r["stderr"], "training: epochs")  # printed just before fit()
    epoch_lines = [t for t, text in r["stderr"] if text.startswith("epoch ")]
    # Process start to the first step: the epoch-1 line's arrival minus epoch 1's own seconds.
    # (Between the "training:" line and the first step fit() builds the optimizer, and torch.optim's
    # first optimizer imports torch._dynamo: ~0.8 s with torch 2.13.)
    start = epoch_lines[0] - seconds[0] if epoch_lines else ready
    summary = json.loads(r["stdout"].strip().splitlines()[-1])
    return {
        "wall_s": r["wall_s"],
        "peak_rss_mib": r["peak_rss_mib"],
        "startup_s": start,
        "ready_line_s": ready,
        "epoch_seconds": seconds,
        "epoch_seconds_from_lines": [b - a for a, b in zip([start] + epoch_lines[:-1], epoch_lines)] if epoch_lines else None,
        "first_epoch_s": seconds[0],
        "steady_epoch_s": steady(seconds),
        "epoch_spread": spread(seconds),
        "after_last_epoch_s": r["wall_s"] - epoch_lines[-1] if epoch_lines else None,
        "n_train": summary["training"]["n_train"],
        "threads": summary["training"]["threads"],
        "log": r["log"], "probe_gflops": r["probe_gflops"],
    }


def cli_apply(runner: Runner, scvi_cli: str, command: str, model: Path, data: Path, size: str, args, out: Path) -> dict:
    cmd = [scvi_cli, command, str(model), str(data), "--out", str(out), "--device", args.device, "--threads", str(args.threads)]
    if command == "impute":
        cmd += ["--library-size", "1e4"]
    out.unlink(missing_ok=True)
    r = runner.run(f"{size}-cli-{command}", cmd)
    return finish_apply(r, out, SIZES[size]["n_cells"], args)


def finish_apply(r: dict, out: Path, n_cells: int, args) -> dict:
    import numpy as np

    shape = list(np.load(out, mmap_mode="r").shape)
    if not args.keep_outputs:
        out.unlink()
    return {"wall_s": r["wall_s"], "cells_per_s": n_cells / r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
            "shape": shape, "log": r["log"], "probe_gflops": r["probe_gflops"]}


# ---------------------------------------------------------------------------------------------
# scvi-tools jobs


def st_job(runner: Runner, python: str, work: Path, name: str, job: dict) -> tuple[dict, dict]:
    script = work / "scvi_tools_job.py"
    script.write_text(SCVI_TOOLS_JOB)
    job["result"] = str(runner.logs / f"{name}.json")
    r = runner.run(name, [python, str(script), json.dumps(job)])
    return r, json.loads(Path(job["result"]).read_text())


def st_train(runner, python, work, data, size, batch_size, args, save: Path | None) -> dict:
    job = dict(mode="train", data=str(data), batch_key=SIZES[size]["batch_key"], epochs=args.epochs,
               batch_size=batch_size, train_size=TRAIN_SIZE, threads=args.threads,
               inference=save is not None, save=str(save) if save else None,
               inference_batch_size=args.scvi_tools_inference_batch_size)
    r, res = st_job(runner, python, work, f"{size}-st-train-b{batch_size}", job)
    out = {
        "wall_s": r["wall_s"],
        "peak_rss_mib": res["train_peak_rss_mib"],
        "process_peak_rss_mib": r["peak_rss_mib"],
        "startup_s": res["first_step"],
        "stamps": res["stamps"],
        "epoch_seconds": res["epoch_seconds"],
        "first_epoch_s": res["epoch_seconds"][0],
        "steady_epoch_s": steady(res["epoch_seconds"]),
        "epoch_spread": spread(res["epoch_seconds"]),
        "after_last_epoch_s": r["wall_s"] - res["train_end"],
        "n_train": res["n_train"],
        "threads": res["threads"],
        "versions": {"scvi-tools": res["scvi_tools"], "torch": res["torch"]},
        "log": r["log"], "probe_gflops": r["probe_gflops"],
    }
    if "latent_seconds" in res:
        n = res["n_cells"]
        out.update(latent_in_process_cells_per_s=n / res["latent_seconds"],
                   normalized_in_process_cells_per_s=n / res["normalized_seconds"],
                   peak_rss_after_inference_mib=res["peak_rss_after_inference_mib"])
    return out


def st_apply(runner, python, work, command, model_dir: Path, data: Path, size: str, args, out: Path) -> dict:
    job = dict(mode=command, data=str(data), model=str(model_dir), out=str(out), threads=args.threads,
               inference_batch_size=args.scvi_tools_inference_batch_size)
    out.unlink(missing_ok=True)
    r, res = st_job(runner, python, work, f"{size}-st-{command}", job)
    result = finish_apply(r, out, SIZES[size]["n_cells"], args)
    result["stamps"] = res["stamps"]
    return result


# ---------------------------------------------------------------------------------------------
# The arithmetic floor


def linear_layers(n_genes: int, n_batch: int) -> list[tuple[int, int]]:
    """(in, out) of every Linear the default scVI evaluates in a training step."""
    batch_in = n_batch if n_batch > 1 else 0  # one-hot batch injected into the decoder's hidden layer
    return [
        (n_genes, N_HIDDEN), (N_HIDDEN, N_LATENT), (N_HIDDEN, N_LATENT),  # z encoder: hidden, mean, var
        (N_LATENT + batch_in, N_HIDDEN),  # decoder hidden layer
        (N_HIDDEN, n_genes), (N_HIDDEN, n_genes),  # px_scale, px_dropout (px_r is per gene, not a Linear)
    ]


def step_gemms(batch: int, layers: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(m, k, n) of each GEMM of forward + backward; the first layer needs no input gradient."""
    gemms = []
    for i, (fan_in, fan_out) in enumerate(layers):
        gemms.append((batch, fan_in, fan_out))  # forward  X W^T
        gemms.append((fan_out, batch, fan_in))  # dW = dY^T X
        if i > 0:
            gemms.append((batch, fan_out, fan_in))  # dX = dY W
    return gemms


def time_mm(m: int, k: int, n: int, block_seconds: float = 0.05, blocks: int = 5) -> float:
    """Seconds per (m,k) x (k,n) fp32 matmul: the best of ``blocks`` timed blocks (best-of, because
    other tenants of a shared machine only ever make it slower)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = math.inf
    for _ in range(blocks):
        reps, started = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            elapsed = time.perf_counter() - started
            if elapsed >= block_seconds and reps >= 3:
                break
        best = min(best, elapsed / reps)
    return best


def sgemm_rate(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    n = 2048
    seconds = time_mm(n, n, n, 0.3, 5)
    return {"n": n, "threads": threads, "seconds": seconds, "gflops": 2 * n**3 / seconds / 1e9}


def contention_probe() -> float:
    """GFLOP/s of a step-sized matmul (128 x 2000 x 128) for ~0.1 s, run around every command.

    On a machine whose cores are shared with other tenants (steal time not always reported), a
    2-thread GEMM of this size drops from ~300 to ~10 GFLOP/s when one core is taken: a low
    figure beside a timing means that timing was disturbed."""
    return 2 * 128 * 2000 * 128 / time_mm(128, 2000, 128, 0.02, 5) / 1e9


def step_gemm_seconds(size: str, batch_size: int) -> float:
    """Seconds of one training step's GEMMs alone, at their own shapes (best of 5 rounds; rounds
    outside, GEMMs inside, so one burst of other load cannot spoil every sample of a GEMM)."""
    spec = SIZES[size]
    gemms = step_gemms(batch_size, linear_layers(spec["n_genes"], spec["n_batch"]))
    best = [math.inf] * len(gemms)
    for _ in range(5):
        best = [min(b, time_mm(*g, 0.02, 1)) for b, g in zip(best, gemms)]
    return sum(best)


def measure_floor(sizes: list[str], threads: int, previous: dict | None = None) -> dict:
    """sgemm rate and per-step GEMM seconds; with ``previous``, the better of the two measurements
    (run once before and once after the tools, as other load only ever slows them)."""
    rate = sgemm_rate(threads)
    steps = {f"{s}/b{b}": step_gemm_seconds(s, b) for s in sizes for b in TRAIN_BATCH_SIZES}
    if previous:
        if previous["sgemm"]["gflops"] > rate["gflops"]:
            rate = previous["sgemm"]
        steps = {k: min(v, previous["step_gemm_s"][k]) for k, v in steps.items()}
    return {"sgemm": rate, "step_gemm_s": steps}


def floor_for(size: str, batch_size: int, n_train: int, n_validation: int, floor: dict) -> dict:
    spec = SIZES[size]
    rate = floor["sgemm"]
    layers = linear_layers(spec["n_genes"], spec["n_batch"])
    forward_per_cell = sum(2 * i * o for i, o in layers)
    train_flops = 3 * forward_per_cell * n_train  # forward + 2 x backward, per epoch
    validation_flops = forward_per_cell * n_validation
    steps = math.ceil(n_train / batch_size)
    step_seconds = floor["step_gemm_s"][f"{size}/b{batch_size}"]
    return {
        "layers": layers,
        "forward_flops_per_cell": forward_per_cell,
        "epoch_gflop": train_flops / 1e9,
        "epoch_gflop_exact": sum(2 * m * k * n for m, k, n in step_gemms(batch_size, layers)) * n_train / batch_size / 1e9,
        "validation_gflop": validation_flops / 1e9,
        "floor_epoch_s": train_flops / (rate["gflops"] * 1e9),
        "gemm_at_step_shapes_epoch_s": step_seconds * n_train / batch_size,
        "step_gemm_s": step_seconds,
        "steps_per_epoch": steps,
    }


# ---------------------------------------------------------------------------------------------
# The table


def fmt(value, digits=3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ratio(st, cli, higher_is_better: bool) -> str:
    if st is None or cli is None or st == 0 or cli == 0:
        return "—"
    value = cli / st if higher_is_better else st / cli
    return f"{value:.2f}x"


DISTURBED = 0.5  # a job whose contention probe fell below this fraction of the run's best is starred
SPREAD = 2.0  # ... and a training job whose slowest epoch took more than SPREAD x its fastest


def make_table(results: dict) -> str:
    rows = ["| work | scvi-tools | scvi-cli | ratio |", "|---|---|---|---|"]
    meta = results["meta"]
    best_probe = max(meta.get("probe_gflops") or [0.0]) or None
    starred = [False]

    def mark(job: dict | None) -> str:
        probes = (job or {}).get("probe_gflops") or []
        uneven = max(r.get("epoch_spread", 1.0) for r in (job or {}).get("repeats") or [job or {}]) > SPREAD
        if uneven or (best_probe and probes and min(probes) < DISTURBED * best_probe):
            starred[0] = True
            return "*"
        return ""
    for size, per in results["sizes"].items():
        spec = SIZES[size]
        where = (f"{size} ({spec['n_cells']:,} x {spec['n_genes']:,}"
                 + (f", {spec['n_batch']} batches" if spec["batch_key"] else "") + ")")
        st, cli = per.get("scvi-tools", {}), per["scvi-cli"]

        def row(label, key, job, higher=False, digits=3):
            a, b = st.get(job, {}).get(key), cli.get(job, {}).get(key)
            rows.append(f"| {where}: {label} | {fmt(a, digits)}{mark(st.get(job))} | "
                        f"{fmt(b, digits)}{mark(cli.get(job))} | {ratio(a, b, higher)} |")

        row("train start-up, process start to first step (s)", "startup_s", "train_b128")
        row("train first epoch, batch 128 (s)", "first_epoch_s", "train_b128")
        for b in TRAIN_BATCH_SIZES:
            row(f"train s/epoch, batch {b} (steady, median epochs 2..{meta['epochs']})", "steady_epoch_s", f"train_b{b}")
        row(f"train whole command, batch 128, {meta['epochs']} epochs (s)", "wall_s", "train_b128")
        for b in TRAIN_BATCH_SIZES:
            row(f"train peak RSS, batch {b} (MiB)", "peak_rss_mib", f"train_b{b}")
        row("embed whole command to .npy (cells/s)", "cells_per_s", "embed", higher=True)
        row("embed peak RSS (MiB)", "peak_rss_mib", "embed")
        row("impute --library-size 1e4 whole command to .npy (cells/s)", "cells_per_s", "impute", higher=True)
        row("impute peak RSS (MiB)", "peak_rss_mib", "impute")
        if st:
            t = st["train_b128"]
            rows.append(f"| {where}: latent in-process, scvi-tools only (cells/s) | "
                        f"{fmt(t.get('latent_in_process_cells_per_s'))} | — | — |")
            rows.append(f"| {where}: normalized expression 1e4 in-process, scvi-tools only (cells/s) | "
                        f"{fmt(t.get('normalized_in_process_cells_per_s'))} | — | — |")
        for b in TRAIN_BATCH_SIZES:
            f = per["floor"][f"b{b}"]
            for label, key in (("matmul floor", "floor_epoch_s"), ("GEMMs at step shapes", "gemm_at_step_shapes_epoch_s")):
                floor = f[key]
                a = st.get(f"train_b{b}", {}).get("steady_epoch_s")
                c = cli[f"train_b{b}"]["steady_epoch_s"]
                rows.append(f"| {where}: batch {b} s/epoch ÷ {label} ({fmt(floor)} s) | "
                            f"{fmt(a / floor if a else None)} | {fmt(c / floor)} | — |")
    rate = meta["sgemm"]
    notes = (f"\n{meta['threads']} CPU threads, {meta['epochs']} epochs, {meta['host_cpus']} CPUs on the host; "
             f"scvi-tools {meta.get('scvi_tools_version', '—')}, scvi-cli {meta['scvi_cli_version']}, torch {meta['torch']}. "
             f"Ratio: scvi-tools ÷ scvi-cli for seconds and MiB, scvi-cli ÷ scvi-tools for cells/s (above 1: scvi-cli better). "
             f"Matmul floor: {rate['gflops']:.1f} GFLOP/s fp32 ({rate['n']}³ sgemm, {rate['threads']} threads) "
             f"against 3 x forward FLOPs of the training cells. "
             + ("Neither tool runs a validation pass (scvi-tools' default; scvi-cli with train.validation_every_n_epochs=null)."
                if meta.get("cli_validation", "every-epoch") == "none" else
                "scvi-cli also runs a validation pass every epoch (its default), scvi-tools does not (its default).")
             + f" scvi-cli train.compile={meta.get('cli_compile', 'auto')}.")
    if best_probe:
        probes = meta["probe_gflops"]
        notes += (f" Contention probe (128 x 2000 x 128 matmul before and after every command): "
                  f"{min(probes):.0f}..{max(probes):.0f} GFLOP/s, median {statistics.median(probes):.0f}.")
        if starred[0]:
            notes += (f" * disturbed by other load on the machine (the probe around that command fell below "
                      f"{DISTURBED:.0%} of the best, or its slowest epoch took over {SPREAD:g}x its fastest): "
                      f"rerun (or raise --repeats) before quoting it.")
    return "\n".join(rows) + "\n" + notes + "\n"


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="work dir: cached data, models, logs, results")
    parser.add_argument("--sizes", default="20k,100k", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per run (>= 2 for a steady state)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="scvi-cli's --device (cuda for the GPU figures; scvi-tools stays on the CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="run every training job this many times (median)")
    parser.add_argument("--scvi-tools-python", default=os.environ.get("SCVI_TOOLS_PYTHON"),
                        help="Python with scvi-tools 1.5.1 (default: $SCVI_TOOLS_PYTHON; none: scvi-cli only)")
    parser.add_argument("--scvi-tools-inference-batch-size", type=int, default=None,
                        help="batch_size for scvi-tools' inference calls (default: its own, 128)")
    parser.add_argument("--scvi-cli", default=None, help="scvi-cli executable (default: the one beside this Python)")
    parser.add_argument("--cli-validation", choices=["none", "every-epoch"], default="none",
                        help="scvi-cli's validation passes while training: none, as scvi-tools by default (the "
                             "default here), or every-epoch, scvi-cli's own default")
    parser.add_argument("--cli-compile", choices=["auto", "true", "false"], default="auto",
                        help="scvi-cli's train.compile (default auto: the native likelihood kernel on the CPU "
                             "where a C compiler is found)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the embed/impute .npy files")
    args = parser.parse_args()

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    scvi_cli = args.scvi_cli or str(Path(sys.executable).parent / "scvi-cli")
    if not Path(scvi_cli).exists():
        scvi_cli = shutil.which("scvi-cli") or parser.error("scvi-cli not found; pass --scvi-cli")
    st_python = args.scvi_tools_python
    work = args.work.resolve()
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(parents=True, exist_ok=True)
    runner = Runner(work, args.threads)

    import torch

    from scvi_cli import __version__ as scvi_cli_version

    meta = {"epochs": args.epochs, "threads": args.threads, "repeats": args.repeats, "sizes": sizes,
            "cli_validation": args.cli_validation, "cli_compile": args.cli_compile,
            "scvi_cli_version": scvi_cli_version, "torch": torch.__version__,
            "host_cpus": os.cpu_count(), "rss_tool": runner.time or "getrusage wrapper",
            "scvi_tools_python": st_python, "logs": str(runner.logs), "scvi_tools_inference_batch_size": args.scvi_tools_inference_batch_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results = {"meta": meta, "sizes": {}}
    floor = measure_floor(sizes, args.threads)  # matmul floor, first of two measurements (see below)

    for i, size in enumerate(sizes):
        data = make_dataset(work, size)
        runs = {"scvi-cli": {}, "scvi-tools": {}} if st_python else {"scvi-cli": {}}
        models = {"scvi-cli": work / "models" / f"{size}.cli.ckpt", "scvi-tools": work / "models" / f"{size}.st"}
        jobs = [(f"train_b{b}", b) for b in TRAIN_BATCH_SIZES for _ in range(args.repeats)] + [("embed", None), ("impute", None)]
        samples: dict = {tool: {} for tool in runs}
        for j, (job, batch_size) in enumerate(jobs):
            order = list(runs) if (i + j) % 2 == 0 else list(runs)[::-1]
            for tool in order:
                print(f"[{size}] {tool} {job}", file=sys.stderr, flush=True)
                if job.startswith("train"):
                    first_b128 = job == "train_b128" and job not in samples[tool]
                    if tool == "scvi-cli":
                        out = models[tool] if first_b128 else work / "models" / f"{size}.cli.b{batch_size}.ckpt"
                        res = cli_train(runner, scvi_cli, data, size, batch_size, args, out)
                    else:
                        res = st_train(runner, st_python, work, data, size, batch_size, args,
                                       models[tool] if first_b128 else None)
                    samples[tool].setdefault(job, []).append(res)
                else:
                    out = work / "out" / f"{size}.{tool}.{job}.npy"
                    if tool == "scvi-cli":
                        res = cli_apply(runner, scvi_cli, job, models[tool], data, size, args, out)
                    else:
                        res = st_apply(runner, st_python, work, job, models[tool], data, size, args, out)
                    samples[tool][job] = [res]
        for tool in runs:
            for job, reps in samples[tool].items():
                summary = dict(reps[0])
                for key in ("startup_s", "first_epoch_s", "steady_epoch_s", "wall_s", "cells_per_s", "peak_rss_mib"):
                    values = [r[key] for r in reps if r.get(key) is not None]
                    if values:
                        summary[key] = statistics.median(values)
                summary["probe_gflops"] = [p for r in reps for p in r.get("probe_gflops", [])]
                summary["repeats"] = reps if len(reps) > 1 else None
                runs[tool][job] = summary
        results["sizes"][size] = runs
        if st_python:
            meta["scvi_tools_version"] = runs["scvi-tools"]["train_b128"]["versions"]["scvi-tools"]
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str))

    meta["probe_gflops"] = runner.probes
    # The floor again, once the tools are done; the better of the two measurements is kept.
    floor = measure_floor(sizes, args.threads, floor)
    rate = meta["sgemm"] = floor["sgemm"]
    print(f"[floor] sgemm {rate['n']}^3 at {args.threads} threads: {rate['gflops']:.1f} GFLOP/s", file=sys.stderr, flush=True)
    for size, runs in results["sizes"].items():
        n_train = runs["scvi-cli"]["train_b128"]["n_train"]
        n_validation = SIZES[size]["n_cells"] - n_train
        runs["floor"] = {f"b{b}": floor_for(size, b, n_train, n_validation, floor) for b in TRAIN_BATCH_SIZES}
    table = make_table(results)
    (work / "table.md").write_text(table)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(table)
    print(f"wrote {work / 'table.md'} and {work / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
