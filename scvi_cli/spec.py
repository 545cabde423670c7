"""The model spec: a YAML file plus ``--set`` overrides -> one validated, typed ``Spec``.

Everything a user can configure about a run is checked here, before any data is read, so that a
typo or a bad value fails at once with one line naming the file and the key. The spec is frozen
once validated; ``Spec.to_dict()`` is the plain form that checkpoints store.

Layout: three sections. ``model`` is a union discriminated on ``model.type`` (scvi | ldvae |
condscvi; missing means scvi) so each type has exactly its own keys and defaults; ``data`` names
obs columns; ``train`` holds optimisation settings. ``train.max_epochs`` and ``train.train_size``
stay ``None`` when not set, because their defaults depend on the data or the model type: ask
``resolved_max_epochs`` and ``resolved_train_size``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scvi_cli.errors import SpecError

SECTIONS = ("model", "data", "train")
MODEL_TYPES = ("scvi", "ldvae", "condscvi")
_TOP_LEVEL = "top level must be a mapping with sections model, data, train"

# Field types. Strict: YAML `2.5`, `"ten"` or `true` is never silently turned into an integer, nor
# `"yes"` into a boolean. Float fields take ints (`lr: 1`) but not strings or booleans.
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
StrictBool = Annotated[bool, Field(strict=True)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
DropoutRate = Annotated[float, Field(strict=True, ge=0, lt=1, allow_inf_nan=False)]
Fraction = Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)]
Name = Annotated[str, Field(strict=True, min_length=1)]

Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
# LDVAE's decoder is one linear map: it has no hidden layer to predict a per-cell dispersion from.
LinearDispersion = Literal["gene", "gene-batch", "gene-label"]
GeneLikelihood = Literal["zinb", "nb", "poisson"]
LatentDistribution = Literal["normal", "ln"]
NormPlacement = Literal["none", "encoder", "decoder", "both"]
ScaleActivation = Literal["softmax", "softplus"]
VarActivation = Literal["exp", "softplus"]  # the encoders' variance activation, by name
Precision = Literal["32", "tf32", "bf16-mixed"]  # training arithmetic: float32, TF32 matmuls (CUDA), bf16 autocast


class _Problem(ValueError):
    """A cross-field inconsistency, carrying the dotted key it is reported under."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class _Section(BaseModel):
    """Shared settings: unknown keys are errors, and a validated spec cannot be changed in place."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ScviModelSpec(_Section):
    """scVI: non-linear encoder and decoder, optional batch and covariate correction."""

    type: Literal["scvi"] = "scvi"
    n_hidden: PositiveInt = 128
    n_latent: PositiveInt = 10
    n_layers: PositiveInt = 1
    dropout_rate: DropoutRate = 0.1
    dispersion: Dispersion = "gene"
    gene_likelihood: GeneLikelihood = "zinb"
    latent_distribution: LatentDistribution = "normal"  # 'ln': logistic normal (softmax of z)
    log_variational: StrictBool = True  # encoder sees log1p(counts)
    use_observed_lib_size: StrictBool = True  # false: latent library with a per-batch prior
    encode_covariates: StrictBool = False  # also feed batch/covariates to the encoder
    deeply_inject_covariates: StrictBool = True  # covariates enter every hidden layer
    use_batch_norm: NormPlacement = "both"
    use_layer_norm: NormPlacement = "none"
    scale_activation: ScaleActivation = "softmax"  # px_scale: softmax over genes, or softplus
    var_eps: NonNegativeFloat = 1e-4  # floor of the encoders' variances
    var_activation: VarActivation = "exp"


class LdvaeModelSpec(_Section):
    """LDVAE: scVI's encoder with a linear decoder whose weights are interpretable gene loadings."""

    type: Literal["ldvae"] = "ldvae"
    n_hidden: PositiveInt = 128
    n_latent: PositiveInt = 10
    n_layers_encoder: PositiveInt = 1  # hidden layers of z's encoder; `n_layers` is accepted as a synonym
    dropout_rate: DropoutRate = 0.1
    dispersion: LinearDispersion = "gene"
    gene_likelihood: GeneLikelihood = "nb"
    latent_distribution: LatentDistribution = "normal"
    log_variational: StrictBool = True
    use_observed_lib_size: StrictBool = False
    use_batch_norm: StrictBool = True  # BatchNorm on the linear decoder's output
    bias: StrictBool = False  # bias term in the linear decoder
    var_eps: NonNegativeFloat = 1e-4
    var_activation: VarActivation = "exp"

    @model_validator(mode="before")
    @classmethod
    def _n_layers_synonym(cls, raw: Any) -> Any:
        """`n_layers` (the name scVI uses) means `n_layers_encoder`; both given must agree."""
        if not isinstance(raw, Mapping) or "n_layers" not in raw:
            return raw
        raw = dict(raw)
        value = raw.pop("n_layers")
        if "n_layers_encoder" in raw and raw["n_layers_encoder"] != value:
            raise _Problem(
                "model.n_layers_encoder",
                f"{_show(raw['n_layers_encoder'])} disagrees with its synonym model.n_layers ({_show(value)}); give one",
            )
        raw["n_layers_encoder"] = value
        return raw


class CondscviModelSpec(_Section):
    """CondSCVI: a VAE conditioned on cell-type labels (for deconvolution references)."""

    type: Literal["condscvi"] = "condscvi"
    n_hidden: PositiveInt = 128
    n_latent: PositiveInt = 5
    n_layers: PositiveInt = 2
    dropout_rate: DropoutRate = 0.05
    log_variational: StrictBool = True
    weight_obs: StrictBool = False  # weight cells by inverse label frequency
    # Per-label loss weights: {label: weight} (unlisted labels weigh 1) or a list in label order.
    ct_weight: dict[Name, PositiveFloat] | list[PositiveFloat] | None = None

    @model_validator(mode="after")
    def _one_weighting(self) -> "CondscviModelSpec":
        if self.weight_obs and self.ct_weight is not None:
            raise _Problem("model.ct_weight", "give either model.ct_weight or model.weight_obs: true, not both")
        return self


ModelSpec = Annotated[
    Union[ScviModelSpec, LdvaeModelSpec, CondscviModelSpec], Field(discriminator="type")
]
MODEL_CLASSES: dict[str, type[_Section]] = {
    "scvi": ScviModelSpec,
    "ldvae": LdvaeModelSpec,
    "condscvi": CondscviModelSpec,
}


class DataSpec(_Section):
    """Which matrix and which obs columns of the h5ad file the model uses."""

    layer: Name | None = None  # null: X; "raw": raw.X; otherwise a key of layers
    batch_key: Name | None = None
    labels_key: Name | None = None
    categorical_covariate_keys: list[Name] = []
    continuous_covariate_keys: list[Name] = []
    backed: StrictBool = False  # train from the file on disk, without loading the counts


class TrainSpec(_Section):
    """Optimisation, validation split, KL warm-up, early stopping and the random seed."""

    max_epochs: PositiveInt | None = None  # null: see resolved_max_epochs
    batch_size: Annotated[int, Field(strict=True, ge=3)] = 128  # <3 cells breaks BatchNorm
    lr: PositiveFloat = 1e-3
    eps: PositiveFloat = 0.01  # Adam's epsilon
    weight_decay: NonNegativeFloat = 1e-6
    train_size: Fraction | None = None  # null: see resolved_train_size
    kl_warmup_epochs: NonNegativeInt = 400  # 0: KL weight 1 from the first epoch
    early_stopping: StrictBool = False  # on the validation ELBO
    early_stopping_patience: PositiveInt = 45
    early_stopping_min_delta: NonNegativeFloat = 0.0
    # the validation ELBO every n epochs and at the last; null: never (scvi-tools' default)
    validation_every_n_epochs: PositiveInt | None = 1
    seed: Annotated[int, Field(strict=True, ge=0, le=2**32 - 1)] = 0  # any RNG accepts it
    precision: Precision = "32"
    # the likelihood through its native kernel (nn/native.py): auto = on the CPU with a C compiler
    compile: Literal["auto"] | StrictBool = "auto"

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_choice(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise _Problem("train.compile", f"must be auto, true or false (got {_show(value)})")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        """YAML reads `precision: 32` as a number; it names the same setting as "32"."""
        return "32" if value == 32 and not isinstance(value, bool) else value


SECTION_CLASSES: dict[str, type[_Section]] = {"data": DataSpec, "train": TrainSpec}


class Spec(BaseModel):
    """The whole validated spec; build it with load_spec or Spec.from_dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec = Field(default_factory=ScviModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)

    @model_validator(mode="before")
    @classmethod
    def _fill_blanks(cls, raw: Any) -> Any:
        """An empty section (`model:` alone in YAML) means defaults; no model.type means scvi."""
        if not isinstance(raw, Mapping):
            return raw
        raw = dict(raw)
        for section in SECTIONS:
            if section in raw and raw[section] is None:
                raw[section] = {}
        model = raw.get("model")
        if isinstance(model, Mapping) and model.get("type") is None:
            raw["model"] = {**model, "type": "scvi"}
        return raw

    @model_validator(mode="after")
    def _check_consistency(self) -> Spec:
        _check_consistency(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of str/int/float/bool/None/list/dict, as stored in checkpoints."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | None = None) -> Spec:
        """Validate a plain dict (e.g. from a checkpoint); `source` names it in error messages."""
        return _validate(raw, source, {})


def _check_consistency(spec: Spec) -> None:
    """Checks that involve more than one key; the first problem found is raised."""
    model, data, train = spec.model, spec.data, spec.train
    if model.type == "condscvi" and data.labels_key is None:
        raise _Problem(
            "data.labels_key", "required for model type 'condscvi' (the obs column of cell types)"
        )
    for list_key in ("categorical_covariate_keys", "continuous_covariate_keys"):
        if model.type != "scvi" and getattr(data, list_key):
            raise _Problem(
                f"data.{list_key}", f"not supported by model type '{model.type}' (only scvi)"
            )
    dispersion = getattr(model, "dispersion", None)
    if dispersion == "gene-label" and data.labels_key is None:
        raise _Problem("model.dispersion", "'gene-label' requires data.labels_key")
    if dispersion == "gene-batch" and data.batch_key is None:
        raise _Problem("model.dispersion", "'gene-batch' requires data.batch_key")
    seen: dict[str, str] = {}
    for list_key in ("categorical_covariate_keys", "continuous_covariate_keys"):
        for name in getattr(data, list_key):
            if name == data.batch_key:
                raise _Problem(f"data.{list_key}", f"'{name}' is already data.batch_key")
            if name == data.labels_key:
                raise _Problem(f"data.{list_key}", f"'{name}' is already data.labels_key")
            if seen.get(name) == list_key:
                raise _Problem(f"data.{list_key}", f"duplicate entry '{name}'")
            if name in seen:
                raise _Problem(f"data.{list_key}", f"'{name}' is also in data.{seen[name]}")
            seen[name] = list_key
    if train.early_stopping and resolved_train_size(spec) == 1.0:
        why = " (the default for condscvi)" if train.train_size is None else ""
        raise _Problem(
            "train.early_stopping",
            f"needs a validation set, but train.train_size is 1.0{why}; set it below 1",
        )
    if train.early_stopping and train.validation_every_n_epochs != 1:
        raise _Problem(
            "train.validation_every_n_epochs",
            f"must be 1 with train.early_stopping (it watches the validation ELBO every epoch), not "
            f"{_show(train.validation_every_n_epochs)}",
        )


def resolved_max_epochs(spec: Spec, n_cells: int) -> int:
    """train.max_epochs, or the model type's default: 300 for condscvi, else fewer epochs for
    more cells, max(1, min(round(20000 / n_cells * 400), 400)) (scvi-tools' heuristic)."""
    if spec.train.max_epochs is not None:
        return spec.train.max_epochs
    if spec.model.type == "condscvi":
        return 300
    if n_cells < 1:
        raise ValueError(f"n_cells must be at least 1 (got {n_cells})")
    return max(1, min(round(20000 / n_cells * 400), 400))


def resolved_train_size(spec: Spec) -> float:
    """train.train_size, or the model type's default: 1.0 for condscvi (no validation), else 0.9."""
    if spec.train.train_size is not None:
        return float(spec.train.train_size)
    return 1.0 if spec.model.type == "condscvi" else 0.9


# ----------------------------------------------------------------------------------------------
# Loading: YAML file -> raw dict -> overrides -> validation (once).


class _SpecLoader(yaml.SafeLoader):
    """safe_load, plus: `1e-3` is a float (PyYAML's YAML 1.1 rules read it as a string), and a
    key given twice in one mapping is an error instead of silently keeping the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: where (1-based line and column) and what."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "syntax error"
        return f"invalid YAML{where}: {what}"
    return "invalid YAML: " + " ".join(str(exc).split())


def _read_yaml(path: Path, source: str) -> dict:
    """The raw mapping in a spec file; every failure is a one-line SpecError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{source}: file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{source}: is a directory, not a YAML file") from None
    except PermissionError:
        raise SpecError(f"{source}: cannot read file (permission denied)") from None
    except UnicodeDecodeError:
        raise SpecError(f"{source}: not a text file (invalid UTF-8)") from None
    except OSError as exc:
        raise SpecError(f"{source}: cannot read file ({exc.strerror or exc})") from None
    try:
        raw = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: {_yaml_error_line(exc)}") from None
    if raw is None:  # empty file: all defaults
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: {_TOP_LEVEL} (got {_show(raw)})")
    for section in SECTIONS:
        value = raw.get(section)
        if value is not None and not isinstance(value, dict):
            raise SpecError(f"{source}: {section}: must be a mapping (got {_show(value)})")
    return raw


def _parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value parsed as YAML)."""
    left, equals, right = text.partition("=")
    parts = left.strip().split(".")
    if not equals or len(parts) != 2 or not all(parts):
        raise SpecError(f"--set {text}: expected SECTION.KEY=VALUE")
    if not right.strip():
        raise SpecError(f"--set {text}: missing value after '=' (write null for none)")
    try:
        value = yaml.load(right.strip(), Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {text}: cannot parse value ({_yaml_error_line(exc)})") from None
    return parts[0], parts[1], value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each `section.key=value` set in order (later ones win).

    Keys are not checked here: validation does that afterwards, naming the override at fault.
    """
    if not isinstance(raw, Mapping):
        raise SpecError(f"{_TOP_LEVEL} (got {_show(raw)})")
    result = dict(raw)
    for text in overrides:
        section, key, value = _parse_override(text)
        current = result.get(section)
        if current is None:
            current = {}
        if not isinstance(current, Mapping):
            raise SpecError(f"--set {text}: section '{section}' of the spec is not a mapping")
        result[section] = {**current, key: value}
    return result


def load_spec(path: str | Path | None, overrides: Sequence[str] = ()) -> Spec:
    """Read a YAML spec (None: all defaults), apply `--set` overrides, and validate once."""
    source = str(path) if path is not None else None
    raw = _read_yaml(Path(path), source) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    origins: dict[str, str] = {}
    for text in overrides:
        section, key, _ = _parse_override(text)
        origins[f"{section}.{key}"] = text  # the last override of a key is the one in effect
    return _validate(raw, source, origins)


# ----------------------------------------------------------------------------------------------
# Validation errors -> one line naming where the value came from and the dotted key.


def _validate(raw: Any, source: str | None, origins: Mapping[str, str]) -> Spec:
    """Spec.model_validate, turning the first pydantic error into a one-line SpecError."""
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        # Unknown keys first: a misspelt key is more often the cause than the values beside it.
        errors = exc.errors(include_url=False)
        errors.sort(key=lambda error: error["type"] != "extra_forbidden")
        key, message = _describe(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecError(_where(key, source, origins) + message + more) from None


def _where(key: str, source: str | None, origins: Mapping[str, str]) -> str:
    """Message prefix: the override that set `key` if one did, else the file (if any) and key."""
    base = re.sub(r"\[\d+\]$", "", key)
    if base in origins:
        return f"--set {origins[base]}: "
    if "." not in base:  # a whole section (an unknown one, or one that is not a mapping)
        for dotted, text in reversed(list(origins.items())):
            if dotted.split(".")[0] == base:
                return f"--set {text}: "
    if not key:  # the top level
        return f"{source}: " if source else ""
    return f"{source}: {key}: " if source else f"{key}: "


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    """(dotted key, message) for one pydantic error dict."""
    kind = error["type"]
    loc = list(error["loc"])
    ctx = error.get("ctx") or {}
    value = error.get("input")
    model_type = None
    if len(loc) >= 2 and loc[0] == "model" and loc[1] in MODEL_TYPES:
        model_type = loc.pop(1)  # the discriminator's tag, not a key the user wrote
    key = ".".join(str(part) for part in loc if not isinstance(part, int))
    key += "".join(f"[{part}]" for part in loc if isinstance(part, int))
    got = f" (got {_show(value)})"

    if kind == "value_error" and isinstance(ctx.get("error"), _Problem):
        return ctx["error"].key, ctx["error"].message
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return key, "unknown section" + _suggest(str(loc[0]), SECTIONS)
        return key, _unknown_key(str(loc[0]), str(loc[1]), model_type)
    if kind == "union_tag_invalid":
        tag = value.get("type") if isinstance(value, Mapping) else ctx.get("tag")
        return "model.type", f"must be one of {', '.join(MODEL_TYPES)} (got {_show(tag)})"
    if kind == "literal_error":
        choices = _literal_choices(loc, model_type) or [ctx.get("expected", "")]
        return key, f"must be one of {', '.join(choices)}{got}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if not loc:
            return key, f"{_TOP_LEVEL}{got}"
        return key, f"must be a mapping{got}"
    messages = {
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
        "string_type": "must be a string",
        "string_too_short": "must not be empty",
        "list_type": "must be a list",
        "greater_than": f"must be greater than {_number(ctx.get('gt'))}",
        "greater_than_equal": f"must be at least {_number(ctx.get('ge'))}",
        "less_than": f"must be less than {_number(ctx.get('lt'))}",
        "less_than_equal": f"must be at most {_number(ctx.get('le'))}",
    }
    if kind in messages:
        return key, messages[kind] + got
    return key, " ".join(str(error.get("msg", kind)).split()) + got


def _unknown_key(section: str, key: str, model_type: str | None) -> str:
    """'unknown key' with a close match, or which model types do have the key."""
    if section == "model":
        model_type = model_type or "scvi"
        valid = list(MODEL_CLASSES[model_type].model_fields)
        owners = [name for name, cls in MODEL_CLASSES.items() if key in cls.model_fields]
        if owners:
            return f"not a key of model type '{model_type}' (valid for: {', '.join(owners)})"
    else:
        valid = list(SECTION_CLASSES[section].model_fields)
    return "unknown key" + _suggest(key, valid)


def _suggest(word: str, valid: Sequence[str]) -> str:
    """' (did you mean 'x'?)' for a close match, else the list of valid names."""
    match = difflib.get_close_matches(word, list(valid), n=1)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid: {', '.join(valid)})"


def _literal_choices(loc: Sequence[Any], model_type: str | None) -> list[str]:
    """The allowed values of the Literal field at loc (section, key), in declaration order."""
    if len(loc) != 2:
        return []
    section, key = loc
    classes = {**SECTION_CLASSES, "model": MODEL_CLASSES.get(model_type or "")}
    cls = classes.get(section)
    field = cls.model_fields.get(key) if cls is not None else None
    annotation = field.annotation if field is not None else None
    if get_origin(annotation) is Literal:
        return [str(choice) for choice in get_args(annotation)]
    return []


def _number(bound: Any) -> str:
    """A range bound without a spurious '.0' (pydantic stores float bounds as floats)."""
    if isinstance(bound, float) and bound.is_integer():
        return str(int(bound))
    return str(bound)


def _show(value: Any) -> str:
    """A value as the user would write it in YAML, cut short if long."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        try:
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        except yaml.YAMLError:
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
