"""scvi-tools model directories (``DIR/model.pt``) -> scvi-cli checkpoints, read safely.

A ``model.pt`` is a torch.save pickle: {"model_state_dict", "var_names", "attr_dict"} with the
registry (setup arguments, categorical mappings) and ``init_params_`` in attr_dict. It is read by
torch's weights-only unpickler, allowing only what such files hold besides tensors: numpy array
reconstruction and dtypes. The pandas objects inside (the training history) are replaced by
inert stubs that take their data and do nothing; anything else is refused, naming what the file
asked for, without running it. Settings scvi-cli cannot represent are refused by name.
"""

from __future__ import annotations

import codecs
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scvi_cli.checkpoint import Checkpoint, current_versions
from scvi_cli.data.categories import NO_KEY_CATEGORY
from scvi_cli.errors import CheckpointError, first_line
from scvi_cli.model_factory import build_model, structure_kwargs
from scvi_cli.spec import Spec

MODEL_NAMES = {"SCVI": "scvi", "LinearSCVI": "ldvae", "CondSCVI": "condscvi"}
# init_params_ names -> the spec's model keys, per model type (None: accepted at the value
# scvi-cli implements, refused otherwise; see _UNSUPPORTED_VALUES)
_INIT_KEYS = {
    "scvi": {"n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion", "gene_likelihood",
             "latent_distribution", "use_observed_lib_size", "log_variational", "encode_covariates",
             "deeply_inject_covariates", "use_batch_norm", "use_layer_norm", "scale_activation", "var_eps",
             "var_activation"},
    "ldvae": {"n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion", "gene_likelihood",
              "latent_distribution", "use_observed_lib_size", "log_variational", "use_batch_norm", "bias"},
    "condscvi": {"n_hidden", "n_latent", "n_layers", "dropout_rate", "weight_obs", "log_variational"},
}
_SETUP_KEYS = {"layer", "batch_key", "labels_key", "categorical_covariate_keys", "continuous_covariate_keys",
               "size_factor_key", "fine_labels_key", "unlabeled_category"}


class _Inert:
    """Stands in for a pandas object of the file (its training history): keeps nothing, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _inert(*args, **kwargs) -> _Inert:
    return _Inert()


def _plain_dict(default_factory=None) -> dict:
    """collections.defaultdict of the file, as a plain dict (torch's unpickler fills dicts only;
    the factory is not needed to read the values)."""
    return {}


def _allowed_globals() -> list:
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    dtypes = [type(np.dtype(code)) for code in ("O", "U", "S", "b", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "?")]
    classes = ("core.frame.DataFrame", "core.series.Series", "core.indexes.base.Index", "core.indexes.range.RangeIndex",
               "core.internals.managers.BlockManager", "core.internals.managers.SingleBlockManager")
    functions = ("core.indexes.base._new_Index", "_libs.internals._unpickle_block")
    stubs = [(_Inert, f"pandas.{name}") for name in classes] + [(_inert, f"pandas.{name}") for name in functions]
    names = [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct")]
    # slice: pandas blocks record their placement as one; bytes and _codecs.encode rebuild the
    # raw bytes of numpy arrays
    return [np.ndarray, np.dtype, slice, dict, bytes, (codecs.encode, "_codecs.encode"), (_plain_dict, "collections.defaultdict"),
            *dtypes, *names, *stubs]


def model_file(path: str | Path) -> Path:
    """DIR or DIR/model.pt -> the model.pt; the pre-0.15 layout is refused with the reason."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.pt").exists():
            return path / "model.pt"
        if (path / "model_params.pt").exists() or (path / "attr.pkl").exists():
            raise CheckpointError(
                f"{path}: an scvi-tools model of the pre-0.15 layout (model_params.pt, attr.pkl): its attr.pkl "
                "is a full pickle that cannot be read safely; load it once in scvi-tools >= 0.15 and save it again"
            )
        raise CheckpointError(f"{path}: no model.pt in this directory (not an scvi-tools model directory)")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return path


def read_model_pt(path: str | Path) -> dict:
    """The dict of an scvi-tools model.pt, read without running code from it."""
    path = model_file(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not an scvi-tools model.pt (not a torch zip archive; truncated or another file?)")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's refusals and damaged archives alike
        message = first_line(error, with_type=False)
        wanted = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
        if wanted:
            raise CheckpointError(
                f"{path}: refused: the file asks to load {wanted.group(1)}, which an scvi-tools model does not "
                "hold (nothing from it was run)"
            ) from error
        raise CheckpointError(f"{path}: cannot read as an scvi-tools model.pt ({message})") from error
    if not isinstance(content, dict) or not {"model_state_dict", "var_names", "attr_dict"} <= set(content):
        keys = ", ".join(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{path}: not an scvi-tools model.pt (holds {keys})")
    return content


def _names(values) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def import_model(path: str | Path) -> Checkpoint:
    """An scvi-cli Checkpoint of the SCVI, LinearSCVI or CondSCVI model at ``path``."""
    source = model_file(path)
    content = read_model_pt(source)
    attrs = content["attr_dict"]
    registry, init = attrs.get("registry_", {}), attrs.get("init_params_", {})
    model_name = registry.get("model_name")
    if model_name not in MODEL_NAMES:
        raise CheckpointError(f"{source}: model {model_name!r} is not one scvi-cli imports ({', '.join(MODEL_NAMES)})")
    model_type = MODEL_NAMES[model_name]
    setup = dict(registry.get("setup_args", {}))
    unknown = sorted(set(setup) - _SETUP_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: setup_anndata argument(s) {', '.join(unknown)} are not supported")
    for key in ("size_factor_key", "fine_labels_key"):
        if setup.get(key) is not None:
            raise CheckpointError(f"{source}: setup_anndata({key}={setup[key]!r}) has no equivalent in scvi-cli")

    params = dict(init.get("non_kwargs", {}))
    for extra in init.get("kwargs", {}).values():  # **model_kwargs / **module_kwargs
        params.update(extra or {})
    unsupported = sorted(set(params) - _INIT_KEYS[model_type])
    if unsupported:
        raise CheckpointError(
            f"{source}: {model_name} setting(s) {', '.join(unsupported)} cannot be represented by scvi-cli"
        )
    if model_type == "ldvae" and "n_layers" in params:
        params["n_layers_encoder"] = params.pop("n_layers")
    fields = registry.get("field_registries", {})
    categories, data_spec = {}, {"layer": setup.get("layer")}
    for key, field in (("batch", "batch"), ("labels", "labels")):
        state = fields.get(field, {}).get("state_registry", {})
        mapping = state.get("categorical_mapping")
        original = state.get("original_key")
        categories[key] = _names(mapping) if mapping is not None else [NO_KEY_CATEGORY]
        if original is not None and not str(original).startswith("_scvi"):
            data_spec[f"{key}_key"] = str(original)
    if "batch_key" not in data_spec and categories["batch"] != [NO_KEY_CATEGORY]:
        data_spec["batch_key"] = setup.get("batch_key")
    cat_state = fields.get("extra_categorical_covs", {}).get("state_registry", {})
    if cat_state.get("field_keys"):
        keys = [str(k) for k in cat_state["field_keys"]]
        data_spec["categorical_covariate_keys"] = keys
        for key in keys:
            categories[key] = _names(cat_state["mappings"][key])
    cont_state = fields.get("extra_continuous_covs", {}).get("state_registry", {})
    if cont_state.get("columns") is not None:
        data_spec["continuous_covariate_keys"] = _names(cont_state["columns"])

    state_dict = {}
    for key, value in content["model_state_dict"].items():
        if isinstance(value, torch.Tensor):
            state_dict[key] = value
        elif any(value.values()) if isinstance(value, dict) else value:
            # scvi-tools 1.x stores an empty pyro_param_store ({"params": {}, "constraints": {}}) beside the weights
            raise CheckpointError(f"{source}: the state dict holds {key!r} ({type(value).__name__}), which scvi-cli cannot represent")
    genes = _names(content["var_names"])
    model_spec = {"type": model_type, **params}
    try:
        spec = Spec.from_dict({"model": model_spec, "data": data_spec}, source=str(source))
    except Exception as error:
        raise CheckpointError(f"{source}: {first_line(error, with_type=False)}") from error
    kwargs = _module_kwargs(spec, genes, categories, state_dict)
    try:
        module = build_model(model_type, kwargs)
        module.load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: the weights do not fit a {model_name} of these settings ({first_line(error, with_type=False)})") from error
    return Checkpoint(
        model_type=model_type,
        spec=spec.to_dict(),
        model_kwargs=kwargs,
        gene_names=genes,
        categories=categories,
        state_dict={k: v.detach().clone() for k, v in module.state_dict().items()},
        history={},
        training={"imported_from": str(source), "scvi_tools_version": str(registry.get("scvi_version", "unknown")),
                  "model_name": model_name},
        versions=current_versions(),
    )


def _module_kwargs(spec: Spec, genes: list[str], categories: dict, state_dict: dict) -> dict[str, Any]:
    """Constructor arguments for the module: the settings' and categories' part as for a trained
    model, the library prior and label weights from the file's own buffers."""
    kwargs = structure_kwargs(spec, len(genes), categories)
    if spec.model.type == "condscvi":
        if "ct_weight" in state_dict:
            kwargs["ct_weight"] = state_dict["ct_weight"].float().reshape(-1).tolist()
    elif not spec.model.use_observed_lib_size:
        kwargs.update(library_log_means=state_dict["library_log_means"].float().tolist(),
                      library_log_vars=state_dict["library_log_vars"].float().tolist())
    return kwargs


# --------------------------------------------------------------------------------------------
# Export: a scvi-cli checkpoint -> an scvi-tools model directory

_EXPORT_NAMES = {value: key for key, value in MODEL_NAMES.items()}


def _categorical_field(name: str, key: str | None, categories: list[str]) -> dict:
    """One categorical obs field's registry entry as scvi-tools writes it (no key: one category 0)."""
    if key is None:
        mapping, original = np.array([0]), f"_scvi_{name}"
    else:
        mapping, original = np.array(categories, dtype=object), key
    return {
        "data_registry": {"attr_name": "obs", "attr_key": f"_scvi_{name}"},
        "state_registry": {"categorical_mapping": mapping, "original_key": original},
        "summary_stats": {f"n_{name}": len(mapping)},
    }


def scvi_tools_payload(checkpoint: Checkpoint) -> dict:
    """The dict scvi-tools' ``Model.load`` reads from ``model.pt``: the weights, var_names, and a
    registry and init_params_ equal to what setup_anndata and the constructor would record."""
    model_type = checkpoint.model_type
    if model_type not in _EXPORT_NAMES:
        raise CheckpointError(f"model type {model_type!r} has no scvi-tools counterpart")
    spec = checkpoint.spec
    model, data = spec["model"], spec["data"]
    genes = np.array(checkpoint.gene_names, dtype=object)
    layer = data.get("layer")
    if layer == "raw":
        raise CheckpointError("a model trained on raw.X cannot be exported: scvi-tools reads X or a layer")
    if model_type != "condscvi" and (model.get("var_activation", "exp") != "exp" or model.get("var_eps", 1e-4) != 1e-4):
        raise CheckpointError("var_activation / var_eps other than exp / 1e-4 have no scvi-tools setting")
    batch_key, labels_key = data.get("batch_key"), data.get("labels_key")
    cat_keys, cont_keys = list(data.get("categorical_covariate_keys") or []), list(data.get("continuous_covariate_keys") or [])
    fields = {
        "X": {
            "data_registry": {"attr_name": "layers" if layer else "X", "attr_key": layer},
            "state_registry": {"n_obs": int(checkpoint.training.get("n_cells", 0)), "n_vars": len(genes), "column_names": genes},
            "summary_stats": {"n_vars": len(genes), "n_cells": int(checkpoint.training.get("n_cells", 0))},
        },
        "batch": _categorical_field("batch", batch_key, checkpoint.categories["batch"]),
        "labels": _categorical_field("labels", labels_key, checkpoint.categories["labels"]),
        "size_factor": {"data_registry": {}, "state_registry": {}, "summary_stats": {}},
    }
    dotted = [k for k in cat_keys if "." in k]
    if dotted:  # its registry is an ml_collections ConfigDict, which refuses dotted keys
        raise CheckpointError(
            f"scvi-tools cannot load categorical covariate keys with a dot ({', '.join(map(repr, dotted))}): "
            "retrain with the column renamed"
        )
    if model_type == "scvi":
        fields["extra_categorical_covs"] = (
            {"data_registry": {"attr_name": "obsm", "attr_key": "_scvi_extra_categorical_covs"},
             "state_registry": {"mappings": {k: np.array(checkpoint.categories[k], dtype=object) for k in cat_keys},
                                "field_keys": cat_keys, "n_cats_per_key": [len(checkpoint.categories[k]) for k in cat_keys]},
             "summary_stats": {"n_extra_categorical_covs": len(cat_keys)}}
            if cat_keys else {"data_registry": {}, "state_registry": {}, "summary_stats": {"n_extra_categorical_covs": 0}}
        )
        fields["extra_continuous_covs"] = (
            {"data_registry": {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous_covs"},
             "state_registry": {"columns": np.array(cont_keys, dtype=object)},
             "summary_stats": {"n_extra_continuous_covs": len(cont_keys)}}
            if cont_keys else {"data_registry": {}, "state_registry": {}, "summary_stats": {"n_extra_continuous_covs": 0}}
        )
        setup = {"layer": layer, "batch_key": batch_key, "labels_key": labels_key, "size_factor_key": None,
                 "categorical_covariate_keys": cat_keys or None, "continuous_covariate_keys": cont_keys or None}
        non_kwargs = {k: model[k] for k in ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion",
                                            "gene_likelihood", "use_observed_lib_size", "latent_distribution")}
        extra = {k: model[k] for k in ("log_variational", "encode_covariates", "deeply_inject_covariates",
                                       "use_batch_norm", "use_layer_norm")}
        if model["scale_activation"] != "softmax":  # scvi-tools' VAE sets it itself (softplus only with size factors)
            raise CheckpointError("scale_activation softplus has no scvi-tools setting (its VAE uses softmax)")
    elif model_type == "ldvae":
        if cat_keys or cont_keys:
            raise CheckpointError("LinearSCVI takes no covariates: this LDVAE cannot be exported")
        setup = {"batch_key": batch_key, "labels_key": labels_key, "layer": layer}
        non_kwargs = {"n_hidden": model["n_hidden"], "n_latent": model["n_latent"], "n_layers": model["n_layers_encoder"],
                      "dropout_rate": model["dropout_rate"], "dispersion": model["dispersion"],
                      "gene_likelihood": model["gene_likelihood"], "use_observed_lib_size": model["use_observed_lib_size"],
                      "latent_distribution": model["latent_distribution"]}
        extra = {k: model[k] for k in ("log_variational", "use_batch_norm", "bias")}
    else:
        setup = {"batch_key": batch_key, "labels_key": labels_key, "fine_labels_key": None, "layer": layer,
                 "unlabeled_category": "unlabeled", "size_factor_key": None}
        non_kwargs = {k: model[k] for k in ("n_hidden", "n_latent", "n_layers", "weight_obs", "dropout_rate")}
        extra = {"log_variational": model["log_variational"]} if not model["log_variational"] else {}
        fields = {k: fields[k] for k in ("X", "labels", "batch", "size_factor")}
    registry = {
        "scvi_version": "1.5.1",
        "model_name": _EXPORT_NAMES[model_type],
        "setup_args": setup,
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
    }
    return {
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in checkpoint.state_dict.items()},
        "var_names": genes,
        "attr_dict": {"registry_": registry, "init_params_": {"non_kwargs": non_kwargs, "kwargs": {"kwargs": extra}},
                      "is_trained_": True},
    }


def export_model(checkpoint: Checkpoint, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``out_dir/model.pt`` for scvi-tools (atomically); an existing one needs ``overwrite``."""
    from scvi_cli.atomic import atomic_write
    from scvi_cli.errors import OutputError

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    target = out_dir / "model.pt"
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: exists; pass --overwrite to replace it")
    payload = scvi_tools_payload(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp:
        torch.save(payload, tmp)
    return target
