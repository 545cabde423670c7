"""Generate tests/data/scvi_tools_parity.pt with scvi-tools 1.5.1 installed (not a dependency of scvi-cli).

Usage, from the repository root, in an environment with scvi-tools 1.5.1 and torch 2.13:
    python tools/make_scvi_tools_parity.py tests/data/scvi_tools_parity.pt

For each configuration: build the scvi-tools module with a fixed seed, perturb its batch-norm
statistics (and a few parameters initialised to constants), run it in eval mode on small count
data and record the sampling-free quantities: q(z|x) mean/variance, q(l|x) mean/variance, the
generative outputs at z = transform(qz.loc) and library = observed log-library (or ql.loc,
or the raw total for VAEC), the per-cell log-likelihood and the loss terms via module.loss().
"""

import sys

import numpy as np
import scvi
import torch
from scvi import REGISTRY_KEYS as K
from scvi.module import LDVAE, VAE, VAEC

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/data/scvi_tools_parity.pt"
N_CELLS, N_GENES, N_HIDDEN = 24, 40, 32
KL_WEIGHT = 0.3
TRANSFORM_BATCH = 1


def t(v):
    return v.detach().clone().contiguous()


def make_inputs(seed, n_batch, n_labels):
    g = torch.Generator().manual_seed(seed)
    gene_mean = torch.exp(torch.randn(N_GENES, generator=g) * 1.2)  # a spread of expression levels
    cell_size = torch.exp(torch.randn(N_CELLS, 1, generator=g) * 0.4)
    mu = gene_mean * cell_size
    theta = 2.0
    gamma = torch._standard_gamma(torch.full((N_CELLS, N_GENES), theta), generator=g) * mu / theta
    x = torch.poisson(gamma, generator=g)
    # half the genes Poisson, half NB
    x[:, ::2] = torch.poisson(mu[:, ::2], generator=g)
    empty = x.sum(1) == 0
    x[empty, 0] = 1.0
    assert (x.sum(1) > 0).all() and (x == 0).any()
    return {
        "x": x,
        "batch_index": torch.randint(0, max(n_batch, 1), (N_CELLS, 1), generator=g),
        "labels": torch.randint(0, max(n_labels, 1), (N_CELLS, 1), generator=g),
        "cont_covs": torch.randn(N_CELLS, 2, generator=g),
        "cat_covs": torch.stack(
            [torch.randint(0, 3, (N_CELLS,), generator=g), torch.randint(0, 4, (N_CELLS,), generator=g)], 1
        ),
    }


def perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.4 * (torch.rand(m.bias.shape, generator=g) - 0.5))
                m.num_batches_tracked.fill_(7)
        if hasattr(module, "per_ct_bias"):
            module.per_ct_bias.copy_(0.5 * torch.randn(module.per_ct_bias.shape, generator=g))


LIB_MEANS = [[4.0, 4.5, 4.2]]
LIB_VARS = [[0.5, 0.3, 0.4]]

CONFIGS = {
    "vae_zinb_gene": dict(module="VAE", kwargs=dict(n_batch=3, n_labels=2), covariates=False),
    "vae_nb_gene_batch_latent_library": dict(
        module="VAE",
        kwargs=dict(
            n_batch=3,
            dispersion="gene-batch",
            gene_likelihood="nb",
            use_observed_lib_size=False,
            library_log_means=LIB_MEANS,
            library_log_vars=LIB_VARS,
        ),
        covariates=False,
    ),
    "vae_zinb_gene_label": dict(module="VAE", kwargs=dict(n_batch=3, n_labels=4, dispersion="gene-label"), covariates=False),
    "vae_poisson_gene_cell": dict(
        module="VAE", kwargs=dict(n_batch=3, dispersion="gene-cell", gene_likelihood="poisson"), covariates=False
    ),
    "vae_two_layers_covariates": dict(
        module="VAE",
        kwargs=dict(n_batch=3, n_layers=2, n_continuous_cov=2, n_cats_per_cov=[3, 4], encode_covariates=True),
        covariates=True,
    ),
    "vae_ln_layer_norm": dict(
        module="VAE",
        kwargs=dict(n_batch=3, latent_distribution="ln", use_layer_norm="both", use_batch_norm="none"),
        covariates=False,
    ),
    "ldvae": dict(
        module="LDVAE", kwargs=dict(n_batch=3, library_log_means=LIB_MEANS, library_log_vars=LIB_VARS), covariates=False
    ),
    "vaec": dict(module="VAEC", kwargs=dict(n_labels=3, n_batch=2, ct_weight=[1.0, 2.0, 0.5]), covariates=False),
}

ARRAY_KWARGS = ("library_log_means", "library_log_vars", "ct_weight")


def build(spec):
    kwargs = dict(n_input=N_GENES, n_hidden=N_HIDDEN, **spec["kwargs"])
    ref_kwargs = {k: (np.asarray(v, dtype=np.float32) if k in ARRAY_KWARGS else v) for k, v in kwargs.items()}
    cls = {"VAE": VAE, "LDVAE": LDVAE, "VAEC": VAEC}[spec["module"]]
    return cls(**ref_kwargs), kwargs


@torch.no_grad()
def run_vae(module, inputs, covariates):
    tensors = {K.X_KEY: inputs["x"], K.BATCH_KEY: inputs["batch_index"], K.LABELS_KEY: inputs["labels"]}
    if covariates:
        tensors[K.CONT_COVS_KEY] = inputs["cont_covs"]
        tensors[K.CAT_COVS_KEY] = inputs["cat_covs"]
    inf = module.inference(**module._get_inference_input(tensors))
    qz, ql = inf["qz"], inf["ql"]
    z = module.z_encoder.z_transformation(qz.loc)
    library = torch.log(inputs["x"].sum(1, keepdim=True)) if module.use_observed_lib_size else ql.loc
    inf = dict(inf, z=z, library=library)
    gen_in = module._get_generative_input(tensors, inf)
    gen = module.generative(**gen_in)
    px = gen["px"]
    out = {"qz_m": qz.loc, "qz_v": qz.scale**2, "z": z, "library": library, "px_scale": px.scale}
    if ql is not None:
        out.update(ql_m=ql.loc, ql_v=ql.scale**2)
    out["px_rate"] = px.mu if hasattr(px, "mu") else px.rate
    if hasattr(px, "theta"):
        out["px_r"] = px.theta
    if hasattr(px, "zi_logits"):
        out["px_dropout"] = px.zi_logits
    out["log_prob"] = px.log_prob(inputs["x"]).sum(-1)
    loss = module.loss(tensors, inf, gen, kl_weight=KL_WEIGHT)
    out.update(
        loss=loss.loss,
        reconstruction_loss=loss.reconstruction_loss["reconstruction_loss"],
        kl_z=loss.kl_local["kl_divergence_z"],
        kl_l=loss.kl_local["kl_divergence_l"],
    )
    gen_tb = module.generative(**gen_in, transform_batch=TRANSFORM_BATCH)
    out["px_rate_transform_batch"] = gen_tb["px"].mu if hasattr(gen_tb["px"], "mu") else gen_tb["px"].rate
    return out


@torch.no_grad()
def run_vaec(module, inputs):
    tensors = {K.X_KEY: inputs["x"], K.BATCH_KEY: inputs["batch_index"], K.LABELS_KEY: inputs["labels"]}
    inf = module.inference(**module._get_inference_input(tensors))
    qz = inf["qz"]
    library = inputs["x"].sum(1, keepdim=True)
    inf = dict(inf, z=qz.loc, library=library)
    gen = module.generative(**module._get_generative_input(tensors, inf))
    px = gen["px"]
    loss = module.loss(tensors, inf, gen, kl_weight=KL_WEIGHT)
    return {
        "qz_m": qz.loc,
        "qz_v": qz.scale**2,
        "z": qz.loc,
        "library": library,
        "px_scale": px.scale,
        "px_rate": px.mu,
        "px_r": px.theta,
        "log_prob": px.log_prob(inputs["x"]).sum(-1),
        "loss": loss.loss,
        "reconstruction_loss": loss.reconstruction_loss["reconstruction_loss"],
        "kl_z": loss.kl_local["kl_local"],
    }


def main():
    fixture = {
        "scvi_tools_version": str(scvi.__version__),
        "torch_version": str(torch.__version__),
        "n_cells": N_CELLS,
        "n_genes": N_GENES,
        "kl_weight": KL_WEIGHT,
        "transform_batch": TRANSFORM_BATCH,
        "configs": {},
    }
    for i, (name, spec) in enumerate(CONFIGS.items()):
        torch.manual_seed(1000 + i)
        module, kwargs = build(spec)
        perturb(module, 2000 + i)
        module.eval()
        n_batch = spec["kwargs"].get("n_batch", 0)
        n_labels = spec["kwargs"].get("n_labels", 0)
        inputs = make_inputs(3000 + i, n_batch, n_labels)
        torch.manual_seed(4000 + i)
        if spec["module"] == "VAEC":
            expected = run_vaec(module, inputs)
        else:
            expected = run_vae(module, inputs, spec["covariates"])
        if spec["module"] == "LDVAE":
            expected["loadings"] = torch.from_numpy(module.get_loadings())
        if not spec["covariates"]:
            inputs.pop("cont_covs")
            inputs.pop("cat_covs")
        for key, value in expected.items():
            assert torch.isfinite(value).all(), (name, key)
        fixture["configs"][name] = {
            "module": spec["module"],
            "kwargs": kwargs,
            "covariates": spec["covariates"],
            "state_dict": {k: t(v) for k, v in module.state_dict().items()},
            "inputs": {k: t(v) for k, v in inputs.items()},
            "expected": {k: t(v) for k, v in expected.items()},
        }
    torch.save(fixture, OUT)
    back = torch.load(OUT, weights_only=True)
    assert set(back["configs"]) == set(CONFIGS)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
