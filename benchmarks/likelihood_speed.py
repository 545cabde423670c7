"""ZINB / NB log-likelihood: scvi-cli's nonzero-only form against the dense reference formula.

The dense formula (REFERENCE.md) evaluates three lgammas on every entry; scvi-cli evaluates the
x-dependent terms on nonzero counts only. Both run here on the same tensors, forward + backward,
at single-cell sparsity; the script checks they agree and prints time ratios.

    python benchmarks/likelihood_speed.py [--cells 128] [--genes 2000] [--zeros 0.9] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from scvi_cli.nn.likelihoods import log_nb_positive, log_zinb_positive

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


def timed(fn, repeats):
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=128)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=1, help="leading Monte Carlo axis (evaluate uses 25)")
    parser.add_argument("--zeros", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.samples, args.cells, args.genes) if args.samples > 1 else (args.cells, args.genes)
    x = torch.poisson(torch.rand(args.cells, args.genes) * 4) * (torch.rand(args.cells, args.genes) > args.zeros)
    log_mu = (torch.randn(shape) - 1).requires_grad_()
    log_theta = torch.randn(args.genes).requires_grad_()
    pi = torch.randn(shape).requires_grad_()

    cases = {
        "zinb": (lambda: dense_zinb(x, log_mu.exp(), log_theta.exp(), pi), lambda: log_zinb_positive(x, log_mu.exp(), log_theta.exp(), pi)),
        "nb": (lambda: dense_nb(x, log_mu.exp(), log_theta.exp()), lambda: log_nb_positive(x, log_mu.exp(), log_theta.exp())),
    }
    print(f"{shape} entries, {float((x == 0).float().mean()):.0%} zeros, {args.threads} threads, forward+backward")
    for name, (dense, ours) in cases.items():
        torch.testing.assert_close(ours(), dense(), rtol=1e-5, atol=1e-4)
        t_dense = timed(lambda: dense().sum().backward(), args.repeats)
        t_ours = timed(lambda: ours().sum().backward(), args.repeats)
        print(f"{name:5s} dense {t_dense:7.2f} ms   scvi-cli {t_ours:7.2f} ms   speed-up x{t_dense / t_ours:.2f}")


if __name__ == "__main__":
    main()
