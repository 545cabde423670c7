"""One checkpoint file per trained model, safe to load from anyone.

The file is a `torch.save` of a dict holding only tensors and plain values (str, int, float, bool,
None, lists, tuples, dicts), so it loads with `torch.load(weights_only=True)`: an untrusted file
cannot run code, and the file does not break when a class is renamed (pickling whole objects does
both: CellBender's and scvi-tools' checkpoints). It holds everything needed to rebuild and query
the model without the training data: model type, resolved spec, module constructor arguments,
gene names, category labels, weights, per-epoch history and training facts.
"""

from __future__ import annotations

import math
import os
import pickle
import platform
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import scvi_cli
from scvi_cli.spec import MODEL_TYPES
from scvi_cli.atomic import atomic_write
from scvi_cli.errors import CheckpointError, first_line

FORMAT = "scvi-cli-checkpoint"
FORMAT_VERSION = 1

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Fields every checkpoint must hold, and the optional ones (empty when absent).
_REQUIRED = ("model_type", "spec", "model_kwargs", "gene_names", "categories", "state_dict")
_OPTIONAL = ("history", "training", "versions", "extra")


@dataclass
class Checkpoint:
    """Everything a trained model needs to be rebuilt and queried; plain values and tensors only."""

    model_type: str  # 'scvi' | 'ldvae' | 'condscvi'
    spec: dict  # the full resolved spec (plain dict)
    model_kwargs: dict  # constructor arguments of the module (plain values)
    gene_names: list[str]
    categories: dict[str, list[str]]  # 'batch', 'labels', categorical covariate keys
    state_dict: dict[str, torch.Tensor]
    history: dict[str, list[float]] = field(default_factory=dict)  # metric -> per-epoch values
    training: dict = field(default_factory=dict)  # epochs run, max_epochs, split sizes, seed, ...
    versions: dict[str, str] = field(default_factory=dict)  # scvi-cli, torch, python
    extra: dict = field(default_factory=dict)  # extension slot, e.g. resumable optimizer/RNG state


def current_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint, for reproducing a run."""
    return {
        "scvi-cli": scvi_cli.__version__,
        "torch": str(torch.__version__),  # a str subclass that would not unpickle safely
        "python": platform.python_version(),
    }


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless `value` unpickles under weights_only (exact types: a numpy.float64
    is a float subclass but pickles as a numpy object that weights_only loading refuses)."""
    if value is None or type(value) in (str, int, float, bool):
        return
    if isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) in (dict, OrderedDict):  # module.state_dict() is an OrderedDict
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"checkpoint {where}: dict key {key!r} of type {type(key).__name__} is not allowed")
            _check_plain(item, f"{where}[{key!r}]")
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(
        f"checkpoint {where}: {kind} is not allowed; use tensors, str, int, float, bool, None, lists or dicts"
    )


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically (a crash leaves the previous file intact).

    Raises TypeError (a programming error) when the payload holds anything but plain values and
    tensors, ValueError for an unknown model type; `ckpt` itself is not modified.
    """
    if ckpt.model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {ckpt.model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    versions = {**current_versions(), **ckpt.versions}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": ckpt.model_type,
        "spec": ckpt.spec,
        "model_kwargs": ckpt.model_kwargs,
        "gene_names": ckpt.gene_names,
        "categories": ckpt.categories,
        "state_dict": ckpt.state_dict,
        "history": ckpt.history,
        "training": ckpt.training,
        "versions": versions,
        "extra": ckpt.extra,
    }
    for name, value in payload.items():
        _check_plain(value, name)
    if type(ckpt.gene_names) is not list or any(type(g) is not str for g in ckpt.gene_names):
        raise TypeError("checkpoint gene_names: must be a list of str")
    if not isinstance(ckpt.state_dict, dict) or any(not isinstance(t, torch.Tensor) for t in ckpt.state_dict.values()):
        raise TypeError("checkpoint state_dict: must be a dict of str -> torch.Tensor")
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)



def _read_payload(path: Path) -> Any:
    """torch.load with weights_only, every failure turned into a one-line CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory, not a scvi-cli checkpoint file "
            "(scvi-tools model directories must be imported, not loaded)"
        )
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror or exc}") from exc
    if head == _HDF5_MAGIC:
        raise CheckpointError(f"{path}: is an HDF5 file (an .h5ad?), not a scvi-cli checkpoint")
    if zipfile.is_zipfile(path):
        # torch does not verify the zip CRCs; a flipped byte in the weights would load silently.
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{path}: checkpoint file is corrupt ({first_line(exc)})") from exc
        if bad is not None:
            raise CheckpointError(f"{path}: checkpoint file is corrupt (checksum mismatch in '{bad}')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "Unsupported class" in str(exc):
            raise CheckpointError(
                f"{path}: not a scvi-cli checkpoint (it needs unsafe unpickling; "
                "scvi-tools model.pt files must be imported, not loaded)"
            ) from exc
        raise CheckpointError(f"{path}: not a scvi-cli checkpoint (not a torch file, or corrupt)") from exc
    except MemoryError:
        raise
    except Exception as exc:  # torch.load fails with RuntimeError, EOFError, OSError, KeyError, ...
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint file ({first_line(exc)})") from exc


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _validate_fields(path: Path, payload: dict) -> None:
    """Check field types so that a damaged or hand-edited file fails here, not deep in a model."""
    missing = [name for name in _REQUIRED if name not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing fields: {', '.join(missing)}")
    checks = {
        "model_type": isinstance(payload["model_type"], str),
        "spec": isinstance(payload["spec"], dict),
        "model_kwargs": isinstance(payload["model_kwargs"], dict),
        "gene_names": _is_str_list(payload["gene_names"]),
        "categories": isinstance(payload["categories"], dict)
        and all(isinstance(k, str) and _is_str_list(v) for k, v in payload["categories"].items()),
        "state_dict": isinstance(payload["state_dict"], dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()),
    }
    for name in _OPTIONAL:
        checks[name] = isinstance(payload.get(name, {}), dict)
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise CheckpointError(f"{path}: checkpoint fields have the wrong type: {', '.join(bad)}")
    if payload["model_type"] not in MODEL_TYPES:
        raise CheckpointError(
            f"{path}: holds an unknown model type {payload['model_type']!r} (this scvi-cli knows {', '.join(MODEL_TYPES)})"
        )


def load_checkpoint(path: str | os.PathLike, expected_type: str | Collection[str] | None = None) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint, on the CPU, without running any code from it.

    `expected_type` (a model type or a collection of them) rejects a checkpoint of another type.
    Every problem is a one-line CheckpointError naming the file.
    """
    path = Path(path)
    payload = _read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = ""
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = "; it looks like a bare state dict"
        raise CheckpointError(f"{path}: not a scvi-cli checkpoint (no '{FORMAT}' format marker{hint})")
    version = payload.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: checkpoint has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this scvi-cli reads "
            f"({FORMAT_VERSION}); upgrade scvi-cli"
        )
    _validate_fields(path, payload)
    ckpt = Checkpoint(
        model_type=payload["model_type"],
        spec=payload["spec"],
        model_kwargs=payload["model_kwargs"],
        gene_names=payload["gene_names"],
        categories=payload["categories"],
        state_dict=payload["state_dict"],
        history=payload.get("history", {}),
        training=payload.get("training", {}),
        versions=payload.get("versions", {}),
        extra=payload.get("extra", {}),
    )
    if expected_type is not None:
        allowed = (expected_type,) if isinstance(expected_type, str) else tuple(expected_type)
        if ckpt.model_type not in allowed:
            wanted = allowed[0] if len(allowed) == 1 else "one of " + ", ".join(allowed)
            raise CheckpointError(f"{path}: holds a {ckpt.model_type} model, expected {wanted}")
    return ckpt


def final_metrics(history: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's value at the last epoch, leaving out validation metrics that epoch did not
    measure (NaN: an interrupted run whose last completed epoch had no validation pass). Any
    other NaN is kept: it is a diverged run's."""
    return {
        name: values[-1] for name, values in history.items()
        if values and not (name.endswith("_validation") and math.isnan(values[-1]))
    }


def write_history_csv(path: str | os.PathLike, history: dict[str, list[float]]) -> None:
    """Write per-epoch metrics as CSV (tab-separated for .tsv), atomically.

    Columns are 'epoch' (0-based, as in the KL warm-up schedule) then the metrics in the given
    order; an epoch that did not measure a metric (validation between two passes) leaves its cell empty.
    """
    frame = pd.DataFrame({name: pd.Series(list(values), dtype="float64") for name, values in history.items()})
    frame.index.name = "epoch"
    sep = "\t" if str(path).lower().endswith((".tsv", ".tsv.gz")) else ","
    compression = "gzip" if str(path).lower().endswith(".gz") else None
    with atomic_write(path) as tmp:
        frame.to_csv(tmp, sep=sep, compression=compression, lineterminator="\n")
