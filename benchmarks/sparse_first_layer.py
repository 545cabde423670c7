"""The encoder's first layer, Linear(log1p(x)), on a CSR minibatch: dense against sparse paths.

Each call starts from the scipy CSR minibatch (B cells x G genes) and ends with the (B, out)
pre-activation, so every path pays for its own conversion:

    dense        x.toarray() -> torch, log1p, F.linear
    csr_mm       torch.sparse_csr_tensor of log1p values @ weight.T (torch autograd for training)
    eb_autograd  F.embedding_bag over the rows, embedding_bag's own backward (sparse=False)
    eb_csr_bwd   embedding_bag forward; weight grad X.T @ grad_out with torch.sparse CSR mm
    sparse_linear  scvi_cli.nn.sparse_input: embedding_bag forward; weight grad X.T @ grad_out
                 as a second embedding_bag over X's columns (CSC from scipy); nn.Linear's
                 usual row-major weight, so weight.T is copied per forward and per backward
    sparse_linear_cm  the same with a column-major weight (column_major_): no transposes

"inference" is the forward under torch.no_grad(); "training" is forward + backward of a random
upstream gradient w.r.t. weight and bias. Times are medians over blocks of calls; on shared
cores they are noisy, so compare ratios within one run.

    python benchmarks/sparse_first_layer.py [--threads 2] [--out 128] [--tail 0] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scvi_cli.nn.sparse_input import SparseRows, sparse_linear

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

CASES = [(128, 2000, 0.10), (1024, 2000, 0.10), (128, 9000, 0.05), (1024, 9000, 0.05)]


def make_counts(B, G, density, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(B, G, density=density, format="csr", random_state=seed, dtype=np.float32,
                  data_rvs=lambda n: rng.integers(1, 20, n))
    X.sort_indices()
    return X


def _tail_matrix(weight, G, tail):
    return None if tail is None else tail @ weight[:, G:].t()


def dense(X, weight, bias, tail):
    x = torch.log1p(torch.from_numpy(X.toarray()))
    if tail is not None:
        x = torch.cat([x, tail], 1)
    return F.linear(x, weight, bias)


def csr_mm(X, weight, bias, tail):
    rows = SparseRows.from_scipy(X)
    G = rows.n_cols
    csr = torch.sparse_csr_tensor(rows.indptr, rows.indices, torch.log1p(rows.values), (len(rows), G))
    out = csr @ weight[:, :G].t()
    out = out + bias
    return out if tail is None else out + _tail_matrix(weight, G, tail)


def eb_autograd(X, weight, bias, tail):
    rows = SparseRows.from_scipy(X)
    G = rows.n_cols
    out = F.embedding_bag(rows.indices, weight[:, :G].t().contiguous(), rows.indptr, mode="sum",
                          per_sample_weights=torch.log1p(rows.values), include_last_offset=True)
    out = out + bias
    return out if tail is None else out + _tail_matrix(weight, G, tail)


class _EbCsrBackward(torch.autograd.Function):
    """embedding_bag forward, weight grad = (X.T @ grad_out).T with torch.sparse CSR of X.T."""

    @staticmethod
    def forward(ctx, weight_g, rows):
        ctx.rows = rows
        return F.embedding_bag(rows.indices, weight_g.t().contiguous(), rows.indptr, mode="sum",
                               per_sample_weights=rows.values, include_last_offset=True)

    @staticmethod
    def backward(ctx, grad_out):
        rows = ctx.rows
        col_indptr, row_of_entry, perm = rows.csc()
        xt = torch.sparse_csr_tensor(col_indptr, row_of_entry, rows.values[perm], (rows.n_cols, len(rows)))
        return (xt @ grad_out.contiguous()).t(), None


def eb_csr_bwd(X, weight, bias, tail):
    rows = SparseRows.from_scipy(X).log1p()
    G = rows.n_cols
    out = _EbCsrBackward.apply(weight[:, :G], rows) + bias
    return out if tail is None else out + _tail_matrix(weight, G, tail)


def ours(X, weight, bias, tail):
    return sparse_linear(SparseRows.from_scipy(X).log1p(), weight, bias, tail)


PATHS = {"dense": dense, "csr_mm": csr_mm, "eb_autograd": eb_autograd, "eb_csr_bwd": eb_csr_bwd,
         "sparse_linear": ours, "sparse_linear_cm": ours}
COLUMN_MAJOR = {"sparse_linear_cm"}


def median_ms(fn, budget_s, blocks=7):
    fn()
    fn()
    started = time.perf_counter()
    fn()
    once = time.perf_counter() - started
    per_block = max(1, int(budget_s / blocks / max(once, 1e-6)))
    times = []
    for _ in range(blocks):
        started = time.perf_counter()
        for _ in range(per_block):
            fn()
        times.append((time.perf_counter() - started) / per_block * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=int, default=128, help="output width (n_hidden)")
    parser.add_argument("--tail", type=int, default=0, help="one-hot covariate columns after the genes")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per path and mode")
    parser.add_argument("--quick", action="store_true", help="only the two B=128 cases")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = CASES[::2] if args.quick else CASES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, out={args.out}, tail={args.tail}; "
          "ms per call (median), ratio = time / dense time (< 1 is faster than dense)")
    header = f"{'B':>5} {'G':>5} {'dens':>5} {'mode':<10} " + " ".join(f"{p:>20}" for p in PATHS)
    print(header)
    print("-" * len(header))
    for B, G, density in cases:
        X = make_counts(B, G, density)
        weight = torch.randn(args.out, G + args.tail).mul_(0.05).requires_grad_()
        weight_cm = weight.detach().t().contiguous().t().requires_grad_()  # same values, column-major
        bias = torch.randn(args.out).requires_grad_()
        tail = F.one_hot(torch.randint(0, args.tail, (B,)), args.tail).float() if args.tail else None
        upstream = torch.randn(B, args.out)

        with torch.no_grad():
            reference = dense(X, weight, bias, tail)
            for name, fn in PATHS.items():
                w = weight_cm if name in COLUMN_MAJOR else weight
                err = (fn(X, w, bias, tail) - reference).abs().max().item()
                assert err < 1e-3, f"{name} differs from dense by {err}"
        ref_grad = torch.autograd.grad(dense(X, weight, bias, tail), weight, upstream)[0]
        for name, fn in PATHS.items():
            w = weight_cm if name in COLUMN_MAJOR else weight
            err = (torch.autograd.grad(fn(X, w, bias, tail), w, upstream)[0] - ref_grad).abs().max().item()
            assert err < 1e-3, f"{name} weight gradient differs from dense by {err}"

        for mode in ("inference", "training"):
            timings = {}
            for name, fn in PATHS.items():
                w = weight_cm if name in COLUMN_MAJOR else weight
                if mode == "inference":
                    def call(fn=fn, w=w):
                        with torch.no_grad():
                            fn(X, w, bias, tail)
                else:
                    def call(fn=fn, w=w):
                        torch.autograd.backward(fn(X, w, bias, tail), upstream, inputs=[w, bias])
                        w.grad = bias.grad = None
                timings[name] = median_ms(call, args.budget)
            cells = " ".join(f"{t:9.3f} ms ({t / timings['dense']:5.2f}x)" for t in timings.values())
            print(f"{B:>5} {G:>5} {density:>5.2f} {mode:<10} {cells}")


if __name__ == "__main__":
    main()
