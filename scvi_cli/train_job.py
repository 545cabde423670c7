"""A complete training run: h5ad + spec in, checkpoint and history CSV out.

Every check that can fail (output location, device, data, spec against data) runs before the
first training step, so a mistake costs seconds, not the hour of training before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scvi_cli.atomic import check_writable
from scvi_cli.checkpoint import Checkpoint, current_versions, save_checkpoint, write_history_csv
from scvi_cli.data import CSRMinibatches, load_count_data, train_validation_split
from scvi_cli.device import limit_threads, resolve_device
from scvi_cli.errors import DataError
from scvi_cli.model_factory import build_model, model_kwargs
from scvi_cli.progress import SilentReporter
from scvi_cli.spec import Spec, resolved_max_epochs, resolved_train_size
from scvi_cli.train import TrainSettings, fit


@dataclass
class TrainResult:
    checkpoint_path: Path
    history_path: Path
    history: dict[str, list[float]]
    training: dict

    def final_metrics(self) -> dict[str, float]:
        return {name: values[-1] for name, values in self.history.items() if values}


def history_path_for(checkpoint_path: str | Path) -> Path:
    """``model.ckpt`` -> ``model.history.csv``, next to the checkpoint."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ".history.csv")


def train_settings(spec: Spec, n_cells: int) -> TrainSettings:
    train = spec.train
    return TrainSettings(
        max_epochs=resolved_max_epochs(spec, n_cells),
        lr=train.lr,
        eps=train.eps,
        weight_decay=train.weight_decay,
        kl_warmup_epochs=train.kl_warmup_epochs,
        early_stopping=train.early_stopping,
        early_stopping_patience=train.early_stopping_patience,
        early_stopping_min_delta=train.early_stopping_min_delta,
    )


def train_from_h5ad(
    data_path: str | Path,
    spec: Spec,
    out_path: str | Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    reporter=None,
) -> TrainResult:
    """Train the spec's model on the counts in ``data_path`` and write ``out_path`` atomically."""
    reporter = reporter or SilentReporter()
    out_path = Path(out_path)
    history_path = history_path_for(out_path)
    check_writable(out_path)
    check_writable(history_path)
    torch_device = resolve_device(device)
    limit_threads(threads)

    data = load_count_data(data_path, spec.data)
    seed = spec.train.seed
    settings = train_settings(spec, data.n_cells)
    train_idx, validation_idx = train_validation_split(
        data.n_cells, resolved_train_size(spec), spec.train.batch_size, seed
    )
    if settings.early_stopping and len(validation_idx) == 0:
        raise DataError(f"{data_path}: early stopping needs validation cells, but the split left none")

    torch.manual_seed(seed)
    kwargs = model_kwargs(spec, data)
    model = build_model(spec.model.type, kwargs)
    train_batches = CSRMinibatches(data, train_idx, spec.train.batch_size, shuffle=True, seed=seed)
    validation_batches = (
        CSRMinibatches(data, validation_idx, spec.train.batch_size, shuffle=False) if len(validation_idx) else None
    )

    reporter.message(
        f"{spec.model.type}: {data.n_cells} cells x {data.n_genes} genes, {data.n_batch} batch(es), "
        f"{len(train_idx)} train / {len(validation_idx)} validation cells, {settings.max_epochs} epochs on {torch_device}"
    )
    reporter.start(settings.max_epochs)
    started = time.perf_counter()
    try:
        state = fit(
            model,
            train_batches,
            validation_batches,
            settings=settings,
            device=torch_device,
            on_epoch_end=lambda state, metrics: reporter.epoch(state.epoch - 1, metrics),
        )
    finally:
        reporter.close()

    training = {
        "epochs_run": state.epoch,
        "max_epochs": settings.max_epochs,
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "n_train": int(len(train_idx)),
        "n_validation": int(len(validation_idx)),
        "n_cells": data.n_cells,
        "seed": seed,
        "device": str(torch_device),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 3),
        "source": str(data_path),
    }
    checkpoint = Checkpoint(
        model_type=spec.model.type,
        spec=spec.to_dict(),
        model_kwargs=kwargs,
        gene_names=list(data.gene_names),
        categories={key: list(values) for key, values in data.categories.items()},
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        history=state.history,
        training=training,
        versions=current_versions(),
    )
    save_checkpoint(out_path, checkpoint)
    write_history_csv(history_path, state.history)
    return TrainResult(out_path, history_path, state.history, training)
