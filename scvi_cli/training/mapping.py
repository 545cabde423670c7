"""Map a query onto a trained reference (scArches' architecture surgery, as scvi-tools'
``load_query_data`` does it), then fine-tune on the query cells only.

The surgery: the batch (and categorical covariate) categories gain the query's unseen values,
appended after the reference's; every layer that reads their one-hot code gets new input columns
(freshly initialised under the run's seed), the reference's columns are copied unchanged. The
freezing follows scvi-tools' defaults (``QueryOptions``): only the new columns, and the decoder's
batch-norm scale and shift, learn. Frozen weights are bit-identical afterwards: their gradients are exactly zero
and the query is trained without weight decay, so Adam never moves them.

Where scvi-tools 1.5.1 differs, so that "frozen" means frozen and new categories are whole:

* the gradient of a covariate layer is kept for the *new* columns only (scvi-tools keeps it for
  every covariate column, so reference categories that query cells also carry would move);
* a reference with a single batch has no batch columns at all; its one category gets a column of
  zeros (reference cells decode as before) and only the new categories' columns learn;
* new columns go at the end of their own covariate's block (scvi-tools appends every new column
  at the end of the layer's input, which misplaces them when a categorical covariate follows);
* the library encoder is frozen like the other encoder (scvi-tools trains it whole);
* with ``dispersion: gene-batch`` the new batches' dispersions learn (scvi-tools leaves them at
  their random initial values).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scvi_cli.data import CountData, load_count_data, read_h5ad
from scvi_cli.data.categories import _categorical_codes, _obs_column
from scvi_cli.data.counts import library_log_priors_from_totals
from scvi_cli.errors import CheckpointError, DataError, UsageError
from scvi_cli.model_factory import MIN_LIBRARY_LOG_VAR, build_model
from scvi_cli.nn.fc_layers import BATCH_NORM, LINEAR, FCLayers
from scvi_cli.spec import Spec, apply_overrides, _validate
from scvi_cli.trained_model import TrainedModel, ignoring_labels, load_trained_model
from scvi_cli.atomic import check_writable, refuse_input_as_output
from scvi_cli.checkpoint import Checkpoint, save_checkpoint, write_history_csv
from scvi_cli.training.job import FreshModel, TrainResult, history_path_for, train_from_h5ad

MAPPABLE = ("scvi", "ldvae")
# The spec keys a query run may change: the optimisation, and how the file is read. The model's
# structure and covariates are the reference's.
OVERRIDABLE = ("train.", "data.layer", "data.backed")


@dataclass(frozen=True)
class QueryOptions:
    """What the query run trains; the defaults are scvi-tools' ``load_query_data`` defaults.

    unfrozen: train every parameter (no surgery-specific freezing at all).
    freeze_dropout: dropout off while training the query.
    freeze_expression: the encoders' first layer keeps its gene weights (only its new covariate
        columns learn, when the encoders see covariates).
    freeze_decoder_first_layer: the same for the decoder's first layer.
    freeze_batchnorm_encoder / freeze_batchnorm_decoder: batch-norm scale and shift stay the
        reference's.

    Every batch norm normalises with the reference's running statistics while the query trains
    (it is held in eval mode) and none of them is updated: that is what scvi-tools does in
    practice (its query module stays in eval mode through training), and it keeps the reference's
    statistics exact. A trainable batch norm learns its scale and shift only.
    """

    unfrozen: bool = False
    freeze_dropout: bool = False
    freeze_expression: bool = True
    freeze_decoder_first_layer: bool = True
    freeze_batchnorm_encoder: bool = True
    freeze_batchnorm_decoder: bool = False


def query_spec(reference: TrainedModel, overrides: list[str]) -> Spec:
    """The reference's spec with the query run's own ``--set`` values; training without weight
    decay (frozen weights would decay otherwise) and the epoch heuristic on the query's size."""
    for text in overrides:
        key = text.partition("=")[0].strip()
        if not key.startswith(OVERRIDABLE):
            raise UsageError(
                f"--set {text}: map keeps the reference's model and covariates; only train.*, data.layer "
                "and data.backed can be set"
            )
    raw = dict(reference.checkpoint.spec)
    raw["train"] = {**raw.get("train", {}), "weight_decay": 0.0, "max_epochs": None}
    origins = {text.partition("=")[0].strip(): text for text in overrides}
    spec = _validate(apply_overrides(raw, overrides), None, origins)
    if spec.train.weight_decay != 0:
        raise UsageError(
            f"train.weight_decay={spec.train.weight_decay}: map trains without weight decay (it would move the frozen weights)"
        )
    return spec


def _new_values(obs, key: str, spec_field: str, path: str, reference: list[str]) -> list[str]:
    """The values of obs[key] that the reference has no category for, in category order."""
    _, values = _categorical_codes(_obs_column(obs, key, spec_field, path), key, path, None)
    known = set(reference)
    return [v for v in values if v not in known]


class QuerySurgery(FreshModel):
    """A run's setup for ``map``: query cells coded against the extended categories, the module
    grafted from the reference, the freezing of ``options``."""

    def __init__(self, reference: TrainedModel, options: QueryOptions, allow_missing_genes: bool = False, reporter=None):
        if reference.model_type not in MAPPABLE:
            raise CheckpointError(
                f"{reference.path}: holds a {reference.model_type} model; map extends scVI and LDVAE references "
                "(CondSCVI is a reference for cell-type deconvolution and is not mapped onto)"
            )
        self.reference = reference
        self.options = options
        self.allow_missing_genes = allow_missing_genes
        self.reporter = reporter
        self.categories: dict[str, list[str]] | None = None  # the reference's, extended
        self.new_categories: dict[str, list[str]] = {}
        self.trained: list[str] = []
        self._held_norms: list[nn.Module] = []
        self._hooks: list = []
        with open(reference.path, "rb") as fh:
            self.reference_sha256 = hashlib.file_digest(fh, "sha256").hexdigest()

    # -- data -----------------------------------------------------------------------------------
    def find_new_categories(self, data_path, spec: Spec) -> None:
        """Read the query's obs and append its unseen batch / covariate values to the reference's."""
        ref = self.reference.checkpoint
        path = str(data_path)
        obs = read_h5ad(data_path, backed=True).obs
        self.categories = {key: list(values) for key, values in ref.categories.items()}
        keys = [("batch", spec.data.batch_key, "data.batch_key")]
        keys += [(k, k, "data.categorical_covariate_keys") for k in spec.data.categorical_covariate_keys]
        for role, key, field in keys:
            if key is None:
                continue
            new = _new_values(obs, key, field, path, ref.categories[role])
            if new:
                self.categories[role] = self.categories[role] + new
                self.new_categories[role] = new

    def load_data(self, data_path, spec: Spec) -> CountData:
        """The query's counts on the reference's genes, coded against the extended categories."""
        ref = self.reference.checkpoint
        if self.categories is None:
            self.find_new_categories(data_path, spec)
        data_spec, categories = ignoring_labels(self.reference.module, spec.data, self.categories)
        data = load_count_data(
            data_path, data_spec, categories=categories, gene_names=ref.gene_names,
            allow_missing_genes=self.allow_missing_genes, backed=spec.data.backed,
        )
        data.categories["labels"] = list(ref.categories["labels"])  # the checkpoint keeps the reference's
        if self.reporter is not None:
            self.reporter.message(self.describe_categories(spec))
        return data

    def describe_categories(self, spec: Spec) -> str:
        if not self.new_categories:
            if spec.data.batch_key is None:
                return "the reference has no batch key: the query is mapped as is, nothing is trained"
            return (
                f"the query has no {spec.data.batch_key!r} values new to the reference: it is mapped as is, "
                "nothing is trained"
            )
        shown = "; ".join(f"{'batch' if k == 'batch' else k}: {', '.join(map(repr, v))}" for k, v in self.new_categories.items())
        return f"new categories appended after the reference's ({shown})"

    @property
    def nothing_new(self) -> bool:
        return not self.new_categories

    # -- module ---------------------------------------------------------------------------------
    def build(self, spec: Spec, data: CountData) -> tuple[nn.Module, dict]:
        ref = self.reference
        kwargs = dict(ref.checkpoint.model_kwargs)
        kwargs["n_batch"] = data.n_batch
        if "n_cats_per_cov" in kwargs:
            kwargs["n_cats_per_cov"] = data.n_cats_per_cov
        if kwargs.get("library_log_means") is not None and "batch" in self.new_categories:
            kwargs.update(self._library_priors(data, kwargs))
        module = build_model(ref.model_type, kwargs)
        graft(ref.module, module, old_sizes(ref.checkpoint.categories, spec), old_sizes(data.categories, spec))
        return module, kwargs

    def _library_priors(self, data: CountData, kwargs: dict) -> dict:
        """The reference's library prior per batch, and the query's for its new batches."""
        n_old = len(self.reference.checkpoint.categories["batch"])
        means, variances = library_log_priors_from_totals(
            data.cell_totals()[data.batch_codes >= n_old], data.batch_codes[data.batch_codes >= n_old] - n_old,
            data.n_batch - n_old,
        )
        flat = [data.categories["batch"][n_old + b] for b in np.flatnonzero(variances[0] < MIN_LIBRARY_LOG_VAR)]
        if flat:
            raise DataError(
                f"{data.source}: every cell of batch {', '.join(map(repr, flat))} has (nearly) the same total count, "
                "so the latent library's prior has no variance"
            )
        return {
            "library_log_means": [list(kwargs["library_log_means"][0]) + means[0].tolist()],
            "library_log_vars": [list(kwargs["library_log_vars"][0]) + variances[0].tolist()],
        }

    def prepare(self, model: nn.Module) -> None:
        self.trained, self._held_norms, self._hooks = freeze_for_query(
            model, self.options, old_sizes(self.reference.checkpoint.categories, self.reference.spec)
        )

    def finish(self, model: nn.Module) -> None:
        """Remove the gradient hooks and the batch norms' hold on eval mode."""
        release_query_training(self._held_norms, self._hooks)

    def identity(self) -> dict:
        """The reference by content (not by path: a resumed run may spell it differently)."""
        return {"reference_sha256": self.reference_sha256, "new_categories": self.new_categories,
                "options": asdict(self.options)}

    def facts(self) -> dict:
        mapping = {
            "reference": str(self.reference.path),
            "reference_sha256": self.reference_sha256,
            "reference_fingerprint": self.reference.checkpoint.training.get("fingerprint"),
            "new_categories": {k: list(v) for k, v in self.new_categories.items()},
            "options": asdict(self.options),
        }
        if self.trained:
            mapping["trained"] = list(self.trained)
        return {"mapping": mapping}


def old_sizes(categories: dict[str, list[str]], spec: Spec) -> list[int]:
    """Number of categories of each one-hot covariate, in the order layers read them."""
    return [len(categories["batch"])] + [len(categories[k]) for k in spec.data.categorical_covariate_keys]


# ---------------------------------------------------------------------------------------------
# Surgery: copy the reference into the wider module, column by column


def _covariate_columns(layer_in: int, sizes: list[int]) -> tuple[int, list[int]]:
    """(columns before the covariates, width of each covariate block); one-category covariates
    take no columns (FCLayers drops them)."""
    widths = [n if n > 1 else 0 for n in sizes]
    return layer_in - sum(widths), widths


def column_map(layer_in_new: int, old: list[int], new: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """For a covariate layer's input columns: (new position of each old column, is-new mask).

    The old layer's columns are [base, cov 1 (old[0] wide, or 0), cov 2, ...]; the new layer's
    the same with the wider blocks. A block that had no columns (one category) gets its first
    column marked old: it is the reference's category, set to zero rather than copied.
    """
    base, new_widths = _covariate_columns(layer_in_new, new)
    old_widths = [n if n > 1 else 0 for n in old]
    positions = list(range(base))
    is_new = np.zeros(layer_in_new, dtype=bool)
    start = base
    for width_old, width_new, n_old in zip(old_widths, new_widths, old):
        positions += list(range(start, start + width_old))
        if width_new:
            first_new = start + (width_old if width_old else min(n_old, width_new))
            is_new[first_new : start + width_new] = True
        start += width_new
    return np.asarray(positions, dtype=np.int64), is_new


def _covariate_layers(module: nn.Module):
    """(qualified name of the Linear, FCLayers, layer index) of every Linear reading covariates."""
    for name, fc in module.named_modules():
        if isinstance(fc, FCLayers) and sum(fc.n_cat_list):
            for i, block in enumerate(fc.fc_layers):
                if fc.injects_into(i):
                    yield f"{name}.fc_layers.Layer {i}.{LINEAR}", fc, i


@torch.no_grad()
def graft(reference: nn.Module, module: nn.Module, old: list[int], new: list[int]) -> None:
    """Copy ``reference``'s weights into ``module`` (the same model with more categories): equal
    shapes verbatim, covariate layers column by column, per-batch tensors batch by batch."""
    ref_state = reference.state_dict()
    placed: set[str] = set()
    for linear_name, _, _ in _covariate_layers(module):
        weight = module.get_submodule(linear_name).weight
        old_weight = ref_state[f"{linear_name}.weight"]
        positions, is_new = column_map(weight.shape[1], old, new)
        if len(positions) != old_weight.shape[1]:
            raise RuntimeError(f"{linear_name}: {old_weight.shape[1]} reference columns, the surgery expects {len(positions)}")
        unplaced = np.ones(weight.shape[1], dtype=bool)
        unplaced[positions] = False
        weight[:, torch.as_tensor(unplaced & ~is_new)] = 0.0  # a one-category reference's column
        weight[:, torch.as_tensor(positions)] = old_weight
        placed.add(f"{linear_name}.weight")
    n_old_batch = old[0]
    for name, tensor in module.state_dict().items():
        if name in placed:
            continue
        source = ref_state[name]
        if source.shape == tensor.shape:
            tensor.copy_(source)
        elif name in ("px_r", "library_log_means", "library_log_vars") and source.shape[-1] == n_old_batch:
            tensor[..., :n_old_batch] = source  # the new batches' columns: fresh (px_r) or the query's prior
        else:
            raise RuntimeError(f"{name}: shape {tuple(source.shape)} in the reference, {tuple(tensor.shape)} after surgery")


# ---------------------------------------------------------------------------------------------
# Freezing


class _ColumnMask:
    """A gradient hook keeping the gradient of some columns only; the mask follows the device."""

    def __init__(self, keep: np.ndarray):
        self.keep = torch.as_tensor(keep, dtype=torch.float32)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.keep.device != grad.device or self.keep.dtype != grad.dtype:
            self.keep = self.keep.to(grad.device, grad.dtype)
        return grad * self.keep


def freeze_for_query(model: nn.Module, options: QueryOptions, old: list[int]):
    """Set what trains for a query run; returns (names of trained parameters, with '[new
    columns]' where only those learn; the batch norms held in eval mode; the gradient hooks)."""
    params = dict(model.named_parameters())
    trainable: dict[str, str] = {}  # name -> "" (all of it) or " [new columns]"
    hooks, held_norms = [], []
    if options.unfrozen:
        trainable = {name: "" for name in params}
    else:
        for name, fc in model.named_modules():  # first layers a switch sets free: all of them learns
            if isinstance(fc, FCLayers) and (
                (not options.freeze_expression and "encoder" in name)
                or (not options.freeze_decoder_first_layer and "px_decoder" in name)
            ):
                linear_name = f"{name}.fc_layers.Layer 0.{LINEAR}"
                trainable.update({n: "" for n in params if n.startswith(linear_name + ".")})
        for linear_name, fc, _ in _covariate_layers(model):  # the others: their new columns only
            weight_name = f"{linear_name}.weight"
            if weight_name in trainable:
                continue
            _, is_new = column_map(params[weight_name].shape[1], old, _new_sizes(fc))
            hooks.append(params[weight_name].register_hook(_ColumnMask(is_new[None, :])))
            trainable[weight_name] = " [new columns]"
        if "px_r" in params and params["px_r"].dim() == 2 and _disperses_by_batch(model):
            keep = np.zeros(params["px_r"].shape[1], dtype=bool)
            keep[old[0]:] = True
            hooks.append(params["px_r"].register_hook(_ColumnMask(keep[None, :])))
            trainable["px_r"] = " [new columns]"
    for name, norm in model.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm too
            continue
        frozen = not options.unfrozen and (
            (options.freeze_batchnorm_encoder and "encoder" in name)
            or (options.freeze_batchnorm_decoder and "decoder" in name)
        )
        _hold_in_eval_mode(norm)
        held_norms.append(norm)
        if not frozen and norm.affine:
            trainable.update({f"{name}.weight": "", f"{name}.bias": ""})
    if options.freeze_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    return [name + trainable[name] for name in params if name in trainable], held_norms, hooks


def _hold_in_eval_mode(module: nn.Module) -> None:
    """``module.train()`` (called by the loop every epoch) leaves this module in eval mode."""
    module.train = lambda mode=True, _m=module: nn.Module.train(_m, False)
    nn.Module.train(module, False)


def release_query_training(held_norms: list[nn.Module], hooks: list) -> None:
    """Undo freeze_for_query's hooks and holds (the weights stay as trained)."""
    for norm in held_norms:
        norm.__dict__.pop("train", None)
    for hook in hooks:
        hook.remove()


def _new_sizes(fc: FCLayers) -> list[int]:
    """The category counts an FCLayers was built for (one-category covariates read as 1)."""
    return [n if n else 1 for n in fc.n_cat_list]


def _disperses_by_batch(model: nn.Module) -> bool:
    return getattr(model, "dispersion", None) == "gene-batch"


# ---------------------------------------------------------------------------------------------
# The run


def map_query(
    reference_path: str | Path,
    query_path: str | Path,
    out_path: str | Path,
    *,
    overrides: list[str] | None = None,
    options: QueryOptions = QueryOptions(),
    allow_missing_genes: bool = False,
    reporter=None,
    **run_options,
) -> TrainResult:
    """Extend the reference at ``reference_path`` for the query's new categories and train on
    the query cells; the checkpoint at ``out_path`` serves reference and query cells alike.
    ``run_options`` are train_from_h5ad's (device, threads, checkpoint_every, resume, ...)."""
    reference = load_trained_model(reference_path)
    spec = query_spec(reference, list(overrides or []))
    setup = QuerySurgery(reference, options, allow_missing_genes, reporter)
    setup.find_new_categories(query_path, spec)
    if setup.nothing_new:
        return _map_as_is(setup, query_path, spec, out_path)
    return train_from_h5ad(query_path, spec, out_path, reporter=reporter, setup=setup, **run_options)


def _map_as_is(setup: QuerySurgery, query_path, spec: Spec, out_path) -> TrainResult:
    """No category is new: the reference embeds the query already. The output is the reference's
    checkpoint with the lineage added (the query is still read and checked against its genes)."""
    out_path = Path(out_path)
    for path in (out_path, history_path_for(out_path)):
        check_writable(path)
        refuse_input_as_output(path, query_path)
    refuse_input_as_output(out_path, setup.reference.path)
    setup.load_data(query_path, spec)
    ref = setup.reference.checkpoint
    training = {**ref.training, **setup.facts()}
    training["mapping"]["trained"] = []
    checkpoint = Checkpoint(
        model_type=ref.model_type, spec=spec.to_dict(), model_kwargs=ref.model_kwargs, gene_names=ref.gene_names,
        categories=ref.categories, state_dict=ref.state_dict, history=ref.history, training=training,
        versions=ref.versions,
    )
    save_checkpoint(out_path, checkpoint)
    write_history_csv(history_path_for(out_path), ref.history)
    return TrainResult(out_path, history_path_for(out_path), ref.history, training)
