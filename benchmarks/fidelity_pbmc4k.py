"""Held-out likelihood of default scVI on scdcc_pbmc4k_top2000, against scvi-tools 1.5.1's figure.

Protocol (the same as the reference run): a fixed 90/10 cell split (numpy default_rng(0)
permutation; the first 10% held out), default scVI trained on the 90% with train_size 1.0,
batch size 128, 100 epochs; then per-cell negative ELBO and reconstruction NLL on the held-out
10%. scvi-tools 1.5.1 reaches 623.4 / 600.5 there (1.18 s per epoch on 2 CPU threads).

    python benchmarks/fidelity_pbmc4k.py [--data PATH] [--epochs 100] [--threads 2] [--workdir DIR]
        [--compile auto|true|false] [--compare-plain]

``--compile`` is the fast path's ``train.compile`` (auto, the default, and true: the likelihood
through its native kernel where a C compiler is found; false: the eager passes).

``--compare-plain`` also trains the same model from the same seed with the plain implementation
(dense minibatches, dense first layer, the reference likelihood formulas differentiated by
autograd) and reports the relative difference of the held-out figures; every model is
evaluated with the plain formulas.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import anndata as ad
import numpy as np

from scvi_cli.apply.evaluation import evaluate_model
from scvi_cli.progress import LineReporter
from scvi_cli.spec import load_spec
from scvi_cli.training.job import train_from_h5ad
from scvi_cli.trained_model import load_trained_model

REFERENCE = {"negative_elbo": 623.4, "reconstruction_nll": 600.5, "seconds_per_epoch": 1.18}
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "scvi_cli" / "datasets" / "scdcc_pbmc4k_top2000.h5ad"


def split(data: Path, workdir: Path) -> tuple[Path, Path]:
    adata = ad.read_h5ad(data)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    n_test = adata.n_obs // 10
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    train_path, test_path = workdir / "train90.h5ad", workdir / "test10.h5ad"
    adata[train].copy().write_h5ad(train_path)
    adata[test].copy().write_h5ad(test_path)
    return train_path, test_path


@contextlib.contextmanager
def plain_formulas():
    """Dense minibatches everywhere and -log_prob(x).sum(-1) as the training loss: the plain
    implementation that CSR minibatches, the sparse first layer and fused_nb_nll replace."""
    from scvi_cli.nn.likelihoods import NegativeBinomial, ZeroInflatedNegativeBinomial

    def plain_nll(self, x):
        return -self.log_prob(x).sum(-1)

    with contextlib.ExitStack() as stack:
        for target in ("scvi_cli.training.job.count_layout", "scvi_cli.apply.evaluation.count_layout"):
            stack.enter_context(mock.patch(target, lambda device: "dense"))
        for distribution in (NegativeBinomial, ZeroInflatedNegativeBinomial):
            stack.enter_context(mock.patch.object(distribution, "nll_per_cell", plain_nll))
        yield


def train_and_evaluate(train_path: Path, test_path: Path, spec, out: Path, threads: int, plain: bool) -> dict:
    started = time.perf_counter()
    with plain_formulas() if plain else contextlib.nullcontext():
        result = train_from_h5ad(train_path, spec, out, device="cpu", threads=threads, reporter=LineReporter(every=25))
    seconds = time.perf_counter() - started
    trained = load_trained_model(result.checkpoint_path)
    _, held_out = trained.load_query(test_path)
    with plain_formulas():
        metrics = evaluate_model(trained.module, held_out, n_mc_samples=0)
    return {**metrics, "seconds": seconds, "compiled_likelihood": result.training["compiled_likelihood"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto", help="the fast path's train.compile")
    parser.add_argument("--compare-plain", action="store_true", help="also train with the plain implementation")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scvi-cli-fidelity-"))
    workdir.mkdir(parents=True, exist_ok=True)
    train_path, test_path = split(args.data, workdir)
    spec = load_spec(None, [f"train.max_epochs={args.epochs}", "train.train_size=1.0", f"train.seed={args.seed}",
                            f"train.compile={args.compile}"])
    metrics = train_and_evaluate(train_path, test_path, spec, workdir / "model.ckpt", args.threads, plain=False)
    report = {
        "held_out_cells": metrics["n_cells"],
        "negative_elbo": round(metrics["negative_elbo"], 2),
        "reconstruction_nll": round(metrics["reconstruction_nll"], 2),
        "negative_elbo_ratio_to_scvi_tools": round(metrics["negative_elbo"] / REFERENCE["negative_elbo"], 4),
        "reconstruction_ratio_to_scvi_tools": round(metrics["reconstruction_nll"] / REFERENCE["reconstruction_nll"], 4),
        "seconds_per_epoch": round(metrics["seconds"] / args.epochs, 3),
        "epochs": args.epochs,
        "threads": args.threads,
        "seed": args.seed,
        "compiled_likelihood": metrics["compiled_likelihood"],
    }
    if args.compare_plain:
        plain = train_and_evaluate(train_path, test_path, spec, workdir / "plain.ckpt", args.threads, plain=True)
        report["plain"] = {
            "negative_elbo": round(plain["negative_elbo"], 2),
            "reconstruction_nll": round(plain["reconstruction_nll"], 2),
            "seconds_per_epoch": round(plain["seconds"] / args.epochs, 3),
            "negative_elbo_relative_difference": round(metrics["negative_elbo"] / plain["negative_elbo"] - 1, 5),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
