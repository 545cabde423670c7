"""The documented API of every model class, called exactly as its page writes it.

The pages: scvi-tools' ``scvi.nn.Encoder``, ``scvi.nn.DecoderSCVI``, ``scvi.module.LDVAE`` and
``scvi.module.VAEC``, and the scvi 0.6 ``scvi.models.VAE``. Signatures are checked parameter by
parameter (names, order, defaults); methods are called positionally as written and their values
compared with independent computations (scipy.stats, torch.distributions, numpy by hand).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.special import expit, log_expit
from torch.distributions import Normal, kl_divergence

from scvi_cli.models import LDVAE, VAE, VAEC
from scvi_cli.nn import DecoderSCVI, Encoder

EMPTY = inspect.Parameter.empty


def positional_parameters(cls) -> list[tuple[str, object]]:
    """(name, default) of the constructor's positional-or-keyword parameters, in order."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [(p.name, p.default) for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]


def counts(n_cells=12, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2.0, 0.3, (n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1  # no all-zero cell
    return torch.tensor(x)


def hand_zinb_log_prob(x, mu, theta, pi_logits):
    """log ZINB(x; mu, theta, logits pi) with scipy: a zero-inflated NB mixture, per entry."""
    nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    log_pi, log_not_pi = log_expit(pi_logits), log_expit(-pi_logits)
    return np.where(x == 0, np.logaddexp(log_pi, log_not_pi + nb), log_not_pi + nb)


def as64(t):
    return t.detach().double().numpy()


# --------------------------------------------------------------------------------------------
# scvi.nn.Encoder


def test_encoder_signature():
    assert positional_parameters(Encoder) == [
        ("n_input", EMPTY), ("n_output", EMPTY), ("n_cat_list", None), ("n_layers", 1), ("n_hidden", 128),
        ("dropout_rate", 0.1), ("distribution", "normal"), ("var_eps", 1e-4), ("var_activation", None),
        ("return_dist", False),
    ]
    assert any(p.kind is p.VAR_KEYWORD for p in inspect.signature(Encoder.__init__).parameters.values())


def test_encoder_forward_values_and_var_eps_floor():
    torch.manual_seed(0)
    enc = Encoder(30, 4, [3], 1, 16, 0.1, "normal", 0.5).eval()  # positional, as documented
    x = torch.log1p(counts())
    codes = torch.randint(0, 3, (12, 1))
    q_m, q_v, z = enc(x, codes)
    h = enc.encoder(x, codes)
    torch.testing.assert_close(q_m, enc.mean_encoder(h))
    torch.testing.assert_close(q_v, torch.exp(enc.var_encoder(h)) + 0.5)
    assert z.shape == (12, 4)
    # var_eps is a floor: with the variance head pushed to -inf the variance is var_eps exactly
    with torch.no_grad():
        enc.var_encoder.weight.zero_()
        enc.var_encoder.bias.fill_(-200.0)
    assert torch.equal(enc(x, codes)[1], torch.full((12, 4), 0.5))


def test_encoder_softplus_variance_and_return_dist():
    torch.manual_seed(1)
    x = torch.log1p(counts())
    enc = Encoder(30, 3, var_activation=F.softplus, var_eps=1e-3, n_hidden=8).eval()
    q_m, q_v, _ = enc(x)
    h = enc.encoder(x)
    head = as64(enc.var_encoder(h))
    np.testing.assert_allclose(as64(q_v), np.log1p(np.exp(head)) + 1e-3, rtol=1e-6)
    named = Encoder(30, 3, var_activation="softplus", n_hidden=8)
    assert named.var_activation is F.softplus
    dist_enc = Encoder(30, 3, n_hidden=8, return_dist=True).eval()
    dist, z = dist_enc(x)
    assert isinstance(dist, Normal) and z.shape == (12, 3)
    h = dist_enc.encoder(x)
    torch.testing.assert_close(dist.loc, dist_enc.mean_encoder(h))
    torch.testing.assert_close(dist.scale, (torch.exp(dist_enc.var_encoder(h)) + 1e-4).sqrt())
    with pytest.raises(ValueError, match="var_activation"):
        Encoder(30, 3, var_activation="relu")
    with pytest.raises(ValueError, match="distribution"):
        Encoder(30, 3, distribution="gamma")


# --------------------------------------------------------------------------------------------
# scvi.nn.DecoderSCVI


def test_decoder_signature_and_dropout_keyword():
    assert positional_parameters(DecoderSCVI) == [
        ("n_input", EMPTY), ("n_output", EMPTY), ("n_cat_list", None), ("n_layers", 1), ("n_hidden", 128),
        ("inject_covariates", True), ("use_batch_norm", False), ("use_layer_norm", False), ("scale_activation", "softmax"),
    ]
    dec = DecoderSCVI(4, 20, n_cat_list=[3], n_hidden=8, dropout_rate=0.2)  # **kwargs reach FCLayers
    assert dec.px_decoder.fc_layers[0][4].p == 0.2
    assert DecoderSCVI(4, 20).px_decoder.fc_layers[0][4] is None  # no dropout by default


@pytest.mark.parametrize("scale_activation", ["softmax", "softplus"])
def test_decoder_forward_values(scale_activation):
    torch.manual_seed(2)
    dec = DecoderSCVI(4, 20, [3], 1, 8, True, False, False, scale_activation).eval()
    z, library = torch.randn(6, 4), torch.randn(6, 1) + 5
    codes = torch.randint(0, 3, (6, 1))
    px_scale, px_r, px_rate, px_dropout = dec("gene", z, library, codes)
    h = dec.px_decoder(z, codes)
    logits = as64(dec.px_scale_decoder[0](h))
    if scale_activation == "softmax":
        expected = np.exp(logits - logits.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
    else:
        expected = np.log1p(np.exp(logits))
    np.testing.assert_allclose(as64(px_scale), expected, rtol=1e-5)
    np.testing.assert_allclose(as64(px_rate), np.exp(as64(library)) * as64(px_scale), rtol=1e-5)
    torch.testing.assert_close(px_dropout, dec.px_dropout_decoder(h))
    assert px_r is None
    assert dec("gene-cell", z, library, codes)[1].shape == (6, 20)


# --------------------------------------------------------------------------------------------
# scvi.models.VAE (the scvi 0.6 API)


def test_vae_signature_is_the_0_6_one():
    assert positional_parameters(VAE) == [
        ("n_input", EMPTY), ("n_batch", 0), ("n_labels", 0), ("n_hidden", 128), ("n_latent", 10), ("n_layers", 1),
        ("dropout_rate", 0.1), ("dispersion", "gene"), ("log_variational", True), ("reconstruction_loss", "zinb"),
        ("latent_distribution", "normal"),
    ]
    extra = [p for p in inspect.signature(VAE.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert {"gene_likelihood", "n_continuous_cov", "use_observed_lib_size", "scale_activation", "var_eps"} <= {p.name for p in extra}


def test_vae_page_example_and_positional_call():
    gene_dataset = SimpleNamespace(nb_genes=30, n_batches=2, n_labels=3)
    vae = VAE(gene_dataset.nb_genes, n_batch=gene_dataset.n_batches * False, n_labels=gene_dataset.n_labels)
    assert (vae.n_input, vae.n_batch, vae.n_labels, vae.n_latent) == (30, 0, 3, 10)
    assert vae.reconstruction_loss == vae.gene_likelihood == "zinb" and not vae.use_observed_lib_size
    x = counts()
    reconst, kl = vae(x, torch.full((12, 1), 5.0), torch.full((12, 1), 0.5))
    assert reconst.shape == kl.shape == (12,) and torch.isfinite(reconst).all()

    vae = VAE(30, 2, 3, 16, 4, 2, 0.2, "gene-batch", False, "nb", "ln")
    assert (vae.n_batch, vae.n_labels, vae.n_latent, vae.dispersion, vae.log_variational) == (2, 3, 4, "gene-batch", False)
    assert vae.gene_likelihood == "nb" and vae.latent_distribution == "ln"
    assert len(vae.z_encoder.encoder.fc_layers) == 2 and vae.z_encoder.encoder.fc_layers[0][4].p == 0.2
    assert VAE(30, reconstruction_loss="poisson").gene_likelihood == "poisson"
    assert VAE(30, gene_likelihood="nb").reconstruction_loss == "nb"  # the 1.x name works too
    with pytest.raises(ValueError, match="disagree"):
        VAE(30, reconstruction_loss="nb", gene_likelihood="poisson")
    with pytest.raises(ValueError, match="reconstruction_loss"):
        VAE(30, reconstruction_loss="gaussian")
    with pytest.raises(ValueError, match="gene-batch"):
        VAE(30, dispersion="gene-batch")  # no batches to have a dispersion per batch
    with pytest.raises(ValueError, match="scale_activation"):
        VAE(30, scale_activation="relu")


def _seeded(seed, fn, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def test_vae_forward_terms_equal_a_hand_computation():
    """forward's two terms: recon NLL + KL(q(l) || N(local_l_mean, local_l_var)) and KL(q(z) || N(0, I))."""
    torch.manual_seed(3)
    vae = VAE(30, n_batch=2, n_labels=3, n_hidden=16, n_latent=4).eval()
    x = counts()
    batch_index = torch.tensor([0, 1] * 6).reshape(-1, 1)
    y = torch.randint(0, 3, (12, 1))
    local_l_mean = torch.linspace(4.0, 6.0, 12).reshape(-1, 1)
    local_l_var = torch.linspace(0.2, 1.0, 12).reshape(-1, 1)
    reconst_plus_kl_l, kl_z = _seeded(7, vae, x, local_l_mean, local_l_var, batch_index, y)
    out = _seeded(7, vae.inference, x, batch_index, y)  # the same draws
    assert set(out) == {"px_scale", "px_r", "px_rate", "px_dropout", "qz_m", "qz_v", "z", "ql_m", "ql_v", "library"}
    recon = -hand_zinb_log_prob(as64(x), as64(out["px_rate"]), as64(out["px_r"]), as64(out["px_dropout"])).sum(1)
    kl_l = kl_divergence(Normal(out["ql_m"], out["ql_v"].sqrt()), Normal(local_l_mean, local_l_var.sqrt())).sum(1)
    kl = kl_divergence(Normal(out["qz_m"], out["qz_v"].sqrt()), Normal(0.0, 1.0)).sum(1)
    np.testing.assert_allclose(as64(reconst_plus_kl_l), recon + as64(kl_l), rtol=1e-4)
    np.testing.assert_allclose(as64(kl_z), as64(kl), rtol=1e-4)
    # get_reconstruction_loss is the same negative log-likelihood, from the inference parameters
    nll = vae.get_reconstruction_loss(x, out["px_rate"], out["px_r"], out["px_dropout"])
    np.testing.assert_allclose(as64(nll), recon, rtol=1e-4)
    # px_rate is exp(library) * px_scale, library drawn from q(l | x)
    torch.testing.assert_close(out["px_rate"], torch.exp(out["library"]) * out["px_scale"])


def test_vae_forward_with_observed_library_has_no_library_kl():
    torch.manual_seed(4)
    vae = VAE(30, n_hidden=16, use_observed_lib_size=True, reconstruction_loss="nb").eval()
    x = counts()
    first, kl_z = _seeded(1, vae, x, None, None)
    out = _seeded(1, vae.inference, x)
    assert out["ql_m"] is None and out["ql_v"] is None
    torch.testing.assert_close(out["library"], torch.log(x.sum(1, keepdim=True)))
    mu, theta = as64(out["px_rate"]), as64(out["px_r"])
    np.testing.assert_allclose(as64(first), -stats.nbinom.logpmf(as64(x), theta, theta / (theta + mu)).sum(1), rtol=1e-4)


def test_vae_inference_samples_and_transform_batch():
    torch.manual_seed(5)
    vae = VAE(30, n_batch=3, n_hidden=16, n_latent=4).eval()
    x = counts()
    batch_index = torch.zeros((12, 1), dtype=torch.long)
    out = vae.inference(x, batch_index, n_samples=3)
    for key, shape in {"z": (3, 12, 4), "qz_m": (3, 12, 4), "ql_v": (3, 12, 1), "library": (3, 12, 1),
                       "px_scale": (3, 12, 30), "px_rate": (3, 12, 30)}.items():
        assert out[key].shape == shape, key
    torch.testing.assert_close(out["qz_m"][0], out["qz_m"][2])  # the parameters, repeated
    assert not torch.allclose(out["z"][0], out["z"][1])  # distinct draws
    # transform_batch decodes the same z as another batch: equal to decoding with that batch's codes
    own = _seeded(9, vae.inference, x, torch.full((12, 1), 2), transform_batch=None)
    moved = _seeded(9, vae.inference, x, batch_index, transform_batch=2)
    torch.testing.assert_close(moved["px_scale"], own["px_scale"])
    torch.testing.assert_close(_seeded(9, vae.get_sample_scale, x, batch_index, None, 1, 2), own["px_scale"])
    torch.testing.assert_close(_seeded(9, vae.get_sample_rate, x, batch_index, None, 1, 2), own["px_rate"])
    assert vae.get_sample_scale(x, batch_index, n_samples=2).shape == (2, 12, 30)
    torch.testing.assert_close(vae.get_sample_scale(x, batch_index).sum(-1), torch.ones(12))


def test_vae_posterior_helpers():
    torch.manual_seed(6)
    vae = VAE(30, n_hidden=16, n_latent=4).eval()
    x = counts()
    qz_m = vae.inference(x)["qz_m"]
    torch.testing.assert_close(vae.sample_from_posterior_z(x, give_mean=True), qz_m)
    draw = vae.sample_from_posterior_z(x)  # give_mean=False by default: a draw
    assert draw.shape == (12, 4) and not torch.allclose(draw, qz_m)
    latents = vae.get_latents(x)
    assert isinstance(latents, list) and len(latents) == 1 and latents[0].shape == (12, 4)
    library = vae.sample_from_posterior_l(x)
    assert library.shape == (12, 1)
    # the logistic normal's mean is the Monte Carlo mean of softmax(z)
    ln = VAE(30, n_hidden=16, n_latent=4, latent_distribution="ln").eval()
    out = ln.inference(x)
    torch.manual_seed(0)
    mean = ln.sample_from_posterior_z(x, give_mean=True, n_samples=4000)
    draws = Normal(out["qz_m"], out["qz_v"].sqrt()).sample((40000,)).softmax(-1).mean(0)
    torch.testing.assert_close(mean, draws, atol=0.025, rtol=0)  # two Monte Carlo estimates of one mean
    torch.testing.assert_close(mean.sum(-1), torch.ones(12))


def test_vae_stored_library_prior_equals_per_cell_prior():
    """forward with local_l_mean/var None uses the stored per-batch prior: the same numbers as passing it per cell."""
    torch.manual_seed(8)
    means, variances = np.array([[5.0, 6.0]]), np.array([[0.3, 0.6]])
    vae = VAE(30, n_batch=2, n_hidden=16, library_log_means=means, library_log_vars=variances).eval()
    x, batch_index = counts(), torch.tensor([0, 1] * 6).reshape(-1, 1)
    stored = _seeded(1, vae, x, None, None, batch_index)
    per_cell = _seeded(1, vae, x, torch.tensor(means[0])[batch_index].float(), torch.tensor(variances[0])[batch_index].float(), batch_index)
    for a, b in zip(stored, per_cell):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="local_l_mean"):
        VAE(30, n_hidden=16)(x, None, None)  # a latent library needs a prior from somewhere


# --------------------------------------------------------------------------------------------
# scvi.module.LDVAE


def test_ldvae_signature_and_n_layers_encoder():
    assert positional_parameters(LDVAE) == [
        ("n_input", EMPTY), ("n_batch", 0), ("n_labels", 0), ("n_hidden", 128), ("n_latent", 10),
        ("n_layers_encoder", 1), ("dropout_rate", 0.1), ("dispersion", "gene"), ("log_variational", True),
        ("gene_likelihood", "nb"), ("use_batch_norm", True), ("bias", False), ("latent_distribution", "normal"),
        ("use_observed_lib_size", False),
    ]
    ldvae = LDVAE(30, n_layers_encoder=3, n_hidden=8)
    assert len(ldvae.z_encoder.encoder.fc_layers) == 3 and len(ldvae.l_encoder.encoder.fc_layers) == 1
    with pytest.raises(ValueError, match="gene-cell"):
        LDVAE(30, dispersion="gene-cell")  # refused at construction, not at the first forward


def test_ldvae_get_loadings_by_hand():
    torch.manual_seed(9)
    ldvae = LDVAE(30, 2, n_latent=4, n_hidden=8)
    bn = ldvae.decoder.factor_regressor.fc_layers[0][1]
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    loadings = ldvae.get_loadings()
    assert isinstance(loadings, np.ndarray) and loadings.shape == (30, 4)
    W = as64(ldvae.decoder.factor_regressor.fc_layers[0][0].weight)[:, :4]
    expected = (as64(bn.weight) / np.sqrt(as64(bn.running_var) + 1e-3))[:, None] * W
    np.testing.assert_allclose(loadings, expected, rtol=1e-5)
    reconst, kl = ldvae(counts(), torch.full((12, 1), 5.0), torch.ones(12, 1), torch.zeros(12, 1, dtype=torch.long))
    assert reconst.shape == kl.shape == (12,)


# --------------------------------------------------------------------------------------------
# scvi.module.VAEC


def test_vaec_signature():
    assert positional_parameters(VAEC) == [
        ("n_input", EMPTY), ("n_labels", 0), ("n_hidden", 128), ("n_latent", 5), ("n_layers", 2),
        ("log_variational", True), ("ct_weight", None), ("dropout_rate", 0.05), ("extra_encoder_kwargs", None),
        ("extra_decoder_kwargs", None),
    ]
    vaec = VAEC(30, 3, extra_encoder_kwargs={"var_eps": 0.25}, extra_decoder_kwargs={"dropout_rate": 0.0})
    assert vaec.z_encoder.var_eps == 0.25 and vaec.decoder.fc_layers[0][4] is None
    unlabelled = VAEC(30).eval()  # n_labels defaults to 0: every cell has the one label 0
    out = unlabelled.inference(counts(), torch.zeros((12, 1), dtype=torch.long))
    assert out["qz_m"].shape == (12, 5)


def test_vaec_methods_as_documented():
    torch.manual_seed(10)
    weights = np.array([1.0, 3.0, 0.5])
    vaec = VAEC(30, 3, 16, 4, 2, True, weights).eval()
    x, y = counts(), torch.tensor([0, 1, 2] * 4).reshape(-1, 1)
    inference = vaec.inference(x, y)
    assert set(inference) == {"qz_m", "qz_v", "z", "library"}
    assert vaec.inference(x, y, 3)["z"].shape == (3, 12, 4)
    generative = vaec.generative(inference["z"], inference["library"], y)  # the documented three arguments
    tensors = {"X": x, "labels": y}
    out = vaec.loss(tensors, inference, generative, 0.4)
    mu, theta = as64(generative["px_rate"]), np.exp(as64(vaec.px_r))
    np.testing.assert_allclose(mu.sum(1), as64(x).sum(1), rtol=1e-4)  # the library is the raw total
    recon = -stats.nbinom.logpmf(as64(x), theta, theta / (theta + mu)).sum(1)
    qm, qv = as64(inference["qz_m"]), as64(inference["qz_v"])
    kl = 0.5 * (qv + qm**2 - 1 - np.log(qv)).sum(1)
    np.testing.assert_allclose(as64(out.reconstruction_loss), recon, rtol=1e-4)
    np.testing.assert_allclose(out.loss.item(), np.mean(weights[as64(y).astype(int).ravel()] * (recon + 0.4 * kl)), rtol=1e-4)

    samples = vaec.sample(tensors, 5)
    assert samples.shape == (12, 30, 5)  # (cells, genes, samples), as the page says
    assert (samples >= 0).all() and torch.equal(samples, samples.round())
    assert vaec.sample(tensors).shape == (12, 30, 1)
    with pytest.raises(ValueError, match="labels"):
        vaec.sample({"X": x})


# --------------------------------------------------------------------------------------------
# The spec exposes the documented knobs, and they reach the module


def _count_data(n_cells=40, n_genes=20, seed=0):
    import anndata as ad
    import pandas as pd

    from scvi_cli.data import count_data_from_anndata
    from scvi_cli.spec import Spec

    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2.0, 0.3, (n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1
    obs = pd.DataFrame({"cell_type": rng.choice(["B", "T", "NK"], n_cells), "batch": rng.choice(["a", "b"], n_cells)},
                       index=[f"c{i}" for i in range(n_cells)])
    adata = ad.AnnData(X=x, obs=obs)
    return lambda raw: (Spec.from_dict(raw), count_data_from_anndata(adata, Spec.from_dict(raw).data, "test.h5ad"))


def _factory_module(raw):
    from scvi_cli.model_factory import build_model, model_kwargs

    spec, data = _count_data()(raw)
    kwargs = model_kwargs(spec, data)
    return kwargs, build_model(spec.model.type, kwargs)


def test_spec_knobs_reach_the_scvi_module():
    kwargs, module = _factory_module({"model": {"scale_activation": "softplus", "var_eps": 0.01, "var_activation": "softplus"}})
    assert kwargs["scale_activation"] == "softplus" and kwargs["var_activation"] == "softplus"  # plain values in the checkpoint
    assert isinstance(module.decoder.px_scale_decoder[1], torch.nn.Softplus)
    assert module.z_encoder.var_eps == module.l_encoder.var_eps == 0.01
    assert module.z_encoder.var_activation is F.softplus


def test_spec_knobs_reach_ldvae_and_condscvi():
    _, ldvae = _factory_module({"model": {"type": "ldvae", "n_layers_encoder": 2, "var_eps": 0.1}, "data": {"batch_key": "batch"}})
    assert len(ldvae.z_encoder.encoder.fc_layers) == 2 and ldvae.z_encoder.var_eps == 0.1
    _, synonym = _factory_module({"model": {"type": "ldvae", "n_layers": 2}})
    assert len(synonym.z_encoder.encoder.fc_layers) == 2
    labelled = {"labels_key": "cell_type"}
    _, vaec = _factory_module({"model": {"type": "condscvi", "ct_weight": {"T": 2.5}}, "data": labelled})
    assert vaec.ct_weight.tolist() == [1.0, 1.0, 2.5]  # labels B, NK, T in sorted order; unlisted ones weigh 1
    _, listed = _factory_module({"model": {"type": "condscvi", "ct_weight": [0.5, 1.0, 2.0]}, "data": labelled})
    assert listed.ct_weight.tolist() == [0.5, 1.0, 2.0]
    from scvi_cli.errors import DataError

    with pytest.raises(DataError, match="'Mono'"):
        _factory_module({"model": {"type": "condscvi", "ct_weight": {"Mono": 2.0}}, "data": labelled})
    with pytest.raises(DataError, match="2 weights for the 3 labels"):
        _factory_module({"model": {"type": "condscvi", "ct_weight": [1.0, 2.0]}, "data": labelled})
