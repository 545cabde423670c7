"""The YAML spec: defaults per model type, overrides, strict types, cross-field checks, and the
one-line error messages a user sees for each mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pydantic
import pytest
import yaml

from scvi_cli.errors import SpecError
from scvi_cli.spec import (
    CondscviModelSpec,
    DataSpec,
    LdvaeModelSpec,
    ScviModelSpec,
    Spec,
    TrainSpec,
    apply_overrides,
    load_spec,
    resolved_max_epochs,
    resolved_train_size,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "example_configs").glob("*.yaml"))
PBMC_SMALL = REPO / "tests" / "data" / "pbmc_small_seurat.h5ad"

# The contract's defaults, written out independently of spec.py.
SCVI_DEFAULTS = {
    "type": "scvi",
    "n_hidden": 128,
    "n_latent": 10,
    "n_layers": 1,
    "dropout_rate": 0.1,
    "dispersion": "gene",
    "gene_likelihood": "zinb",
    "latent_distribution": "normal",
    "log_variational": True,
    "use_observed_lib_size": True,
    "encode_covariates": False,
    "deeply_inject_covariates": True,
    "use_batch_norm": "both",
    "use_layer_norm": "none",
    "scale_activation": "softmax",
    "var_eps": 1e-4,
    "var_activation": "exp",
}
LDVAE_DEFAULTS = {
    "type": "ldvae",
    "n_hidden": 128,
    "n_latent": 10,
    "n_layers_encoder": 1,
    "dropout_rate": 0.1,
    "dispersion": "gene",
    "gene_likelihood": "nb",
    "latent_distribution": "normal",
    "log_variational": True,
    "use_observed_lib_size": False,
    "use_batch_norm": True,
    "bias": False,
    "var_eps": 1e-4,
    "var_activation": "exp",
}
CONDSCVI_DEFAULTS = {
    "type": "condscvi",
    "n_hidden": 128,
    "n_latent": 5,
    "n_layers": 2,
    "dropout_rate": 0.05,
    "log_variational": True,
    "weight_obs": False,
    "ct_weight": None,
}
DATA_DEFAULTS = {
    "layer": None,
    "batch_key": None,
    "labels_key": None,
    "categorical_covariate_keys": [],
    "continuous_covariate_keys": [],
    "backed": False,
}
TRAIN_DEFAULTS = {
    "max_epochs": None,
    "batch_size": 128,
    "lr": 0.001,
    "eps": 0.01,
    "weight_decay": 1e-6,
    "train_size": None,
    "kl_warmup_epochs": 400,
    "early_stopping": False,
    "early_stopping_patience": 45,
    "early_stopping_min_delta": 0.0,
    "validation_every_n_epochs": 1,
    "seed": 0,
    "precision": "32",
    "compile": "auto",
}


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def spec_error(path, overrides=()) -> str:
    """The message of the SpecError that load_spec raises; it must be a single line."""
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def dict_error(raw, source=None) -> str:
    with pytest.raises(SpecError) as info:
        Spec.from_dict(raw, source=source)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Defaults


def test_no_file_gives_scvi_defaults():
    spec = load_spec(None)
    expected = {"model": SCVI_DEFAULTS, "data": DATA_DEFAULTS, "train": TRAIN_DEFAULTS}
    assert spec.to_dict() == expected
    assert isinstance(spec.model, ScviModelSpec)
    assert isinstance(spec.data, DataSpec)
    assert isinstance(spec.train, TrainSpec)


@pytest.mark.parametrize(
    ("model_type", "cls", "defaults", "data"),
    [
        ("scvi", ScviModelSpec, SCVI_DEFAULTS, {}),
        ("ldvae", LdvaeModelSpec, LDVAE_DEFAULTS, {}),
        ("condscvi", CondscviModelSpec, CONDSCVI_DEFAULTS, {"labels_key": "cell_type"}),
    ],
)
def test_defaults_per_model_type(model_type, cls, defaults, data):
    spec = Spec.from_dict({"model": {"type": model_type}, "data": data})
    assert isinstance(spec.model, cls)
    assert spec.to_dict()["model"] == defaults
    assert spec.to_dict()["train"] == TRAIN_DEFAULTS


def test_missing_or_null_type_means_scvi(tmp_path):
    assert load_spec(write(tmp_path, "model:\n  n_latent: 7\n")).model.type == "scvi"
    assert load_spec(write(tmp_path, "model:\n  type: null\n")).model.type == "scvi"
    assert Spec.from_dict({"model": {}}).model == ScviModelSpec()


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    assert load_spec(write(tmp_path, "")) == Spec()
    assert load_spec(write(tmp_path, "# only a comment\n")) == Spec()
    assert load_spec(write(tmp_path, "model:\ndata:\ntrain:\n")) == Spec()


# ---------------------------------------------------------------------------------------------
# Round trip and the checkpoint form


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def test_to_dict_from_dict_round_trip():
    spec = Spec.from_dict(
        {
            "model": {"type": "scvi", "n_latent": 3, "dispersion": "gene-batch"},
            "data": {
                "batch_key": "batch",
                "categorical_covariate_keys": ["letter.idents"],
                "continuous_covariate_keys": ["nCount_RNA"],
            },
            "train": {"max_epochs": 5, "lr": 2e-3, "train_size": 0.8, "seed": 42},
        }
    )
    plain = spec.to_dict()
    assert _plain(plain)
    assert json.loads(json.dumps(plain)) == plain
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    again = Spec.from_dict(plain)
    assert again == spec
    assert again.to_dict() == plain
    assert plain["model"]["n_latent"] == 3
    assert plain["train"]["lr"] == 2e-3
    assert plain["data"]["categorical_covariate_keys"] == ["letter.idents"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_round_trip_of_each_example(path):
    spec = load_spec(path)
    assert Spec.from_dict(spec.to_dict()) == spec


def test_to_dict_yaml_file_round_trip(tmp_path):
    spec = load_spec(None, ["model.type=ldvae", "train.lr=5e-4", "data.batch_key=batch"])
    path = write(tmp_path, yaml.safe_dump(spec.to_dict()))
    assert load_spec(path) == spec


def test_from_dict_validates_like_load_spec():
    assert dict_error({"train": {"lr": 0}}) == "train.lr: must be greater than 0 (got 0)"
    message = dict_error({"model": {"n_latnt": 3}}, source="model.ckpt")
    assert message == "model.ckpt: model.n_latnt: unknown key (did you mean 'n_latent'?)"
    assert dict_error([1, 2]) == (
        "top level must be a mapping with sections model, data, train (got [1, 2])"
    )
    assert dict_error("x", source="c.pt") == (
        "c.pt: top level must be a mapping with sections model, data, train (got 'x')"
    )


def test_spec_is_frozen():
    spec = load_spec(None)
    with pytest.raises(pydantic.ValidationError):
        spec.train.max_epochs = 3  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        spec.model = LdvaeModelSpec()  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# YAML files


def test_yaml_file_values(tmp_path):
    path = write(
        tmp_path,
        """
model:
  type: ldvae
  n_latent: 20
  gene_likelihood: zinb
  use_batch_norm: false
data:
  layer: counts
  batch_key: batch
train:
  lr: 1e-3          # PyYAML alone reads this as a string
  weight_decay: 0
  eps: 1.5E-2
  max_epochs: 12
  train_size: 0.75
  early_stopping: yes
""",
    )
    spec = load_spec(path)
    assert isinstance(spec.model, LdvaeModelSpec)
    assert spec.model.n_latent == 20
    assert spec.model.gene_likelihood == "zinb"
    assert spec.model.use_batch_norm is False
    assert spec.model.n_hidden == 128  # untouched default
    assert spec.data.layer == "counts"
    assert spec.data.batch_key == "batch"
    assert spec.train.lr == 0.001 and isinstance(spec.train.lr, float)
    assert spec.train.weight_decay == 0.0 and isinstance(spec.train.weight_decay, float)
    assert spec.train.eps == 0.015
    assert spec.train.max_epochs == 12
    assert spec.train.train_size == 0.75
    assert spec.train.early_stopping is True


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 0.001),
        ("1E3", 1000.0),
        ("+2.5e+2", 250.0),
        ("-1.e-2", -0.01),
        (".5e1", 5.0),
        ("1_000e-3", 1.0),
        ("1.0e-3", 0.001),  # already a float in YAML 1.1
        ("e5", "e5"),  # not numbers: stay strings
        (".e5", ".e5"),
        ("-e5", "-e5"),
        ("1e", "1e"),
        ("0x1F", 31),  # the other YAML rules are unchanged
        ("yes", True),
        ("null", None),
    ],
)
def test_yaml_scalars(text, value):
    loaded = apply_overrides({}, [f"data.layer={text}"])["data"]["layer"]
    assert loaded == value and type(loaded) is type(value)


def test_path_may_be_str_or_path(tmp_path):
    path = write(tmp_path, "model:\n  n_latent: 4\n")
    assert load_spec(str(path)).model.n_latent == 4
    assert load_spec(path).model.n_latent == 4


def test_int_is_fine_for_float_fields(tmp_path):
    spec = load_spec(write(tmp_path, "train:\n  lr: 1\n  train_size: 1\n"))
    assert spec.train.lr == 1.0 and isinstance(spec.train.lr, float)
    assert spec.train.train_size == 1.0
    assert resolved_train_size(spec) == 1.0


# ---------------------------------------------------------------------------------------------
# File-level errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert spec_error(path) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path):
    assert spec_error(tmp_path) == f"{tmp_path}: is a directory, not a YAML file"


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (PermissionError(13, "Permission denied"), "cannot read file (permission denied)"),
        (OSError(5, "Input/output error"), "cannot read file (Input/output error)"),
    ],
)
def test_unreadable_file(tmp_path, monkeypatch, exc, message):
    # chmod 0 does not stop root (as in containers), so make the read itself fail.
    path = write(tmp_path, "model: {}\n")

    def refuse(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(Path, "read_text", refuse)
    assert spec_error(path) == f"{path}: {message}"


def test_binary_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe")
    assert spec_error(path) == f"{path}: not a text file (invalid UTF-8)"


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "model:\n  n_latent: 10\n  n_hidden: [128\ntrain:\n  lr: 1\n")
    message = spec_error(path)
    assert message.startswith(f"{path}: invalid YAML at line ")
    line = int(message.split("at line ")[1].split(",")[0])
    assert line in (3, 4, 5)


def test_yaml_bad_indentation(tmp_path):
    path = write(tmp_path, "model:\n  n_latent: 10\n   n_hidden: 5\n")
    message = spec_error(path)
    assert message.startswith(f"{path}: invalid YAML at line 3, column ")


def test_duplicate_yaml_key(tmp_path):
    path = write(tmp_path, "model:\n  n_latent: 10\n  n_latent: 20\n")
    assert spec_error(path) == f"{path}: invalid YAML at line 3, column 3: duplicate key 'n_latent'"


@pytest.mark.parametrize(
    ("text", "shown"), [("- a\n- b\n", "[a, b]"), ("just text\n", "'just text'"), ("5\n", "5")]
)
def test_top_level_not_a_mapping(tmp_path, text, shown):
    path = write(tmp_path, text)
    assert spec_error(path) == (
        f"{path}: top level must be a mapping with sections model, data, train (got {shown})"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: 5\n", "model: must be a mapping (got 5)"),
        ("data: [batch]\n", "data: must be a mapping (got [batch])"),
        ("train: fast\n", "train: must be a mapping (got 'fast')"),
    ],
)
def test_section_not_a_mapping(tmp_path, text, message):
    path = write(tmp_path, text)
    assert spec_error(path) == f"{path}: {message}"
    assert dict_error(yaml.safe_load(text), source="x") == f"x: {message}"


# ---------------------------------------------------------------------------------------------
# Key errors


def test_unknown_key_with_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  n_latnt: 5\n")
    assert spec_error(path) == f"{path}: model.n_latnt: unknown key (did you mean 'n_latent'?)"


def test_unknown_key_in_data_and_train(tmp_path):
    path = write(tmp_path, "data:\n  batchkey: batch\n")
    assert spec_error(path) == f"{path}: data.batchkey: unknown key (did you mean 'batch_key'?)"
    path = write(tmp_path, "train:\n  learning_rat: 0.1\n  max_epoch: 3\n")
    message = spec_error(path)
    assert message.startswith(f"{path}: train.learning_rat: unknown key")
    assert message.endswith("(and 1 more)")


@pytest.mark.parametrize("value, shown", [("sometimes", "'sometimes'"), (1, "1"), (None, "null")])
def test_compile_is_auto_true_or_false(value, shown):
    assert dict_error({"train": {"compile": value}}) == f"train.compile: must be auto, true or false (got {shown})"
    for good in ("auto", True, False):
        assert Spec.from_dict({"train": {"compile": good}}).train.compile == good


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path, "train:\n  zzz: 1\n")
    message = spec_error(path)
    assert message.startswith(f"{path}: train.zzz: unknown key (valid: max_epochs, batch_size, lr,")
    assert "seed, precision, compile)" in message


def test_suggestions_follow_the_model_type(tmp_path):
    # 'bais' is close to ldvae's 'bias', which scvi does not have.
    path = write(tmp_path, "model:\n  type: ldvae\n  bais: true\n")
    assert spec_error(path) == f"{path}: model.bais: unknown key (did you mean 'bias'?)"
    path = write(tmp_path, "model:\n  type: condscvi\n  n_latnt: 3\ndata:\n  labels_key: ct\n")
    assert spec_error(path) == f"{path}: model.n_latnt: unknown key (did you mean 'n_latent'?)"


@pytest.mark.parametrize(
    ("model_type", "key", "owners"),
    [
        ("scvi", "weight_obs", "condscvi"),
        ("scvi", "bias", "ldvae"),
        ("condscvi", "dispersion", "scvi, ldvae"),
        ("condscvi", "gene_likelihood", "scvi, ldvae"),
        ("ldvae", "use_layer_norm", "scvi"),
        ("ldvae", "encode_covariates", "scvi"),
    ],
)
def test_key_of_another_model_type(tmp_path, model_type, key, owners):
    text = f"model:\n  type: {model_type}\n  {key}: true\ndata:\n  labels_key: ct\n"
    path = write(tmp_path, text)
    assert spec_error(path) == (
        f"{path}: model.{key}: not a key of model type '{model_type}' (valid for: {owners})"
    )


def test_key_of_another_model_type_when_type_is_omitted(tmp_path):
    path = write(tmp_path, "model:\n  weight_obs: true\n")
    assert spec_error(path) == (
        f"{path}: model.weight_obs: not a key of model type 'scvi' (valid for: condscvi)"
    )


def test_unknown_section(tmp_path):
    path = write(tmp_path, "trian:\n  lr: 1\n")
    assert spec_error(path) == f"{path}: trian: unknown section (did you mean 'train'?)"
    path = write(tmp_path, "optimizer:\n  lr: 1\n")
    assert spec_error(path) == f"{path}: optimizer: unknown section (valid: model, data, train)"


def test_unknown_key_is_reported_before_bad_values(tmp_path):
    path = write(tmp_path, "model:\n  dispersion: genes\n  n_latnt: 5\ntrain:\n  lr: -1.0\n")
    assert spec_error(path) == (
        f"{path}: model.n_latnt: unknown key (did you mean 'n_latent'?) (and 2 more)"
    )


def test_several_errors_report_first_and_count(tmp_path):
    path = write(tmp_path, "model:\n  n_latent: 0\n  n_hidden: 0\ntrain:\n  lr: -1.0\n")
    assert spec_error(path) == f"{path}: model.n_hidden: must be at least 1 (got 0) (and 2 more)"


# ---------------------------------------------------------------------------------------------
# Values: enumerations, types, ranges


def test_bad_model_type(tmp_path):
    path = write(tmp_path, "model:\n  type: scvii\n")
    choices = "must be one of scvi, ldvae, condscvi"
    assert spec_error(path) == f"{path}: model.type: {choices} (got 'scvii')"
    path = write(tmp_path, "model:\n  type: [scvi]\n")
    assert spec_error(path) == f"{path}: model.type: {choices} (got [scvi])"


@pytest.mark.parametrize(
    ("model", "key", "choices", "got"),
    [
        (
            {"dispersion": "genes"},
            "dispersion",
            "gene, gene-batch, gene-label, gene-cell",
            "'genes'",
        ),
        ({"gene_likelihood": "zip"}, "gene_likelihood", "zinb, nb, poisson", "'zip'"),
        ({"latent_distribution": "logistic"}, "latent_distribution", "normal, ln", "'logistic'"),
        ({"use_batch_norm": True}, "use_batch_norm", "none, encoder, decoder, both", "true"),
        ({"use_layer_norm": "all"}, "use_layer_norm", "none, encoder, decoder, both", "'all'"),
        (
            {"type": "ldvae", "dispersion": "gene-cell"},
            "dispersion",
            "gene, gene-batch, gene-label",
            "'gene-cell'",
        ),
    ],
)
def test_enumerations(model, key, choices, got):
    assert dict_error({"model": model}, source="spec.yaml") == (
        f"spec.yaml: model.{key}: must be one of {choices} (got {got})"
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "n_latent", "ten", "must be an integer (got 'ten')"),
        ("model", "n_latent", 2.5, "must be an integer (got 2.5)"),
        ("model", "n_latent", 10.0, "must be an integer (got 10.0)"),
        ("model", "n_latent", True, "must be an integer (got true)"),
        ("model", "n_layers", "2", "must be an integer (got '2')"),
        ("model", "log_variational", "yes", "must be true or false (got 'yes')"),
        ("model", "log_variational", 1, "must be true or false (got 1)"),
        ("model", "dropout_rate", "0.1", "must be a number (got '0.1')"),
        ("model", "dropout_rate", True, "must be a number (got true)"),
        ("train", "early_stopping", "yes", "must be true or false (got 'yes')"),
        ("train", "early_stopping", 0, "must be true or false (got 0)"),
        ("train", "lr", "fast", "must be a number (got 'fast')"),
        ("train", "lr", float("inf"), "must be a finite number (got inf)"),
        ("train", "lr", float("nan"), "must be a finite number (got nan)"),
        ("train", "max_epochs", 10.5, "must be an integer (got 10.5)"),
        ("train", "seed", "0", "must be an integer (got '0')"),
        ("train", "batch_size", [128], "must be an integer (got [128])"),
        ("data", "batch_key", 5, "must be a string (got 5)"),
        ("data", "batch_key", "", "must not be empty (got '')"),
        ("data", "layer", ["counts"], "must be a string (got [counts])"),
        ("data", "categorical_covariate_keys", "batch", "must be a list (got 'batch')"),
        ("data", "continuous_covariate_keys", {"a": 1}, "must be a list (got {a: 1})"),
    ],
)
def test_strict_types(section, key, value, message):
    assert dict_error({section: {key: value}}, source="spec.yaml") == (
        f"spec.yaml: {section}.{key}: {message}"
    )


def test_list_item_error_names_index():
    assert dict_error({"data": {"continuous_covariate_keys": ["nCount_RNA", 3]}}) == (
        "data.continuous_covariate_keys[1]: must be a string (got 3)"
    )


@pytest.mark.parametrize(
    ("section", "key", "bad", "message", "good"),
    [
        ("model", "n_latent", 0, "must be at least 1 (got 0)", 1),
        ("model", "n_hidden", -5, "must be at least 1 (got -5)", 1),
        ("model", "n_layers", 0, "must be at least 1 (got 0)", 3),
        ("model", "dropout_rate", 1.0, "must be less than 1 (got 1.0)", 0.0),
        ("model", "dropout_rate", -0.1, "must be at least 0 (got -0.1)", 0.99),
        ("train", "batch_size", 2, "must be at least 3 (got 2)", 3),
        ("train", "lr", -1.0, "must be greater than 0 (got -1.0)", 1e-9),
        ("train", "lr", 0, "must be greater than 0 (got 0)", 10),
        ("train", "eps", 0.0, "must be greater than 0 (got 0.0)", 1e-8),
        ("train", "weight_decay", -1e-6, "must be at least 0 (got -1e-06)", 0),
        ("train", "train_size", 0.0, "must be greater than 0 (got 0.0)", 0.01),
        ("train", "train_size", 1.5, "must be at most 1 (got 1.5)", 1.0),
        ("train", "max_epochs", 0, "must be at least 1 (got 0)", 1),
        ("train", "kl_warmup_epochs", -1, "must be at least 0 (got -1)", 0),
        ("train", "early_stopping_patience", 0, "must be at least 1 (got 0)", 1),
        ("train", "early_stopping_min_delta", -0.5, "must be at least 0 (got -0.5)", 0),
        ("train", "validation_every_n_epochs", 0, "must be at least 1 (got 0)", 5),
        ("train", "seed", -1, "must be at least 0 (got -1)", 2**32 - 1),
        ("train", "seed", 2**32, "must be at most 4294967295 (got 4294967296)", 123456789),
    ],
)
def test_ranges(section, key, bad, message, good):
    assert dict_error({section: {key: bad}}) == f"{section}.{key}: {message}"
    spec = Spec.from_dict({section: {key: good}})
    assert getattr(getattr(spec, section), key) == good


def test_null_is_allowed_where_it_means_default():
    spec = Spec.from_dict(
        {"train": {"max_epochs": None, "train_size": None}, "data": {"layer": None}}
    )
    assert spec.train.max_epochs is None and spec.train.train_size is None
    assert dict_error({"train": {"lr": None}}) == "train.lr: must be a number (got null)"
    assert dict_error({"model": {"n_latent": None}}) == (
        "model.n_latent: must be an integer (got null)"
    )


def test_long_values_are_cut_short():
    message = dict_error({"data": {"batch_key": ["x" * 100]}})
    assert message.startswith("data.batch_key: must be a string (got [")
    assert message.endswith("...)")
    assert len(message) < 120


# ---------------------------------------------------------------------------------------------
# Cross-field checks


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"type": "condscvi"}},
            "data.labels_key: required for model type 'condscvi' (the obs column of cell types)",
        ),
        (
            {"model": {"type": "ldvae"}, "data": {"categorical_covariate_keys": ["a"]}},
            "data.categorical_covariate_keys: not supported by model type 'ldvae' (only scvi)",
        ),
        (
            {"model": {"type": "ldvae"}, "data": {"continuous_covariate_keys": ["a"]}},
            "data.continuous_covariate_keys: not supported by model type 'ldvae' (only scvi)",
        ),
        (
            {
                "model": {"type": "condscvi"},
                "data": {"labels_key": "ct", "continuous_covariate_keys": ["a"]},
            },
            "data.continuous_covariate_keys: not supported by model type 'condscvi' (only scvi)",
        ),
        (
            {"model": {"dispersion": "gene-label"}},
            "model.dispersion: 'gene-label' requires data.labels_key",
        ),
        (
            {"model": {"type": "ldvae", "dispersion": "gene-label"}, "data": {"batch_key": "b"}},
            "model.dispersion: 'gene-label' requires data.labels_key",
        ),
        (
            {"model": {"dispersion": "gene-batch"}, "data": {"labels_key": "ct"}},
            "model.dispersion: 'gene-batch' requires data.batch_key",
        ),
        (
            {"train": {"early_stopping": True, "train_size": 1.0}},
            "train.early_stopping: needs a validation set, but train.train_size is 1.0;"
            " set it below 1",
        ),
        (
            {"train": {"early_stopping": True, "validation_every_n_epochs": None}},
            "train.validation_every_n_epochs: must be 1 with train.early_stopping"
            " (it watches the validation ELBO every epoch), not null",
        ),
        (
            {
                "model": {"type": "condscvi"},
                "data": {"labels_key": "ct"},
                "train": {"early_stopping": True},
            },
            "train.early_stopping: needs a validation set, but train.train_size is 1.0"
            " (the default for condscvi); set it below 1",
        ),
        (
            {"data": {"categorical_covariate_keys": ["a", "b", "a"]}},
            "data.categorical_covariate_keys: duplicate entry 'a'",
        ),
        (
            {"data": {"continuous_covariate_keys": ["x", "x"]}},
            "data.continuous_covariate_keys: duplicate entry 'x'",
        ),
        (
            {"data": {"categorical_covariate_keys": ["a"], "continuous_covariate_keys": ["a"]}},
            "data.continuous_covariate_keys: 'a' is also in data.categorical_covariate_keys",
        ),
        (
            {"data": {"batch_key": "batch", "categorical_covariate_keys": ["batch"]}},
            "data.categorical_covariate_keys: 'batch' is already data.batch_key",
        ),
        (
            {"data": {"labels_key": "ct", "continuous_covariate_keys": ["ct"]}},
            "data.continuous_covariate_keys: 'ct' is already data.labels_key",
        ),
    ],
)
def test_cross_field_checks(raw, message):
    assert dict_error(raw, source="spec.yaml") == f"spec.yaml: {message}"


def test_cross_field_valid_combinations():
    """Each of these combinations validates, and keeps the values it was given."""
    spec = Spec.from_dict({"model": {"dispersion": "gene-label"}, "data": {"labels_key": "ct"}})
    assert spec.model.dispersion == "gene-label" and spec.data.labels_key == "ct"
    spec = Spec.from_dict({"model": {"dispersion": "gene-batch"}, "data": {"batch_key": "b"}})
    assert spec.model.dispersion == "gene-batch" and spec.data.batch_key == "b"
    assert Spec.from_dict({"model": {"dispersion": "gene-cell"}}).model.dispersion == "gene-cell"
    assert Spec.from_dict({"train": {"early_stopping": True}}).train.early_stopping  # scvi: 10% validation
    spec = Spec.from_dict(
        {
            "model": {"type": "condscvi"},
            "data": {"labels_key": "ct"},
            "train": {"early_stopping": True, "train_size": 0.9},
        }
    )
    assert spec.model.type == "condscvi" and spec.train.train_size == 0.9
    # batch and labels may share a column; covariates may coexist with both keys
    spec = Spec.from_dict(
        {
            "data": {
                "batch_key": "b",
                "labels_key": "b",
                "categorical_covariate_keys": ["c1", "c2"],
                "continuous_covariate_keys": ["n1"],
            }
        }
    )
    assert spec.data.batch_key == spec.data.labels_key == "b"
    assert spec.data.categorical_covariate_keys == ["c1", "c2"] and spec.data.continuous_covariate_keys == ["n1"]


# ---------------------------------------------------------------------------------------------
# --set overrides


def test_overrides_of_each_section(tmp_path):
    path = write(tmp_path, "model:\n  n_latent: 10\ntrain:\n  lr: 1.0e-3\n")
    spec = load_spec(
        path,
        [
            "model.n_latent=30",
            "model.gene_likelihood=nb",
            "data.batch_key=batch",
            "data.layer=raw",
            "train.lr=1e-4",
            "train.max_epochs=5",
            "train.early_stopping=true",
        ],
    )
    assert spec.model.n_latent == 30
    assert spec.model.gene_likelihood == "nb"
    assert spec.data.batch_key == "batch"
    assert spec.data.layer == "raw"
    assert spec.train.lr == 1e-4
    assert spec.train.max_epochs == 5
    assert spec.train.early_stopping is True


def test_override_values_are_yaml(tmp_path):
    path = write(tmp_path, "train:\n  max_epochs: 50\ndata:\n  layer: counts\n")
    spec = load_spec(
        path,
        [
            "train.max_epochs=null",
            "data.layer=null",
            "data.categorical_covariate_keys=[letter.idents, orig.ident]",
            "data.continuous_covariate_keys=[nCount_RNA]",
            "train.weight_decay=0",
            "train.train_size=0.8",
        ],
    )
    assert spec.train.max_epochs is None
    assert spec.data.layer is None
    assert spec.data.categorical_covariate_keys == ["letter.idents", "orig.ident"]
    assert spec.data.continuous_covariate_keys == ["nCount_RNA"]
    assert spec.train.weight_decay == 0.0
    assert spec.train.train_size == 0.8


def test_override_model_type_switches_defaults():
    spec = load_spec(None, ["model.type=ldvae"])
    assert spec.to_dict()["model"] == LDVAE_DEFAULTS
    spec = load_spec(None, ["model.type=condscvi", "data.labels_key=cell_type"])
    assert spec.to_dict()["model"] == CONDSCVI_DEFAULTS
    assert resolved_train_size(spec) == 1.0
    assert resolved_max_epochs(spec, 4271) == 300


def test_override_model_type_keeps_file_keys(tmp_path):
    path = write(tmp_path, "model:\n  n_latent: 7\n  use_batch_norm: both\n")
    assert load_spec(path).model.use_batch_norm == "both"
    # ldvae's use_batch_norm is a boolean: the file's value is now wrong and blamed on the file
    assert spec_error(path, ["model.type=ldvae"]) == (
        f"{path}: model.use_batch_norm: must be true or false (got 'both')"
    )
    spec = load_spec(path, ["model.type=ldvae", "model.use_batch_norm=false"])
    assert spec.model.type == "ldvae" and spec.model.n_latent == 7
    assert spec.model.use_batch_norm is False


def test_later_override_wins_and_beats_file(tmp_path):
    path = write(tmp_path, "train:\n  seed: 1\n")
    assert load_spec(path, ["train.seed=2", "train.seed=3"]).train.seed == 3
    assert load_spec(path).train.seed == 1


def test_override_with_spaces_and_equals_in_value():
    spec = load_spec(None, [" data.batch_key = sample=A"])
    assert spec.data.batch_key == "sample=A"


def test_apply_overrides_returns_a_copy():
    raw = {"model": {"n_latent": 3}, "data": None}
    result = apply_overrides(raw, ["model.n_hidden=64", "data.batch_key=b", "train.lr=1e-2"])
    assert result == {
        "model": {"n_latent": 3, "n_hidden": 64},
        "data": {"batch_key": "b"},
        "train": {"lr": 0.01},
    }
    assert raw == {"model": {"n_latent": 3}, "data": None}
    assert apply_overrides(raw, []) == raw


def test_apply_overrides_rejects_non_mapping_section():
    with pytest.raises(SpecError) as info:
        apply_overrides({"model": [1]}, ["model.n_latent=3"])
    assert str(info.value) == "--set model.n_latent=3: section 'model' of the spec is not a mapping"


@pytest.mark.parametrize(
    "text", ["foo", "train.lr", "lr=1", "train.lr.x=1", ".lr=1", "train.=1", "=1", "train lr=1"]
)
def test_malformed_override(text):
    assert spec_error(None, [text]) == f"--set {text}: expected SECTION.KEY=VALUE"


def test_override_without_value():
    assert spec_error(None, ["train.max_epochs="]) == (
        "--set train.max_epochs=: missing value after '=' (write null for none)"
    )


def test_override_with_unparsable_value():
    message = spec_error(None, ["data.categorical_covariate_keys=[a, b"])
    assert message.startswith(
        "--set data.categorical_covariate_keys=[a, b: cannot parse value (invalid YAML"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.max_epoch=5"],
            "--set train.max_epoch=5: unknown key (did you mean 'max_epochs'?)",
        ),
        (["model.n_latnt=5"], "--set model.n_latnt=5: unknown key (did you mean 'n_latent'?)"),
        (
            ["model.weight_obs=true"],
            "--set model.weight_obs=true: not a key of model type 'scvi' (valid for: condscvi)",
        ),
        (["trian.lr=1"], "--set trian.lr=1: unknown section (did you mean 'train'?)"),
        (["train.lr=-1"], "--set train.lr=-1: must be greater than 0 (got -1)"),
        (["model.n_latent=ten"], "--set model.n_latent=ten: must be an integer (got 'ten')"),
        (["model.n_latent=2.5"], "--set model.n_latent=2.5: must be an integer (got 2.5)"),
        (
            ['train.early_stopping="yes"'],
            "--set train.early_stopping=\"yes\": must be true or false (got 'yes')",
        ),
        (
            ["model.type=scvii"],
            "--set model.type=scvii: must be one of scvi, ldvae, condscvi (got 'scvii')",
        ),
        (
            ["data.categorical_covariate_keys=[a, 5]"],
            "--set data.categorical_covariate_keys=[a, 5]: must be a string (got 5)",
        ),
        (
            ["data.categorical_covariate_keys=[a, b, a]"],
            "--set data.categorical_covariate_keys=[a, b, a]: duplicate entry 'a'",
        ),
        (
            ["model.dispersion=genes"],
            "--set model.dispersion=genes: must be one of gene, gene-batch, gene-label,"
            " gene-cell (got 'genes')",
        ),
    ],
)
def test_override_errors_name_the_override(overrides, message):
    assert spec_error(None, overrides) == message


def test_override_error_blames_the_last_override_of_a_key(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n")
    assert spec_error(path, ["train.lr=5", "train.lr=0"]) == (
        "--set train.lr=0: must be greater than 0 (got 0)"
    )


def test_file_error_is_blamed_on_file_despite_other_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1.0\n")
    assert spec_error(path, ["train.seed=3"]) == (
        f"{path}: train.lr: must be greater than 0 (got -1.0)"
    )


def test_override_cannot_fix_a_broken_file(tmp_path):
    path = write(tmp_path, "model: 5\n")
    assert spec_error(path, ["model.n_latent=3"]) == f"{path}: model: must be a mapping (got 5)"


def test_cross_field_error_after_override_names_the_missing_key():
    assert spec_error(None, ["model.type=condscvi"]) == (
        "data.labels_key: required for model type 'condscvi' (the obs column of cell types)"
    )


# ---------------------------------------------------------------------------------------------
# Resolved defaults


@pytest.mark.parametrize(
    ("n_cells", "expected"),
    [
        (1, 400),
        (100, 400),
        (4271, 400),
        (20_000, 400),
        (30_000, 267),  # 266.67
        (50_000, 160),
        (100_000, 80),
        (1_000_000, 8),
        (3_000_000, 3),  # 2.67
        (16_000_000, 1),  # 0.5 rounds to 0 (round half to even), floored at 1
        (100_000_000, 1),
    ],
)
def test_resolved_max_epochs_heuristic(n_cells, expected):
    for model_type in ("scvi", "ldvae"):
        spec = Spec.from_dict({"model": {"type": model_type}})
        assert resolved_max_epochs(spec, n_cells) == expected


def test_resolved_max_epochs_condscvi_and_explicit():
    condscvi = Spec.from_dict({"model": {"type": "condscvi"}, "data": {"labels_key": "ct"}})
    assert resolved_max_epochs(condscvi, 100) == 300
    assert resolved_max_epochs(condscvi, 1_000_000) == 300
    explicit = Spec.from_dict({"train": {"max_epochs": 7}})
    assert resolved_max_epochs(explicit, 100) == 7
    assert resolved_max_epochs(explicit, 1_000_000) == 7
    explicit = Spec.from_dict(
        {"model": {"type": "condscvi"}, "data": {"labels_key": "ct"}, "train": {"max_epochs": 9}}
    )
    assert resolved_max_epochs(explicit, 100) == 9
    with pytest.raises(ValueError, match="n_cells"):
        resolved_max_epochs(Spec(), 0)


def test_resolved_train_size():
    assert resolved_train_size(Spec()) == 0.9
    assert resolved_train_size(Spec.from_dict({"model": {"type": "ldvae"}})) == 0.9
    condscvi = {"model": {"type": "condscvi"}, "data": {"labels_key": "ct"}}
    assert resolved_train_size(Spec.from_dict(condscvi)) == 1.0
    assert resolved_train_size(Spec.from_dict({**condscvi, "train": {"train_size": 0.7}})) == 0.7
    assert resolved_train_size(Spec.from_dict({"train": {"train_size": 0.5}})) == 0.5
    assert resolved_train_size(Spec.from_dict({"train": {"train_size": 1}})) == 1.0


# ---------------------------------------------------------------------------------------------
# Example configs


def _obs_columns(path: Path) -> set[str]:
    with h5py.File(path, "r") as f:
        return {name for name in f["obs"].keys() if name != "_index"} | set(
            f["obs"].attrs.get("column-order", [])
        )


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {
        "scvi_zinb_batch.yaml",
        "ldvae.yaml",
        "condscvi.yaml",
        "scvi_gene_batch_covariates.yaml",
        "demo_pbmc4k.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_and_uses_existing_obs_keys(path):
    spec = load_spec(path)
    assert path.read_text().startswith("#"), "each example starts with a header comment"
    columns = _obs_columns(PBMC_SMALL)
    keys = [spec.data.batch_key, spec.data.labels_key]
    keys += spec.data.categorical_covariate_keys + spec.data.continuous_covariate_keys
    for key in keys:
        assert key is None or key in columns, f"{path.name}: obs column {key!r} not in pbmc_small"


def test_example_contents():
    by_name = {p.name: load_spec(p) for p in EXAMPLES}
    zinb = by_name["scvi_zinb_batch.yaml"]
    assert zinb.model.type == "scvi"
    assert zinb.model.gene_likelihood == "zinb"
    assert zinb.data.batch_key == "batch"
    assert by_name["ldvae.yaml"].model.type == "ldvae"
    cond = by_name["condscvi.yaml"]
    assert (cond.model.type, cond.data.labels_key) == ("condscvi", "cell_type")
    cov = by_name["scvi_gene_batch_covariates.yaml"]
    assert cov.model.dispersion == "gene-batch"
    assert cov.data.categorical_covariate_keys and cov.data.continuous_covariate_keys
    demo = by_name["demo_pbmc4k.yaml"]
    assert demo.train.max_epochs == 30
    assert demo.train.kl_warmup_epochs < demo.train.max_epochs  # the KL weight reaches 1 in the demo
    assert demo.data.batch_key is None
    assert demo.to_dict()["model"] == SCVI_DEFAULTS


# ---------------------------------------------------------------------------------------------
# Import cost


def test_spec_module_does_not_import_torch():
    code = "import sys, scvi_cli.spec; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
