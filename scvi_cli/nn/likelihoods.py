"""Count likelihoods of the scVI family: log-probabilities, means and samplers.

``mu`` is the mean, ``theta`` the inverse dispersion (NB variance ``mu + mu^2 / theta``),
``pi_logits`` the zero-inflation logits. The log-probabilities follow the reference formulas
(eps = 1e-8 inside the logs) and are written to stay finite for tiny or huge theta and mu.

``log_prob`` of the distribution classes is that plain formula (queries, evaluation); their
``nll_per_cell`` is the training loss ``-log_prob(x).sum(-1)`` through :func:`fused_nb_nll`, a fused
forward with an analytic backward.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from scvi_cli.nn import native
from scvi_cli.nn.sparse_input import SparseRows

EPS = 1e-8


def _log_nb_normaliser(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """lgamma(x + theta) - lgamma(theta) - lgamma(x + 1), at the broadcast shape of x and theta.

    The term is exactly zero where x == 0, and single-cell counts are mostly zeros, so the three
    lgammas (the bulk of the likelihood's cost) are evaluated on the nonzero entries only. It does
    not depend on mu, so with a per-gene theta it is computed once per cell, not once per
    Monte Carlo sample of mu.
    """
    shape = torch.broadcast_shapes(x.shape, theta.shape)
    x = x.expand(shape)
    index = torch.nonzero(x, as_tuple=True)
    x_nz, theta_nz = x[index], theta.expand(shape)[index]
    values = torch.lgamma(x_nz + theta_nz) - torch.lgamma(theta_nz) - torch.lgamma(x_nz + 1)
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_put(index, values)


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Elementwise log NB(x; mu, theta)."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + _log_nb_normaliser(x, theta)
    )


def log_zinb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """Elementwise log of the mixture ``sigmoid(pi) * delta_0 + sigmoid(-pi) * NB(mu, theta)``.

    With ``sp = softplus(-pi) = -log sigmoid(-pi)`` and ``a = -pi + theta log(theta/(theta+mu))``:
    ``log p(0) = log(sigmoid(pi) + sigmoid(-pi) NB(0)) = softplus(a) - sp`` and, for x > 0,
    ``log p(x) = -sp + a + x log(mu/(theta+mu)) + lgamma terms = log sigmoid(-pi) + log NB(x)``;
    both forms avoid exp of large numbers.
    """
    log_theta_mu = torch.log(theta + mu + eps)
    a = theta * (torch.log(theta + eps) - log_theta_mu) - pi_logits
    positive = a + x * (torch.log(mu + eps) - log_theta_mu)
    return torch.where(x < eps, F.softplus(a), positive) - F.softplus(-pi_logits) + _log_nb_normaliser(x, theta)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Elementwise log Poisson(x; mu), with 0 * log(0) = 0."""
    return torch.xlogy(x, mu) - mu - torch.lgamma(x + 1)


# --------------------------------------------------------------------------------------------
# Fused NB / ZINB negative log-likelihood for training
# --------------------------------------------------------------------------------------------
#
# Notation (elementwise, broadcast shape ``(..., G)``), with ``te = theta + eps``:
#   u  = mu / te,  l1 = log1p(u) = log(theta + mu + eps) - log(theta + eps)   (exact identity),
#   q  = 1 / (1 + u) = te / (theta + mu + eps),  s = theta / te.
# The reference formulas then read
#   NB:   ll = -theta * l1 + x * (log(mu + eps) - log(te) - l1) + lg(x, theta)
#   ZINB: with b = pi + theta * l1 (= -a of the reference): x == 0: softplus(-b) - softplus(-pi);
#         x > 0: ll_NB - softplus(-pi) - pi.
# Summing over genes, ``softplus(-b) - softplus(-pi) = softplus(b) - softplus(pi) - theta * l1``
# on every entry, and a nonzero entry adds ``-softplus(b) + x * (...) + lg``, so the dense part is
# a handful of elementwise passes plus row sums, and everything that depends on x (the log mu
# term, the lgammas, the digammas of the backward) runs on the nonzero counts only.
# Derivatives of ll (w = sigmoid(-b) at zeros, w = 1 at nonzero counts; w = 1 everywhere for NB):
#   d/dmu     = -w * s * q + [x > 0] * x * (1 / (mu + eps) - q / te)
#   d/dlog_mu = -w * theta * (1 - q) + [x > 0] * x * q          (log_mu path, see below)
#   d/dtheta  = -w * (l1 - s * (1 - q)) + [x > 0] * (dg(x, theta) - x * q / te)
#   d/dpi     = sigmoid(b) - sigmoid(pi)   at zeros,   -sigmoid(pi)   at nonzero counts,
# with dg = digamma(x + theta) - digamma(theta). The forward multiplies these out (negated, as
# the function returns the NLL) and saves only them; the backward scales them by the incoming
# per-cell gradient and reduces them to the parameters' shapes.


def _flat_source(t: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """A flat tensor ``f`` and modulus ``m`` with ``t.expand(shape).reshape(-1)[i] == f[i % m]``.

    Exact without copying for t whose shape (less leading 1s) is a suffix of ``shape``: theta (G,)
    against (B, G), x (B, G) against Monte Carlo (S, B, G); anything else is materialised once.
    """
    lead = 0
    while lead < t.dim() and t.shape[lead] == 1:
        lead += 1
    core = t.reshape(t.shape[lead:])
    if tuple(core.shape) == tuple(shape[len(shape) - core.dim():]):
        return core.contiguous().view(-1), max(core.numel(), 1)
    full = t.expand(shape).contiguous().view(-1)
    return full, full.numel()


def _row_dot(dense: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of ``dense * weight``; a matrix-vector product for a (G,) weight."""
    if weight.dim() == 1:
        return dense @ weight
    return (dense * weight).sum(-1)


def _softplus_difference_rows(b: torch.Tensor, pi: torch.Tensor):
    """``(F.softplus(b) - F.softplus(pi)).sum(-1)`` with ``sigmoid(b)`` and ``sigmoid(pi)``, which
    the derivatives need anyway: ``softplus(t) = max(t, 0) - log sigmoid(|t|)`` and
    ``sigmoid(|t|) = max(sigmoid(t), 1 - sigmoid(t))``, so the two softpluses share one log1p of
    ``(s_pi - s_b) / s_b`` (both in [1/2, 1]: the difference is exact) and no exp. On the CPU,
    sigmoid is vectorised at about half the cost of exp, and this is 2 transcendental passes
    where separate softpluses and sigmoids took 6. Each entry is within about 1e-7 of the
    softplus form (where 1 - sigmoid(t) rounds)."""
    sig_b, sig_pi = torch.sigmoid(b), torch.sigmoid(pi)
    s_b = torch.rsub(sig_b, 1)
    torch.maximum(s_b, sig_b, out=s_b)  # sigmoid(|b|)
    s_pi = torch.rsub(sig_pi, 1)
    torch.maximum(s_pi, sig_pi, out=s_pi)  # sigmoid(|pi|)
    rows = s_pi.sub_(s_b).div_(s_b).log1p_().sum(-1)  # sum log(sigmoid(|pi|) / sigmoid(|b|))
    rows += torch.clamp_min(b, 0, out=s_pi).sum(-1)
    rows -= torch.clamp_min(pi, 0, out=s_b).sum(-1)
    return rows, sig_b, sig_pi


def _dense_terms(loc, theta, inv_te, pi_logits, idx, loc_is_log, need_loc, need_theta, need_pi):
    """Dense part of the NLL's log p summed over genes, and the dense parts of the local derivatives.

    ``log p`` rows: ``sum_g -theta l1 [+ softplus(b) - softplus(pi)]``; the derivatives use w = 1 at
    the flat indices ``idx`` (nonzero counts). Hand-scheduled: in-place where possible, since every
    fresh B x G buffer costs page faults on top of its pass.
    """
    zinb = pi_logits is not None
    u = loc.exp().mul_(inv_te) if loc_is_log else loc * inv_te  # mu / (theta + eps)
    l1 = torch.log1p(u)  # log(theta + mu + eps) - log(theta + eps)
    ll_rows = -_row_dot(l1, theta)
    if zinb:
        b = torch.addcmul(pi_logits, l1, theta)  # -a of the reference formula
        softplus_rows, sig_b, sig_pi = _softplus_difference_rows(b, pi_logits.expand(loc.shape))
        ll_rows += softplus_rows
    if not (need_loc or need_theta or need_pi):
        return ll_rows, None, None, None

    one_minus_q = u.div_(u + 1)  # mu / (theta + mu + eps); u is consumed
    s = theta * inv_te
    d_pi = d_theta = d_loc = None
    if zinb:
        sig_b.view(-1).index_fill_(0, idx, 0.0)  # 1 - w: sigmoid(b) at zeros, w = 1 at nonzero counts
        if need_pi:
            d_pi = sig_pi.sub_(sig_b)
    if need_theta:
        d_theta = l1.addcmul_(one_minus_q, s, value=-1)  # l1 - s (1 - q); l1 is consumed
        if zinb:
            d_theta.addcmul_(sig_b, d_theta, value=-1)  # times w
    if need_loc:
        # log_mu: theta (1 - q); mu: s q
        d_loc = one_minus_q.mul_(theta) if loc_is_log else torch.addcmul(s, s, one_minus_q, value=-1)
        if zinb:
            d_loc.addcmul_(sig_b, d_loc, value=-1)  # times w
    return ll_rows, d_loc, d_theta, d_pi


def _broadcast_shape(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` in plain Python: the same result without its per-call cost
    (tens of microseconds, paid on every training step)."""
    ndim = max(len(shape) for shape in shapes)
    out = [1] * ndim
    for shape in shapes:
        for axis, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[axis] not in (1, size):
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[axis] = size
    return torch.Size(out)


def _nonzero_entries(x, shape: torch.Size):
    """The nonzero counts of ``x`` broadcast to ``shape``, the one pass over x the NLL needs.

    Returns ``(idx, values, rows, cols, csr)``: flat indices into ``shape``, the counts there,
    the row (over all leading axes flattened) and the gene of each entry, and ``x`` itself when
    the entries are exactly its stored ones in order (CSR counts of the full shape without stored
    zeros), so that per-row sums are ``x.sum_rows``; else None. For CSR counts (SparseRows) rows
    and genes come from the CSR structure; stored zeros are dropped (the nonzero branch of the
    formula must not see them). Rows must not store a column twice (canonical CSR, as CountData
    holds).
    """
    numel, n_genes = math.prod(shape), shape[-1]
    csr = None
    if isinstance(x, SparseRows):
        rows, cols, values = x.row_ids(), x.indices, x.values
        stored_zero = values == 0
        if bool(stored_zero.any()):
            keep = ~stored_zero
            rows, cols, values = rows[keep], cols[keep], values[keep]
        else:
            csr = x
        nz, x_mod = rows * n_genes + cols, len(x) * n_genes
    else:
        x_src, x_mod = _flat_source(x, shape)
        nz = x_src.nonzero().squeeze(1)  # flat indices into x's own (suffix) shape
        values, rows, cols = x_src[nz], None, None
    if x_mod != numel:  # x broadcast over leading (e.g. Monte Carlo) axes: the same nonzeros in every block
        copies = numel // x_mod
        nz = (torch.arange(0, numel, x_mod, device=nz.device)[:, None] + nz).reshape(-1)
        values = values.repeat(copies)
        rows, csr = None, None
        if cols is not None:
            cols = cols.repeat(copies)
    if rows is None:
        rows = nz // n_genes
    if cols is None:
        cols = nz - rows * n_genes
    return nz, values, rows, cols, csr


def _gather_index(idx: torch.Tensor, cols: torch.Tensor, modulus: int, numel: int, n_genes: int) -> torch.Tensor:
    """Where entry ``idx`` of the broadcast shape reads a flat source of period ``modulus``
    (see _flat_source): itself, its gene, or the remainder."""
    if modulus == numel:
        return idx
    if modulus == n_genes:
        return cols
    return idx % modulus


# psi(z) ~ log z - 1/(2z) - sum_k B_2k / (2k z^2k), k = 1..6: the Bernoulli-number terms
_DIGAMMA_SERIES = (1 / 12, -1 / 120, 1 / 252, -1 / 240, 1 / 132, -691 / 32760)
DIGAMMA_VECTOR_MIN = 8192


def _digamma(y: torch.Tensor) -> torch.Tensor:
    """digamma(y) for y > 0, as torch.digamma but in a few vectorised passes (torch's CPU kernel
    is scalar and was the largest single cost of the likelihood's backward).

    psi(y) = psi(y + 6) - sum_{k=0..5} 1 / (y + k), and psi(y + 6) from its asymptotic series to
    the z^-12 term, whose remainder at z >= 6 is about 1e-12. The six reciprocals are summed in
    three pairs: with w = y (y + 5), 1/(y+k) + 1/(y+5-k) = (2y + 5) / (w + k (5 - k)). Below
    DIGAMMA_VECTOR_MIN entries (a per-gene theta) the passes' fixed costs exceed torch's kernel.
    """
    if y.numel() < DIGAMMA_VECTOR_MIN:
        return torch.digamma(y)
    w = y * (y + 5)
    near = (w.reciprocal() + (w + 4).reciprocal_() + (w + 6).reciprocal_()).mul_(2 * y + 5)
    z = y + 6
    inv = z.reciprocal()
    inv2 = inv * inv
    series = torch.full_like(inv2, _DIGAMMA_SERIES[-1])
    for coefficient in reversed(_DIGAMMA_SERIES[:-1]):
        series.mul_(inv2).add_(coefficient)
    series.mul_(inv2)
    return torch.log(z).sub_(inv, alpha=0.5).sub_(series).sub_(near)


def _gamma_terms(x_nz, theta_nz, lgamma_theta_nz, digamma_theta_nz):
    """At the nonzero counts: lgamma(x + theta) - lgamma(theta) - lgamma(x + 1), and (with
    ``digamma_theta_nz``) minus digamma(x + theta) - digamma(theta), theta's NLL derivative there."""
    x_plus_theta = x_nz + theta_nz
    values = torch.lgamma(x_plus_theta) - lgamma_theta_nz - torch.lgamma(x_nz + 1)
    return values, None if digamma_theta_nz is None else digamma_theta_nz - _digamma(x_plus_theta)


def _fused_nb_forward(
    x: torch.Tensor,
    loc: torch.Tensor,
    theta: torch.Tensor,
    pi_logits: torch.Tensor | None,
    loc_is_log: bool,
    need_loc: bool,
    need_theta: bool,
    need_pi: bool,
    eps: float = EPS,
):
    """Per-row NLL (shape ``shape[:-1]``) and the local derivatives to save (None where not needed)."""
    if _KERNEL["enabled"] and eps == EPS and native.handles(x, loc, theta, pi_logits):
        try:
            return native.nb_nll_rows(x, loc, theta, pi_logits, loc_is_log, need_loc, need_theta, need_pi)
        except native.KernelUnavailable as error:  # warned once; the eager passes below, from here on
            _kernel_failed(str(error))
    zinb = pi_logits is not None
    shape = _broadcast_shape(x.shape, loc.shape, theta.shape, *((pi_logits.shape,) if zinb else ()))
    if loc.shape != shape or not loc.is_contiguous():
        loc = loc.expand(shape).contiguous()
    theta = theta.contiguous()  # the derivatives take its layout, and are updated through flat views
    pi_logits = None if pi_logits is None else pi_logits.contiguous()
    numel, n_genes = loc.numel(), shape[-1]
    need_pi = need_pi and zinb

    # ---- nonzero counts: one pass over x; everything x-dependent runs on these entries only ----
    idx, x_nz, rows, cols, csr = _nonzero_entries(x, shape)

    theta_src, theta_mod = _flat_source(theta, shape)
    theta_idx = _gather_index(idx, cols, theta_mod, numel, n_genes)
    if theta_src.numel() <= idx.numel():  # e.g. theta (G,): transform once per gene, gather once
        columns = [theta_src, torch.log(theta_src + eps), torch.lgamma(theta_src), torch.reciprocal(theta_src + eps)]
        if need_theta:
            columns.append(_digamma(theta_src))
        table = torch.stack(columns).index_select(1, theta_idx)
        theta_nz, log_te_nz, lgamma_theta_nz, inv_te_nz = table[0], table[1], table[2], table[3]
        digamma_theta_nz = table[4] if need_theta else None
    else:  # few nonzero counts against a per-cell theta: transform the gathered values
        theta_nz = theta_src[theta_idx]
        log_te_nz = torch.log(theta_nz + eps)
        lgamma_theta_nz = torch.lgamma(theta_nz)
        inv_te_nz = torch.reciprocal(theta_nz + eps)
        digamma_theta_nz = _digamma(theta_nz) if need_theta else None

    # ---- nonzero part of log p: x (log mu - log(theta + mu + eps)) + lgammas [- softplus(b)] ----
    loc_nz = loc.view(-1).index_select(0, idx)
    if loc_is_log:
        log_mu_nz = loc_nz
        u_nz = loc_nz.exp() * inv_te_nz
    else:
        log_mu_nz = torch.log(loc_nz + eps)
        u_nz = loc_nz * inv_te_nz
    l1_nz = torch.log1p(u_nz)
    gamma_values, d_theta_gamma = _gamma_terms(x_nz, theta_nz, lgamma_theta_nz, digamma_theta_nz)
    values = x_nz * (log_mu_nz - log_te_nz - l1_nz)
    values += gamma_values
    if zinb:
        pi_src, pi_mod = _flat_source(pi_logits, shape)
        b_nz = torch.addcmul(pi_src.index_select(0, _gather_index(idx, cols, pi_mod, numel, n_genes)), theta_nz, l1_nz)
        values -= F.softplus(b_nz)

    # ---- dense part ----
    ll, d_loc, d_theta, d_pi = _dense_terms(
        loc, theta, torch.reciprocal(theta + eps), pi_logits, idx, loc_is_log, need_loc, need_theta, need_pi
    )
    ll = ll.reshape(-1)
    ll = ll.add_(csr.sum_rows(values)) if csr is not None else ll.index_add(0, rows, values)
    nll = ll.view(shape[:-1]).neg_()

    # ---- nonzero parts of the local derivatives of the NLL ----
    q_nz = torch.reciprocal(u_nz + 1)
    if d_theta is not None:
        d_theta.view(-1).index_add_(0, idx, d_theta_gamma.add_(x_nz * q_nz * inv_te_nz))
    if d_loc is not None:
        if loc_is_log:
            correction = -x_nz * q_nz
        else:
            correction = x_nz * (q_nz * inv_te_nz - torch.reciprocal(loc_nz + eps))
        d_loc.view(-1).index_add_(0, idx, correction)
    return nll, d_loc, d_theta, d_pi


# ---- the native kernel ---------------------------------------------------------------------------
# Training's likelihood (CSR counts, float32, CPU) goes through a C kernel (nn/native.py,
# nn/nb_kernel.c): one vectorised pass per row that treats every count as zero, then the row's
# stored counts corrected in place, with products and sums instead of lgamma / digamma for small
# integer counts. Off outside `compiled_likelihood()`, so that the eager passes above stay the
# default everywhere else; training turns it on (train.compile, training/job.py).
_KERNEL: dict = {"enabled": False, "failed": None}


@contextlib.contextmanager
def compiled_likelihood(enabled: bool = True):
    """Within the block, fused NLLs of CSR counts on the CPU go through the native kernel (or,
    with False, the eager passes). The kernel is built at the first call of the process; where
    the build fails (no C compiler, say) a warning says why and the eager passes take over for
    the rest of the process."""
    previous = _KERNEL["enabled"]
    _KERNEL["enabled"] = bool(enabled) and _KERNEL["failed"] is None
    try:
        yield
    finally:  # a build that failed inside the block stays failed outside it
        _KERNEL["enabled"] = previous and _KERNEL["failed"] is None


def likelihood_compile_failure() -> str | None:
    """Why the kernel could not be built in this process, or None."""
    return _KERNEL["failed"]


def _kernel_failed(reason: str) -> None:
    _KERNEL["enabled"], _KERNEL["failed"] = False, reason
    warnings.warn(f"the likelihood kernel could not be built ({reason}); using eager passes", stacklevel=5)


def _reduce_grad(local: torch.Tensor, g: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    """sum of ``local * g[..., None]`` down to ``target_shape`` (a row-vector product for (G,))."""
    if len(target_shape) == 1 and local.dim() >= 2 and target_shape[0] == local.shape[-1]:
        return g.reshape(1, -1).mm(local.reshape(-1, local.shape[-1])).view(target_shape)
    return (local * g.unsqueeze(-1)).sum_to_size(target_shape)


class _FusedNBNLL(torch.autograd.Function):
    """Autograd node of :func:`fused_nb_nll`; the backward is analytic (first order only)."""

    @staticmethod
    def forward(ctx, x, loc, theta, pi_logits, loc_is_log):
        _, need_loc, need_theta, need_pi, _ = ctx.needs_input_grad
        with torch.autocast(loc.device.type, enabled=False):  # float32 inside, as its inputs
            nll, d_loc, d_theta, d_pi = _fused_nb_forward(
                x, loc, theta, pi_logits, loc_is_log, need_loc, need_theta, need_pi
            )
        ctx.save_for_backward(d_loc, d_theta, d_pi)
        ctx.shapes = (loc.shape, theta.shape, None if pi_logits is None else pi_logits.shape)
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll):
        d_loc, d_theta, d_pi = ctx.saved_tensors
        loc_shape, theta_shape, pi_shape = ctx.shapes
        grads = [None, None, None, None, None]
        with torch.autocast(grad_nll.device.type, enabled=False):
            for slot, local, target in ((1, d_loc, loc_shape), (2, d_theta, theta_shape), (3, d_pi, pi_shape)):
                if local is not None and ctx.needs_input_grad[slot]:
                    grads[slot] = _reduce_grad(local, grad_nll.to(local.dtype), target)
        return tuple(grads)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def fused_nb_nll(
    x: torch.Tensor,
    mu: torch.Tensor | None,
    theta: torch.Tensor,
    pi_logits: torch.Tensor | None = None,
    *,
    log_mu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of counts ``x`` summed over the last (gene) axis: shape ``(...,)``.

    NB(mu, theta) when ``pi_logits`` is None, else the ZINB mixture with zero-inflation logits
    ``pi_logits``. Values equal ``-log_nb_positive(x, mu, theta).sum(-1)`` /
    ``-log_zinb_positive(x, mu, theta, pi_logits).sum(-1)`` (the eps = 1e-8 reference formulas) up
    to rounding, but the forward takes a few elementwise passes, evaluates lgamma (and the
    backward's digamma) on nonzero counts only, and the hand-written backward saves one tensor per
    differentiable input (its local derivative) instead of autograd's chain of intermediates.

    Give exactly one of ``mu`` and ``log_mu`` (shape ``(..., G)``, e.g. a Monte Carlo ``(S, B, G)``).
    With ``log_mu`` the gradient goes to ``log_mu`` and the value is the reference formula at
    ``mu = exp(log_mu)`` with its ``log(mu + eps)`` replaced by ``log_mu`` (``theta + mu + eps``
    keeps its eps), i.e. ``nll(log_mu) = nll_eps(exp(log_mu)) + sum_g x * log1p(eps / mu)``: the
    two agree exactly where ``x == 0`` and differ by at most ``x * eps / mu`` elsewhere (< 1e-4 x for
    mu >= 1e-4). It is the better-conditioned form: ``log_mu = log_softmax + log library`` needs no
    exp/log round trip and, unlike ``log(mu + eps)``, keeps a gradient ``x - ...`` for mu << eps.

    ``theta`` broadcasts against mu: (G,) (per gene) or the full shape; its gradient is reduced to
    its own shape. ``pi_logits`` (ZINB) and ``x`` broadcast likewise; ``x`` gets no gradient, and an
    entry counts as a zero where ``x == 0``. Double backward is not supported.
    """
    if (mu is None) == (log_mu is None):
        raise ValueError("give exactly one of mu and log_mu")
    loc_is_log = log_mu is not None
    loc = log_mu if loc_is_log else mu
    # float32 at least, whatever autocast made upstream: lgamma of counts in bf16 is far off
    loc, theta = _at_least_float32(loc), _at_least_float32(theta)
    pi_logits = None if pi_logits is None else _at_least_float32(pi_logits)
    if isinstance(x, SparseRows):
        if x.shape != tuple(loc.shape[-2:]):
            raise ValueError(f"x {x.shape} (CSR rows) must match the last two axes of mu {tuple(loc.shape)}")
        x = x.to(dtype=loc.dtype)
    elif x.dtype != loc.dtype:  # counts as integers or another float type: mu's dtype (float32 is exact to 2^24)
        x = x.to(loc.dtype)
    inputs = (loc, theta) if pi_logits is None else (loc, theta, pi_logits)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _FusedNBNLL.apply(x if isinstance(x, SparseRows) else x.detach(), loc, theta, pi_logits, loc_is_log)
    with torch.autocast(loc.device.type, enabled=False):
        return _fused_nb_forward(x, loc, theta, pi_logits, loc_is_log, False, False, False)[0]


def _sample_gamma_poisson(mu: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """NB draws as a Gamma(shape theta, rate theta / mu) mixture of Poissons."""
    gamma = torch._standard_gamma(theta.expand_as(mu).contiguous(), generator=generator) * (mu / theta)
    return torch.poisson(gamma, generator=generator)


class Poisson:
    """Poisson(mu) with the same face as the NB classes: ``log_prob``, ``mean``, ``sample``."""

    def __init__(self, mu: torch.Tensor):
        self.mu = mu

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return log_poisson(x, self.mu)

    def nll_per_cell(self, x: torch.Tensor) -> torch.Tensor:
        """``-log_prob(x).sum(-1)`` (plain formula), the training reconstruction loss; x dense or SparseRows."""
        return -log_poisson(x.to_dense() if isinstance(x, SparseRows) else x, self.mu).sum(-1)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.poisson(self.mu, generator=generator)


class NegativeBinomial:
    """NB with mean ``mu`` and inverse dispersion ``theta`` (broadcastable to mu).

    ``log_prob`` is the plain reference formula (queries, evaluation); ``nll_per_cell`` is the
    fused training loss (:func:`fused_nb_nll`). ``log_mu``, if given, must be ``log(mu)`` (e.g.
    ``log_softmax + log library``); ``nll_per_cell`` then differentiates through it instead of mu.
    """

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, log_mu: torch.Tensor | None = None):
        self.mu = mu
        self.theta = theta
        self.log_mu = log_mu

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return log_nb_positive(x, self.mu, self.theta)

    def nll_per_cell(self, x: torch.Tensor) -> torch.Tensor:
        """``-log_prob(x).sum(-1)`` through the fused forward / analytic backward of fused_nb_nll
        (with ``log_mu`` set: its log_mu form, which differs by ``sum_g x log1p(eps / mu)``)."""
        if self.log_mu is not None:
            return fused_nb_nll(x, None, self.theta, log_mu=self.log_mu)
        return fused_nb_nll(x, self.mu, self.theta)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return _sample_gamma_poisson(self.mu, self.theta, generator)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """NB whose draws are replaced by 0 with probability ``sigmoid(zi_logits)``."""

    def __init__(
        self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, log_mu: torch.Tensor | None = None
    ):
        super().__init__(mu, theta, log_mu)
        self.zi_logits = zi_logits

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.zi_logits) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        keep = torch.sigmoid(-self.zi_logits)
        return keep * (self.mu + self.mu**2 / self.theta) + keep * (1 - keep) * self.mu**2

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return log_zinb_positive(x, self.mu, self.theta, self.zi_logits)

    def nll_per_cell(self, x: torch.Tensor) -> torch.Tensor:
        """``-log_prob(x).sum(-1)`` through the fused forward / analytic backward of fused_nb_nll
        (with ``log_mu`` set: its log_mu form, which differs by ``sum_g x log1p(eps / mu)``)."""
        if self.log_mu is not None:
            return fused_nb_nll(x, None, self.theta, self.zi_logits, log_mu=self.log_mu)
        return fused_nb_nll(x, self.mu, self.theta, self.zi_logits)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        counts = _sample_gamma_poisson(self.mu, self.theta, generator)
        dropped = torch.bernoulli(torch.sigmoid(self.zi_logits).expand_as(counts), generator=generator)
        return counts * (1 - dropped)
