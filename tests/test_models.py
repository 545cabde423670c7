"""VAE / LDVAE / VAEC: state-dict names, the loss against a hand computation, training, queries."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logsumexp

from scvi_cli.data.minibatch import Minibatch
from scvi_cli.models import LDVAE, VAE, VAEC

REFERENCE = json.loads((Path(__file__).parent / "data" / "scvi_tools_state_dicts.json").read_text())


def _build(config: dict):
    kwargs = {
        k: (np.zeros((1, int(v.split("(1,")[1].rstrip("))")))) if "zeros" in v else np.ones((1, int(v.split("(1,")[1].rstrip("))")))))
        if isinstance(v, str) and v.startswith("np.")
        else v
        for k, v in config["kwargs"].items()
    }
    module = config["module"].split(".")[-1]
    if module == "VAEC":
        return VAEC(kwargs.pop("n_input"), kwargs.pop("n_labels"), **kwargs)
    return {"VAE": VAE, "LDVAE": LDVAE}[module](**kwargs)


@pytest.mark.parametrize("name", [k for k in REFERENCE if k not in ("_meta", "signatures", "vaec_default")])
def test_state_dict_matches_scvi_tools(name):
    config = REFERENCE[name]
    ours = {k: list(v.shape) for k, v in _build(config).state_dict().items()}
    reference = {k: shape for k, (shape, _dtype) in config["state_dict"].items()}
    assert ours == reference


def test_vaec_default_keys_match_scvi_tools():
    # scvi-tools' module default is n_batch=0 (an empty embedding table); ours defaults to one batch.
    ours = VAEC(50, 4).state_dict()
    assert list(ours) == list(REFERENCE["vaec_default"]["state_dict"])


def synthetic_counts(n_cells=96, n_genes=40, n_batch=2, n_labels=3, seed=0):
    """Counts from a small NB model with label- and batch-specific means."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n_cells)
    batch = rng.integers(0, n_batch, n_cells)
    programs = rng.gamma(1.0, 1.0, (n_labels, n_genes))
    shift = rng.gamma(5.0, 0.2, (n_batch, n_genes))
    library = rng.lognormal(np.log(300), 0.3, n_cells)
    mu = programs[labels] * shift[batch]
    mu = library[:, None] * mu / mu.sum(axis=1, keepdims=True)
    x = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
    x[:, 0] += 1  # no cell with zero total
    return Minibatch(
        x=torch.tensor(x),
        batch_index=torch.tensor(batch).reshape(-1, 1),
        labels=torch.tensor(labels).reshape(-1, 1),
        cat_covs=torch.tensor(rng.integers(0, 3, (n_cells, 2))),
        cont_covs=torch.tensor(rng.normal(size=(n_cells, 2)), dtype=torch.float32),
    )


def library_priors(x, batch, n_batch):
    log_total = np.log(x.sum(1).numpy())
    codes = batch.reshape(-1).numpy()
    means = np.array([[log_total[codes == b].mean() for b in range(n_batch)]])
    variances = np.array([[log_total[codes == b].var() for b in range(n_batch)]])
    return means, variances


def _train(model, batch, steps=60, lr=1e-2):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model.loss_for(batch, kl_weight=1.0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        assert torch.isfinite(out.loss)
    return losses


CONFIGS = [
    dict(dispersion="gene", gene_likelihood="zinb"),
    dict(dispersion="gene-batch", gene_likelihood="zinb"),
    dict(dispersion="gene-label", gene_likelihood="nb"),
    dict(dispersion="gene-cell", gene_likelihood="zinb"),
    dict(dispersion="gene", gene_likelihood="nb"),
    dict(dispersion="gene", gene_likelihood="poisson"),
    dict(latent_distribution="ln"),
    dict(use_observed_lib_size=False),
    dict(n_continuous_cov=2, n_cats_per_cov=[3, 3], n_layers=2, use_batch_norm="none", use_layer_norm="both"),
    dict(n_continuous_cov=2, n_cats_per_cov=[3, 3], encode_covariates=True, deeply_inject_covariates=False),
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_vae_trains_with_decreasing_loss(options):
    torch.manual_seed(0)
    batch = synthetic_counts()
    means, variances = library_priors(batch.x, batch.batch_index, 2)
    uses_covs = "n_cats_per_cov" in options
    model = VAE(40, n_batch=2, n_labels=3, n_hidden=32, n_latent=4, library_log_means=means, library_log_vars=variances, **options)
    if not uses_covs:
        batch = Minibatch(batch.x, batch.batch_index, batch.labels)
    losses = _train(model, batch)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_ldvae_and_vaec_train_with_decreasing_loss():
    torch.manual_seed(0)
    batch = synthetic_counts()
    means, variances = library_priors(batch.x, batch.batch_index, 2)
    ldvae = LDVAE(40, n_batch=2, n_hidden=32, n_latent=4, library_log_means=means, library_log_vars=variances)
    vaec = VAEC(40, 3, n_hidden=32, n_batch=2, ct_weight=np.array([1.0, 2.0, 0.5]))
    for model in (ldvae, vaec):
        losses = _train(model, batch)
        assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def _hand_nb(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_vae_loss_equals_hand_computation():
    """Reconstruct the loss from the generative parameters with scipy and numpy only."""
    torch.manual_seed(1)
    batch = synthetic_counts(n_cells=20)
    means, variances = library_priors(batch.x, batch.batch_index, 2)
    model = VAE(40, n_batch=2, n_hidden=16, n_latent=3, dispersion="gene-batch", use_observed_lib_size=False,
                library_log_means=means, library_log_vars=variances).eval()
    inference = model.encode(batch.x, batch.batch_index)
    generative = model.generative(inference["z"], inference["library"], batch.batch_index)
    out = model.loss(batch.x, inference, generative, batch.batch_index, kl_weight=0.3)

    x = batch.x.numpy().astype(np.float64)
    mu = generative["px_rate"].detach().numpy().astype(np.float64)
    theta = generative["px_r"].detach().numpy().astype(np.float64)
    pi = generative["px_dropout"].detach().numpy().astype(np.float64)
    log_nb = _hand_nb(x, mu, theta)
    log_zero = logsumexp(np.stack([np.log(expit(pi)), np.log(expit(-pi)) + log_nb]), axis=0)
    log_p = np.where(x == 0, log_zero, np.log(expit(-pi)) + log_nb)
    recon = -log_p.sum(1)
    qm, qv = (inference[k].detach().numpy().astype(np.float64) for k in ("qz_m", "qz_v"))
    kl_z = 0.5 * (qv + qm**2 - 1 - np.log(qv)).sum(1)
    lm, lv = (inference[k].detach().numpy().astype(np.float64) for k in ("ql_m", "ql_v"))
    codes = batch.batch_index.numpy().reshape(-1)
    pm, pv = means[0, codes][:, None], variances[0, codes][:, None]
    kl_l = 0.5 * (np.log(pv / lv) + (lv + (lm - pm) ** 2) / pv - 1).sum(1)

    np.testing.assert_allclose(out.reconstruction_loss.detach().numpy(), recon, rtol=1e-4)
    np.testing.assert_allclose(out.kl_local.detach().numpy(), kl_z + kl_l, rtol=1e-4)
    np.testing.assert_allclose(out.loss.item(), np.mean(recon + 0.3 * kl_z + kl_l), rtol=1e-4)
    np.testing.assert_allclose(out.elbo.detach().numpy(), recon + kl_z + kl_l, rtol=1e-4)


def test_vaec_loss_equals_hand_computation():
    torch.manual_seed(2)
    batch = synthetic_counts(n_cells=20)
    weights = np.array([1.0, 3.0, 0.5])
    model = VAEC(40, 3, n_hidden=16, n_batch=2, ct_weight=weights).eval()
    inference = model.inference(batch.x, batch.labels)
    generative = model.generative(inference["z"], inference["library"], batch.labels, batch.batch_index)
    out = model.loss({"X": batch.x, "labels": batch.labels}, inference, generative, kl_weight=0.5)
    x = batch.x.numpy().astype(np.float64)
    mu = generative["px_rate"].detach().numpy().astype(np.float64)
    theta = np.exp(model.px_r.detach().numpy().astype(np.float64))
    np.testing.assert_allclose(mu.sum(1), x.sum(1), rtol=1e-4)  # library = raw total count
    recon = -_hand_nb(x, mu, theta).sum(1)
    qm, qv = (inference[k].detach().numpy().astype(np.float64) for k in ("qz_m", "qz_v"))
    kl_z = 0.5 * (qv + qm**2 - 1 - np.log(qv)).sum(1)
    w = weights[batch.labels.numpy().reshape(-1)]
    np.testing.assert_allclose(out.loss.item(), np.mean(w * (recon + 0.5 * kl_z)), rtol=1e-4)


def test_vaec_sample_is_nonnegative_integers():
    torch.manual_seed(0)
    batch = synthetic_counts(n_cells=12)
    model = VAEC(40, 3, n_batch=2).eval()
    draws = model.posterior_predictive_sample(batch, n_samples=4, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4, 12, 40)
    assert torch.all(draws >= 0) and torch.equal(draws, torch.round(draws))
    assert draws.sum() > 0


def test_vae_queries():
    torch.manual_seed(0)
    batch = synthetic_counts(n_cells=16)
    model = VAE(40, n_batch=2, n_hidden=16, n_latent=3, use_observed_lib_size=True).eval()
    qz_m, _, _ = model.z_encoder(torch.log1p(batch.x), batch.batch_index)
    torch.testing.assert_close(model.latent(batch), qz_m)
    scale = model.sample_scale(batch)
    torch.testing.assert_close(scale.sum(1), torch.ones(16))
    torch.testing.assert_close(model.sample_rate(batch), scale * batch.x.sum(1, keepdim=True))
    torch.testing.assert_close(model.library_size(batch), batch.x.sum(1, keepdim=True))
    assert not torch.allclose(model.sample_scale(batch, transform_batch=0), model.sample_scale(batch, transform_batch=1))
    torch.testing.assert_close(model.sample_scale(batch), model.sample_scale(batch))  # mean decoding is deterministic
    draws = model.posterior_predictive_sample(batch, n_samples=3)
    assert draws.shape == (3, 16, 40) and torch.all(draws >= 0)
    ll = model.marginal_ll(batch, n_mc_samples=50)
    elbo = model.loss_for(batch).elbo
    assert ll.shape == (16,) and torch.all(torch.isfinite(ll))
    assert torch.all(-ll < elbo.mean() * 1.5)  # log p(x) >= ELBO on average; loose sanity bound
    ln = VAE(40, n_hidden=16, n_latent=3, latent_distribution="ln", use_observed_lib_size=True).eval()
    latent = ln.latent(batch, mc_samples=2000)
    torch.testing.assert_close(latent.sum(1), torch.ones(16))


def test_marginal_ll_upper_bounds_elbo():
    torch.manual_seed(0)
    batch = synthetic_counts(n_cells=64)
    model = VAE(40, n_batch=2, n_hidden=16, n_latent=3, use_observed_lib_size=True)
    _train(model, batch, steps=30)
    model.eval()
    torch.manual_seed(0)
    elbo = -model.loss_for(batch).elbo.mean().item()
    ll = model.marginal_ll(batch, n_mc_samples=200).mean().item()
    assert ll > elbo - 0.5  # the IS estimate is tighter than the ELBO (up to Monte Carlo noise)


def test_ldvae_loadings_and_vamp_prior():
    batch = synthetic_counts()
    means, variances = library_priors(batch.x, batch.batch_index, 2)
    ldvae = LDVAE(40, n_batch=2, n_latent=4, library_log_means=means, library_log_vars=variances)
    loadings = ldvae.get_loadings()
    assert loadings.shape == (40, 4)
    bn = ldvae.decoder.factor_regressor.fc_layers[0][1]
    W = ldvae.decoder.factor_regressor.fc_layers[0][0].weight
    assert isinstance(loadings, np.ndarray) and loadings.dtype == np.float32  # the documented return type
    torch.testing.assert_close(torch.from_numpy(loadings), (bn.weight / torch.sqrt(bn.running_var + 1e-3))[:, None] * W[:, :4])

    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 10.0]])
    member = rng.integers(0, 2, 60)
    lat_means = centers[member] + rng.normal(scale=0.1, size=(60, 2))
    lat_vars = np.full((60, 2), 0.5)
    labels = np.zeros(60, dtype=int)
    labels[:5] = 1  # label 1 has fewer cells than p: one cluster per cell
    prior = VAEC.get_vamp_prior(lat_means, lat_vars, labels, n_labels=2, p=2)
    found = prior["mean_vprior"][0][np.argsort(prior["mean_vprior"][0][:, 0])]
    cells0 = labels == 0
    for k in range(2):
        np.testing.assert_allclose(found[k], lat_means[cells0 & (member == k)].mean(0))
    np.testing.assert_allclose(np.sort(prior["weights_vprior"][0]), np.sort(np.bincount(member[cells0]) / cells0.sum()))
    np.testing.assert_allclose(prior["var_vprior"][0], 0.5 + np.stack([lat_means[cells0 & (member == k)].var(0) for k in range(2)])[np.argsort(np.argsort(prior["mean_vprior"][0][:, 0]))], rtol=1e-6)
    assert prior["weights_vprior"].shape == (2, 2)
    np.testing.assert_allclose(prior["weights_vprior"][1].sum(), 1.0)


def _query_modules():
    """Briefly trained VAE (network decoder with covariates, latent library), LDVAE (linear decoder
    with batch-norm statistics of its own) and VAEC, in eval mode, with their minibatch."""
    torch.manual_seed(0)
    batch = synthetic_counts(n_cells=24)
    means, variances = library_priors(batch.x, batch.batch_index, 2)
    vae = VAE(40, n_batch=2, n_hidden=16, n_latent=3, n_continuous_cov=2, n_cats_per_cov=[3, 3],
              use_observed_lib_size=False, library_log_means=means, library_log_vars=variances)
    ldvae = LDVAE(40, n_batch=2, n_hidden=16, n_latent=3, library_log_means=means, library_log_vars=variances)
    vaec = VAEC(40, 3, n_hidden=16, n_batch=2)
    modules = {"vae": vae, "ldvae": ldvae, "vaec": vaec}
    for module in modules.values():
        _train(module, batch, steps=5)  # batch-norm running statistics away from their initial values
        module.eval()
    return modules, batch


@pytest.mark.parametrize("name", ["vae", "ldvae", "vaec"])
def test_sample_scale_gene_subset_and_transform_batches(name):
    modules, batch = _query_modules()
    module = modules[name]
    genes = [39, 3, 17, 0, 8, 9]
    full = module.sample_scale(batch)
    with torch.no_grad():  # px_scale from generative at the posterior mean of z
        if name == "vaec":
            out = module.inference(batch.x, batch.labels)
            expected = module.generative(out["qz_m"], out["library"], batch.labels, batch.batch_index)["px_scale"]
        else:
            out = module.encode(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
            expected = module.generative(
                out["qz_m"], out["library"], batch.batch_index, batch.cont_covs, batch.cat_covs
            )["px_scale"]
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(full.sum(1), torch.ones(24))
    for chunk in (None, 5, 16, 40):  # the normaliser over all genes, a chunk of genes at a time
        torch.testing.assert_close(module.sample_scale(batch, gene_index=genes, gene_chunk=chunk), full[:, genes])
        torch.testing.assert_close(module.sample_scale(batch, gene_chunk=chunk), full)
        torch.testing.assert_close(module.sample_rate(batch, gene_index=genes, gene_chunk=chunk),
                                   module.sample_rate(batch)[:, genes])
    one, two = (module.sample_scale(batch, transform_batch=b) for b in (0, 1))
    assert not torch.allclose(one, two)
    torch.testing.assert_close(module.sample_scale(batch, transform_batch=[0, 1]), (one + two) / 2)
    # the same posterior draws serve every transform batch
    torch.manual_seed(7)
    averaged = module.sample_scale(batch, transform_batch=[0, 1], n_samples=3, gene_index=genes, gene_chunk=7)
    torch.manual_seed(7)
    z, _ = module.posterior_draws(batch, 3)
    expected = sum(module.scale_head(z[s], batch, b).columns()[:, genes] for b in (0, 1) for s in range(3)) / 6
    torch.testing.assert_close(averaged, expected)



@pytest.mark.parametrize("layer_norm", [False, True])
def test_linear_decoder_scale_head_equals_its_forward(layer_norm):
    """Gene-separable (eval batch norm: rows of W and of the statistics) or not (layer norm, or
    training mode: everything computed, then selected), the head gives forward's px_scale."""
    from scvi_cli.nn import LinearDecoderSCVI

    torch.manual_seed(0)
    decoder = LinearDecoderSCVI(3, 40, n_cat_list=[2], use_layer_norm=layer_norm)
    z, codes = torch.randn(24, 3), torch.randint(0, 2, (24, 1))
    with torch.no_grad():
        for _ in range(5):  # move the batch-norm running statistics
            decoder("gene", z + torch.randn(24, 3), torch.zeros(24, 1), codes)
    genes = torch.tensor([39, 3, 17, 0])
    for training in (False, True):
        decoder.train(training)
        with torch.no_grad():
            head = decoder.scale_head(z, codes)
            expected = decoder("gene", z, torch.zeros(24, 1), codes)[0]
        torch.testing.assert_close(head.columns(), expected)
        torch.testing.assert_close(head.columns(genes, gene_chunk=6), expected[:, genes])

def test_latent_library_conventions():
    """sample_rate decodes at exp(ql_m), the posterior mean of the log-library; library_size gives
    the log-normal mean exp(ql_m + ql_v / 2), as scvi-tools' get_latent_library_size."""
    modules, batch = _query_modules()
    vae = modules["vae"]
    with torch.no_grad():
        out = vae.encode(batch.x, batch.batch_index, batch.cont_covs, batch.cat_covs)
    torch.testing.assert_close(vae.sample_rate(batch), vae.sample_scale(batch) * torch.exp(out["ql_m"]))
    torch.testing.assert_close(vae.library_size(batch), torch.exp(out["ql_m"] + 0.5 * out["ql_v"]))
    vaec = modules["vaec"]
    torch.testing.assert_close(vaec.sample_rate(batch), vaec.sample_scale(batch) * batch.x.sum(1, keepdim=True))


def test_logistic_normal_mean_is_drawn_in_bounded_chunks(monkeypatch):
    from scvi_cli.models import vae as vae_module

    torch.manual_seed(0)
    batch = synthetic_counts(n_cells=16)
    model = VAE(40, n_hidden=16, n_latent=3, latent_distribution="ln", use_observed_lib_size=True).eval()
    sizes = []
    draws = vae_module.gaussian_draws
    monkeypatch.setattr(vae_module, "gaussian_draws", lambda m, v, n: sizes.append(n) or draws(m, v, n))
    monkeypatch.setattr(vae_module, "CHUNK_ELEMENTS", 16 * 3 * 64)  # 64 draws of (16, 3) per chunk
    latent = model.latent(batch, mc_samples=5000)
    assert max(sizes) == 64 and sum(sizes) == 5000
    torch.testing.assert_close(latent.sum(1), torch.ones(16))
    with torch.no_grad():
        out = model.encode(batch.x, batch.batch_index)
        reference = draws(out["qz_m"], out["qz_v"], 20000).softmax(dim=-1).mean(dim=0)
    torch.testing.assert_close(latent, reference, atol=2.5e-2, rtol=0)  # Monte Carlo error
