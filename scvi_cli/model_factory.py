"""Spec + data facts -> module constructor arguments -> module, and back from a checkpoint.

The constructor arguments are plain values (lists, not arrays) so that they are stored in the
checkpoint verbatim and a model is rebuilt from the file alone.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from scvi_cli.data import CountData
from scvi_cli.data.counts import library_log_priors_from_totals
from scvi_cli.errors import DataError
from scvi_cli.models import LDVAE, VAE, VAEC
from scvi_cli.spec import Spec

# Below this variance of log total counts a Normal prior on the library is degenerate: its KL
# term (never warmed up) would swamp the loss, e.g. after downsampling every cell to one depth.
MIN_LIBRARY_LOG_VAR = 1e-6

MODULES: dict[str, type[nn.Module]] = {"scvi": VAE, "ldvae": LDVAE, "condscvi": VAEC}


def inverse_label_weights(label_codes: np.ndarray, n_labels: int) -> list[float]:
    """CondSCVI's ``weight_obs``: 1 / label proportion, proportions floored at 0.05 and renormalised."""
    proportions = np.bincount(label_codes, minlength=n_labels) / len(label_codes)
    proportions = np.maximum(proportions, 0.05)
    proportions = proportions / proportions.sum()
    return (1.0 / proportions).tolist()


def label_weights(ct_weight: dict | list, data: CountData, labels_key: str | None) -> list[float]:
    """model.ct_weight as one weight per label code: a list in label order, or {label: weight}
    with unlisted labels at 1; a wrong length or an unknown label is a DataError naming it."""
    labels = [str(c) for c in data.categories["labels"]]
    if isinstance(ct_weight, list):
        if len(ct_weight) != len(labels):
            raise DataError(
                f"{data.source}: model.ct_weight lists {len(ct_weight)} weights for the "
                f"{len(labels)} labels of obs[{labels_key!r}] ({', '.join(labels)})"
            )
        return [float(w) for w in ct_weight]
    unknown = [name for name in ct_weight if name not in labels]
    if unknown:
        raise DataError(
            f"{data.source}: model.ct_weight names {', '.join(map(repr, unknown))}, not a label of "
            f"obs[{labels_key!r}] ({', '.join(labels)})"
        )
    return [float(ct_weight.get(name, 1.0)) for name in labels]


def model_kwargs(spec: Spec, data: CountData) -> dict:
    """Constructor arguments of the spec's module for this data (plain values only)."""
    model = spec.model
    if model.type == "condscvi" and data.n_labels < 2:
        raise DataError(
            f"{data.source}: CondSCVI needs at least 2 cell types in obs[{spec.data.labels_key!r}], "
            f"found {data.n_labels} ({', '.join(data.categories['labels'])})"
        )
    kwargs = structure_kwargs(spec, data.n_genes, data.categories)
    if model.type == "condscvi":
        if model.weight_obs:
            kwargs["ct_weight"] = inverse_label_weights(data.label_codes, data.n_labels)
        elif model.ct_weight is not None:
            kwargs["ct_weight"] = label_weights(model.ct_weight, data, spec.data.labels_key)
        return kwargs
    if not model.use_observed_lib_size:
        sizes = np.bincount(data.batch_codes, minlength=data.n_batch)
        small = [f"{data.categories['batch'][b]!r} ({sizes[b]} cell)" for b in np.flatnonzero(sizes < 2)]
        if small:
            raise DataError(
                f"{data.source}: the latent library's prior needs at least 2 cells per batch; "
                f"obs[{spec.data.batch_key!r}] has {', '.join(small)}"
            )
        means, variances = library_log_priors_from_totals(data.cell_totals(), data.batch_codes, data.n_batch)
        flat = [data.categories["batch"][b] for b in np.flatnonzero(variances[0] < MIN_LIBRARY_LOG_VAR)]
        if flat:
            where = "every cell" if data.n_batch == 1 else f"every cell of batch {', '.join(map(repr, flat))}"
            raise DataError(
                f"{data.source}: {where} has (nearly) the same total count, so the latent library's "
                "prior has no variance; set model.use_observed_lib_size: true"
            )
        kwargs.update(library_log_means=means.tolist(), library_log_vars=variances.tolist())
    return kwargs


def structure_kwargs(spec: Spec, n_genes: int, categories: dict[str, list[str]]) -> dict:
    """The constructor arguments that follow from the settings, the genes and the categories
    alone; what the counts add (a latent library's prior, label weights) is model_kwargs' part,
    or the imported file's (interop)."""
    model = spec.model
    n_batch, n_labels = len(categories["batch"]), len(categories["labels"])
    if model.type == "condscvi":
        return dict(
            n_input=n_genes,
            n_labels=n_labels,
            n_hidden=model.n_hidden,
            n_latent=model.n_latent,
            n_layers=model.n_layers,
            log_variational=model.log_variational,
            dropout_rate=model.dropout_rate,
            n_batch=n_batch,
        )
    kwargs = dict(
        n_input=n_genes,
        n_batch=n_batch,
        n_labels=n_labels,
        n_hidden=model.n_hidden,
        n_latent=model.n_latent,
        dropout_rate=model.dropout_rate,
        dispersion=model.dispersion,
        log_variational=model.log_variational,
        gene_likelihood=model.gene_likelihood,
        latent_distribution=model.latent_distribution,
        use_observed_lib_size=model.use_observed_lib_size,
        var_activation=model.var_activation,
        var_eps=model.var_eps,
    )
    if model.type == "scvi":
        cat_keys = list(spec.data.categorical_covariate_keys)
        kwargs.update(
            n_layers=model.n_layers,
            n_continuous_cov=len(spec.data.continuous_covariate_keys),
            n_cats_per_cov=[len(categories[key]) for key in cat_keys],
            encode_covariates=model.encode_covariates,
            deeply_inject_covariates=model.deeply_inject_covariates,
            use_batch_norm=model.use_batch_norm,
            use_layer_norm=model.use_layer_norm,
            scale_activation=model.scale_activation,
        )
    else:
        kwargs.update(n_layers_encoder=model.n_layers_encoder, use_batch_norm=model.use_batch_norm, bias=model.bias)
    return kwargs


def build_model(model_type: str, kwargs: dict) -> nn.Module:
    """Instantiate the module for ``model_type`` ('scvi' | 'ldvae' | 'condscvi')."""
    kwargs = dict(kwargs)
    for key in ("library_log_means", "library_log_vars", "ct_weight"):
        if kwargs.get(key) is not None:
            kwargs[key] = np.asarray(kwargs[key], dtype=np.float32)
    return MODULES[model_type](**kwargs)
