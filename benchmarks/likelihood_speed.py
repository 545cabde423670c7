"""ZINB / NB negative log-likelihood, forward + backward: dense reference vs scvi-cli's paths.

Up to six ways to get the per-cell NLL (summed over genes) and its gradients w.r.t. log mu, log theta
(per gene, or per cell with --theta-per-cell) and the zero-inflation logits:

* ``dense``      the REFERENCE.md formula verbatim, three lgammas on every entry, autograd backward;
* ``nonzero``    ``log_zinb_positive`` / ``log_nb_positive`` (lgammas on nonzero counts only), autograd;
* ``fused-mu``   ``fused_nb_nll(x, mu, ...)``: fused forward, analytic backward, mu = exp(log mu);
* ``fused-log``  ``fused_nb_nll(x, None, ..., log_mu=...)``: the same, differentiating log mu directly;
* ``fused-csr``  ``fused-log`` on the counts as CSR rows (SparseRows), as training passes them;
* ``kernel``     ``fused-csr`` through the native kernel (``compiled_likelihood()``, what
  ``train.compile`` turns on; nn/native.py); its first call, the build, is part of the correctness
  check. The CSR cases need 2-d shapes (no ``--samples``).

Each is checked against ``dense`` first, then timed interleaved (so that load from other processes
hits all of them alike); the script prints the median and the best of the repeats and the dense /
method ratio of the medians, the bytes autograd keeps for the backward (saved tensors), and the
largest error of value and gradients against the dense formula in float64, relative to the largest
magnitude of each.
Timings on shared cores are noisy: compare the ratios, and rerun if the medians and the bests differ
a lot.

    python benchmarks/likelihood_speed.py [--cells 128,1024] [--genes 2000] [--zeros 0.9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scvi_cli.nn.likelihoods import compiled_likelihood, fused_nb_nll, log_nb_positive, log_zinb_positive
from scvi_cli.nn.sparse_input import SparseRows

EPS = 1e-8


def dense_nb(x, mu, theta):
    log_theta_mu = torch.log(theta + mu + EPS)
    return (theta * (torch.log(theta + EPS) - log_theta_mu) + x * (torch.log(mu + EPS) - log_theta_mu)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def dense_zinb(x, mu, theta, pi):
    log_theta_mu = torch.log(theta + mu + EPS)
    sp = F.softplus(-pi)
    a = -pi + theta * (torch.log(theta + EPS) - log_theta_mu)
    zero = F.softplus(a) - sp
    positive = (-sp + a + x * (torch.log(mu + EPS) - log_theta_mu)
                + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    return torch.where(x < EPS, zero, positive)


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of ``fn()``."""
    seen = {}

    def pack(t):
        if t.numel():
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def through_kernel(fn):
    """``fn`` evaluated inside ``compiled_likelihood()`` (the native kernel)."""
    def call():
        with compiled_likelihood():
            return fn()

    return call


def make_cases(x, log_mu, log_theta, pi):
    zinb = {
        "dense": lambda: -dense_zinb(x, log_mu.exp(), log_theta.exp(), pi).sum(-1),
        "nonzero": lambda: -log_zinb_positive(x, log_mu.exp(), log_theta.exp(), pi).sum(-1),
        "fused-mu": lambda: fused_nb_nll(x, log_mu.exp(), log_theta.exp(), pi),
        "fused-log": lambda: fused_nb_nll(x, None, log_theta.exp(), pi, log_mu=log_mu),
    }
    nb = {
        "dense": lambda: -dense_nb(x, log_mu.exp(), log_theta.exp()).sum(-1),
        "nonzero": lambda: -log_nb_positive(x, log_mu.exp(), log_theta.exp()).sum(-1),
        "fused-mu": lambda: fused_nb_nll(x, log_mu.exp(), log_theta.exp()),
        "fused-log": lambda: fused_nb_nll(x, None, log_theta.exp(), log_mu=log_mu),
    }
    if log_mu.dim() == 2:
        rows = SparseRows.from_dense(x)
        zinb["fused-csr"] = lambda: fused_nb_nll(rows, None, log_theta.exp(), pi, log_mu=log_mu)
        zinb["kernel"] = through_kernel(zinb["fused-csr"])
        nb["fused-csr"] = lambda: fused_nb_nll(rows, None, log_theta.exp(), log_mu=log_mu)
        nb["kernel"] = through_kernel(nb["fused-csr"])
    return {"zinb": zinb, "nb": nb}


def grads_of(fn, params):
    for p in params:
        p.grad = None
    value = fn()
    value.sum().backward()
    return value.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def run(cells, args):
    torch.manual_seed(0)
    genes = args.genes
    shape = (args.samples, cells, genes) if args.samples > 1 else (cells, genes)
    x = torch.poisson(torch.rand(cells, genes) * 4) * (torch.rand(cells, genes) > args.zeros)
    log_mu = (torch.randn(shape) - 1).requires_grad_()
    log_theta = torch.randn(shape if args.theta_per_cell else (genes,)).requires_grad_()
    pi = torch.randn(shape).requires_grad_()
    params = [log_mu, log_theta, pi]
    print(f"\n{tuple(shape)} entries, {float((x == 0).float().mean()):.0%} zeros, theta {tuple(log_theta.shape)}, "
          f"{torch.get_num_threads()} threads, forward + backward, {args.repeats} interleaved repeats")
    params64 = [p.detach().double().requires_grad_() for p in params]
    references = make_cases(x.double(), *params64)
    for family, cases in make_cases(x, log_mu, log_theta, pi).items():
        # correctness first (also the warm-up): each method in float32 against the dense formula in
        # float64, on the scale of each output (the float32 dense formula itself is off by ~1e-4 of
        # the theta gradient's scale where theta is large)
        ref_value, ref_grads = grads_of(references[family]["dense"], params64)
        errors = {}
        for name, fn in cases.items():
            value, grads = grads_of(fn, params)
            errors[name] = max(
                float((got.double() - want).abs().max() / want.abs().max())
                for got, want in zip([value, *grads], [ref_value, *ref_grads])
                if want is not None
            )
            assert errors[name] < 2e-3, f"{family} {name}: error {errors[name]:.1e} against float64"
        times = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                for p in params:
                    p.grad = None
                started = time.perf_counter()
                fn().sum().backward()
                times[name].append((time.perf_counter() - started) * 1000)
        dense_median = statistics.median(times["dense"])
        for name, ts in times.items():
            median = statistics.median(ts)
            saved = saved_bytes(cases[name]) / 2**20
            print(f"  {family:4s} {name:9s} median {median:7.2f} ms  best {min(ts):7.2f} ms  "
                  f"dense/this x{dense_median / median:5.2f}  saved {saved:5.1f} MiB  error {errors[name]:.0e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="128,1024", help="comma-separated batch sizes")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=1, help="leading Monte Carlo axis (evaluate uses 25)")
    parser.add_argument("--zeros", type=float, default=0.9)
    parser.add_argument("--theta-per-cell", action="store_true", help="theta of the full shape ('gene-cell')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for cells in (int(c) for c in args.cells.split(",")):
        run(cells, args)


if __name__ == "__main__":
    main()
