"""Obs columns -> integer codes: batch, labels and categorical covariates, in a trained model's
order when one is given; continuous covariates as float32."""

from __future__ import annotations

import difflib

import numpy as np

from scvi_cli.data.reading import _MAX_LISTED
from scvi_cli.errors import DataError

# The single category every cell falls into when no obs key is given (batch, labels). It is "0"
# because that is what scvi-tools records for a model set up without the key (its mapping is
# [0]), so models move between the two tools without a special case.
NO_KEY_CATEGORY = "0"


# --------------------------------------------------------------------------------------------
# Obs columns -> codes


def _obs_column(obs, key: str, spec_field: str, path: str):
    if key not in obs.columns:
        cols = [str(c) for c in obs.columns]
        close = difflib.get_close_matches(key, cols, n=3, cutoff=0.6)
        if close:
            hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
        elif cols:
            hint = "available: " + ", ".join(repr(c) for c in cols[:_MAX_LISTED]) + (
                ", ..." if len(cols) > _MAX_LISTED else ""
            )
        else:
            hint = "obs has no columns"
        raise DataError(f"{path}: obs has no column {key!r} ({spec_field}); {hint}")
    return obs[key]


def _categorical_codes(
    column, key: str, path: str, training: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    """int64 codes of an obs column: its values in sorted order, or the positions of their
    string forms in `training` (the categories a model was trained with).

    Values are sorted as values, as pandas orders categories (numbers numerically: 1, 2, 10, not
    1, 10, 2), so codes agree with scvi-tools' registry; mixed types fall back to string order.
    """
    import pandas as pd

    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    n_missing = int((codes < 0).sum())
    if n_missing:
        raise DataError(f"{path}: obs[{key!r}] has {n_missing} missing (NaN) values; fill or drop those cells")
    names = [str(u) for u in uniques]
    if training is None:
        try:
            ordered = sorted(set(np.asarray(uniques).tolist()))
        except TypeError:  # mixed types (e.g. str and int) have no order of their own
            ordered = sorted(set(names))
        categories = list(dict.fromkeys(str(value) for value in ordered))
    else:
        categories = list(training)
        known = set(categories)
        unknown = list(dict.fromkeys(n for n in names if n not in known))  # in order of appearance
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:_MAX_LISTED])
            more = f", ... ({len(unknown)} in all)" if len(unknown) > _MAX_LISTED else ""
            raise DataError(f"{path}: obs[{key!r}] has categories not seen in training: {shown}{more}")
    lookup = {c: i for i, c in enumerate(categories)}
    remap = np.array([lookup[n] for n in names], dtype=np.int64)
    return remap[codes], categories


def _key_codes(
    obs, key: str | None, role: str, spec_field: str, path: str, training: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    """Codes for batch or labels; a single pseudo-category when there is no key."""
    n = len(obs)
    if key is None:
        if training is not None and len(training) > 1:
            raise DataError(
                f"{path}: the model was trained with {len(training)} {role} categories but "
                f"{spec_field} is not set; give the obs key it was trained with"
            )
        categories = list(training) if training is not None else [NO_KEY_CATEGORY]
        return np.zeros(n, dtype=np.int64), categories
    return _categorical_codes(_obs_column(obs, key, spec_field, path), key, path, training)


def _continuous(obs, key: str, path: str) -> np.ndarray:
    import pandas as pd

    column = _obs_column(obs, key, "data.continuous_covariate_keys", path)
    if not (pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype)):
        raise DataError(
            f"{path}: obs[{key!r}] is not numeric (dtype {column.dtype}); "
            "list it under data.categorical_covariate_keys instead"
        )
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{path}: obs[{key!r}] has {int(bad.sum())} missing or non-finite values")
    return values.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The loaded data set
