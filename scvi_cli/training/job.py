"""A complete training run: h5ad + spec in, checkpoint and history CSV out; resumable.

Every check that can fail (output location, device, data, spec against data) runs before the
first training step, so a mistake costs seconds, not the hour of training before it. Long runs
can write a resumable state every N epochs and always write it when a stop signal arrives; the
run continued from it ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scvi_cli.atomic import check_writable, refuse_input_as_output
from scvi_cli.checkpoint import Checkpoint, current_versions, final_metrics, load_checkpoint, save_checkpoint, write_history_csv
from scvi_cli.data import CountData, CSRMinibatches, DeviceCSRMinibatches, load_count_data, train_validation_split
from scvi_cli.data.counts import counts_digest
from scvi_cli.device import count_layout, limit_threads, resolve_device, retain_memory_for_minibatches
from scvi_cli.errors import DataError, UsageError
from scvi_cli.model_factory import build_model, model_kwargs
from scvi_cli.nn import native
from scvi_cli.nn.likelihoods import likelihood_compile_failure
from scvi_cli.training.preemption import TrainingStopped, stop_on_signals
from scvi_cli.progress import SilentReporter
from scvi_cli.spec import Spec, resolved_max_epochs, resolved_train_size
from scvi_cli.training import distributed
from scvi_cli.training.loop import TrainingState, TrainSettings, fit


@dataclass
class TrainResult:
    checkpoint_path: Path
    history_path: Path
    history: dict[str, list[float]]
    training: dict

    def final_metrics(self) -> dict[str, float]:
        return final_metrics(self.history)


def history_path_for(checkpoint_path: str | Path) -> Path:
    """``model.ckpt`` -> ``model.history.csv``, next to the checkpoint."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ".history.csv")


def resume_path_for(checkpoint_path: str | Path) -> Path:
    """``model.ckpt`` -> ``model.resume.ckpt``: the resumable state of an unfinished run."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ".resume" + (path.suffix or ".ckpt"))


# The share of a GPU's free memory the counts may take when kept there (the rest: the model, its
# activations and the allocator's slack).
DEVICE_COUNTS_SHARE = 0.5
# Validation runs in eval mode (batch norm from its running statistics, no dropout), so its
# figures do not depend on the minibatch size: it takes minibatches this large (or the training
# batch size if larger), for fewer, more efficient steps (the inference default).
VALIDATION_BATCH_SIZE = 1024


def minibatch_sources(data: CountData, train_idx, validation_idx, batch_size: int, seed: int, device, reporter=None):
    """(training, validation or None) minibatch sources for ``device``.

    On a CUDA device the counts are kept there when they take at most DEVICE_COUNTS_SHARE of its
    free memory, and minibatches are gathered on it (DeviceCSRMinibatches); otherwise (and on
    the CPU) they are gathered on the host, as CSR rows on the CPU (count_layout).
    """
    validation_batch_size = max(batch_size, VALIDATION_BATCH_SIZE)
    layout = count_layout(device)
    if data.backed:  # read from disk on the host, whatever the device
        from scvi_cli.data.backed import BackedMinibatches

        train = BackedMinibatches(data, train_idx, batch_size, shuffle=True, seed=seed, layout=layout)
        validation = (
            BackedMinibatches(data, validation_idx, validation_batch_size, shuffle=False, layout=layout)
            if len(validation_idx) else None
        )
        return train, validation
    if device.type == "cuda":
        need, free = DeviceCSRMinibatches.device_bytes(data), torch.cuda.mem_get_info(device)[0]
        if need <= DEVICE_COUNTS_SHARE * free:
            train = DeviceCSRMinibatches(data, train_idx, batch_size, shuffle=True, seed=seed, device=device)
            validation = train.sharing(validation_idx, validation_batch_size, shuffle=False) if len(validation_idx) else None
            return train, validation
        if reporter is not None:
            reporter.message(
                f"the counts ({need / 2**30:.1f} GiB on the device) exceed {DEVICE_COUNTS_SHARE:.0%} of the "
                f"GPU's free memory ({free / 2**30:.1f} GiB): minibatches are gathered on the host"
            )
    train = CSRMinibatches(data, train_idx, batch_size, shuffle=True, seed=seed, layout=layout)
    validation = (
        CSRMinibatches(data, validation_idx, validation_batch_size, shuffle=False, layout=layout) if len(validation_idx) else None
    )
    return train, validation


def compile_likelihood_for(choice, device: torch.device) -> bool:
    """``train.compile`` resolved: true / false as given; auto on the CPU with a C compiler on the
    PATH (the kernel builds in under a second and is cached, so every such run pays it back)."""
    if choice != "auto":
        return bool(choice)
    return torch.device(device).type == "cpu" and native.find_compiler() is not None


def train_settings(spec: Spec, n_cells: int, *, device: torch.device | str = "cpu") -> TrainSettings:
    train = spec.train
    max_epochs = resolved_max_epochs(spec, n_cells)
    return TrainSettings(
        max_epochs=max_epochs,
        lr=train.lr,
        eps=train.eps,
        weight_decay=train.weight_decay,
        kl_warmup_epochs=train.kl_warmup_epochs,
        early_stopping=train.early_stopping,
        early_stopping_patience=train.early_stopping_patience,
        early_stopping_min_delta=train.early_stopping_min_delta,
        validation_every_n_epochs=train.validation_every_n_epochs,
        compile=compile_likelihood_for(train.compile, torch.device(device)),
        precision=train.precision,
    )


class FreshModel:
    """How ``train`` starts a run: the spec's data read as it is, a newly initialised module.

    A run is told its data and its starting module by one of these; ``map`` (training/mapping.py)
    passes its own, which codes the query against a reference's categories and grafts the
    reference's weights onto a module with room for the query's new ones.
    """

    def load_data(self, data_path: str | Path, spec: Spec) -> CountData:
        return load_count_data(data_path, spec.data, backed=spec.data.backed)

    def build(self, spec: Spec, data: CountData) -> tuple[torch.nn.Module, dict]:
        """(module, its constructor arguments) under the current torch seed."""
        kwargs = model_kwargs(spec, data)
        return build_model(spec.model.type, kwargs), kwargs

    def prepare(self, model: torch.nn.Module) -> None:
        """Called once the module is in its final form (batch norm synchronised across ranks)."""

    def finish(self, model: torch.nn.Module) -> None:
        """Called on the fitted module before its checkpoint is written."""

    def facts(self) -> dict:
        """Extra entries of the checkpoint's training facts."""
        return {}

    def identity(self) -> dict:
        """What, beyond the spec and the data, makes a run this run (part of its fingerprint)."""
        return {}


def run_fingerprint(spec: Spec, data: CountData) -> str:
    """Digest of the spec and of the counts, genes and codes: a resumed run must see the same.

    The counts' digest (CountsDigest, through views of their buffers, no copy of the matrix) is
    the same whether they were read into memory, streamed from disk or shared between ranks, so
    a state can be resumed by a run that reads its data another way."""
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    X = data.X
    # backed counts were hashed in their streaming pass; both give the same digest of the same counts
    digest.update((X.digest if data.backed else counts_digest(X, threads=torch.get_num_threads())).encode())
    for array in (np.asarray(X.shape), data.batch_codes, data.label_codes):
        digest.update(np.ascontiguousarray(array))
    for optional in (data.cat_cov_codes, data.cont_covs):
        if optional is not None:
            digest.update(np.ascontiguousarray(optional))
    digest.update("\n".join(data.gene_names).encode())
    return digest.hexdigest()


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def _restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (GPU reductions, cuDNN) at some speed cost."""
    if not enabled:
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def train_from_h5ad(
    data_path: str | Path,
    spec: Spec,
    out_path: str | Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    reporter=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    force: bool = False,
    deterministic: bool = False,
    handle_signals: bool = True,
    setup: FreshModel | None = None,
) -> TrainResult:
    """Train the spec's model on the counts in ``data_path`` and write ``out_path`` atomically.

    ``checkpoint_every`` N writes the resumable state (``resume_path_for(out_path)``) every N
    epochs; a stop signal (SIGTERM, SIGUSR1, SIGINT) writes it after the current step and raises
    ``TrainingStopped``. With ``resume``, a run continues from that state when it exists (and
    starts afresh otherwise); a state from another spec or data set is refused unless ``force``.
    ``setup`` says how the data is read and the module built (default: ``FreshModel``).
    """
    reporter = reporter or SilentReporter()
    out_path, history_path, resume_path = Path(out_path), history_path_for(out_path), resume_path_for(out_path)
    for path in (out_path, history_path, resume_path):
        check_writable(path)
        refuse_input_as_output(path, data_path)
    if checkpoint_every is not None and checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every {checkpoint_every}: must be at least 1")
    ranks = distributed.ranks_from_environment()
    torch_device = resolve_device(device)
    if ranks is not None:
        if torch_device.type == "cuda":  # one GPU per process, by its local rank
            torch_device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(torch_device)
        distributed.start(ranks, torch_device)
        if not ranks.is_main:  # one voice and one writer: rank 0
            reporter = SilentReporter()
    finished = False
    try:
        result = _train(
            data_path, spec, out_path, history_path, resume_path, torch_device, ranks, threads=threads,
            reporter=reporter, checkpoint_every=checkpoint_every, resume=resume, force=force,
            deterministic=deterministic, handle_signals=handle_signals, setup=setup or FreshModel(),
        )
        finished = True
        return result
    finally:
        if ranks is not None:
            distributed.stop(wait_for_others=finished)


def _train(
    data_path, spec, out_path, history_path, resume_path, torch_device, ranks, *, threads, reporter,
    checkpoint_every, resume, force, deterministic, handle_signals, setup,
) -> TrainResult:
    """train_from_h5ad's work once the paths, the device and the process group are settled."""
    writes = ranks is None or ranks.is_main
    if spec.train.precision == "tf32" and torch_device.type != "cuda":
        raise UsageError(f"train.precision=tf32 needs a CUDA device; this run is on {torch_device} (use 32 or bf16-mixed)")
    limit_threads(threads)
    set_deterministic(deterministic)

    # A distributed in-memory run checks the file in one streaming pass and each rank then reads
    # only its share of the cells into memory (in_memory_share below), not the whole matrix.
    shared_in_memory = ranks is not None and ranks.world_size > 1 and not spec.data.backed
    read_spec = spec.model_copy(update={"data": spec.data.model_copy(update={"backed": True})}) if shared_in_memory else spec
    data = setup.load_data(data_path, read_spec)
    fingerprint = run_fingerprint(spec, data)
    if setup.identity():
        fingerprint = hashlib.sha256((fingerprint + json.dumps(setup.identity(), sort_keys=True)).encode()).hexdigest()
    seed = spec.train.seed
    settings = train_settings(spec, data.n_cells, device=torch_device)
    train_idx, validation_idx = train_validation_split(
        data.n_cells, resolved_train_size(spec), spec.train.batch_size, seed
    )
    if settings.early_stopping and len(validation_idx) == 0:
        raise DataError(f"{data_path}: early stopping needs validation cells, but the split left none")

    torch.manual_seed(seed)
    model, kwargs = setup.build(spec, data)
    state = None
    if resume and resume_path.exists():
        state = _load_resume_state(resume_path, model, spec, fingerprint, force)
        reporter.message(f"resuming from {resume_path}: epoch {state.epoch + 1}, step {state.step_in_epoch}")
    elif resume:
        reporter.message(f"no resumable state at {resume_path}; starting from the first epoch")

    retain_memory_for_minibatches(spec.train.batch_size, data.n_genes)
    source, train_rows, validation_rows = data, train_idx, validation_idx
    if shared_in_memory:  # this rank's cells only, read into memory, at their rows there
        from scvi_cli.data.backed import in_memory_share

        train_cells, validation_cells = distributed.cell_share(
            train_idx, validation_idx, ranks.rank, ranks.world_size, spec.train.batch_size
        )
        cells = np.union1d(train_cells, validation_cells)
        source = in_memory_share(data, cells)
        train_rows, validation_rows = np.searchsorted(cells, train_cells), np.searchsorted(cells, validation_cells)
    train_batches, validation_batches = minibatch_sources(
        source, train_rows, validation_rows, spec.train.batch_size, seed, torch_device, reporter
    )
    if ranks is not None:
        if not shared_in_memory:  # every rank sees all cells: each takes its minibatches or blocks
            train_batches.shard(ranks.rank, ranks.world_size)
            if validation_batches is not None:
                validation_batches.shard(ranks.rank, ranks.world_size, drop_remainder=False)
        if len(train_batches) == 0:
            raise DataError(
                f"{data_path}: {len(train_idx)} training cells make fewer minibatches of {spec.train.batch_size} "
                f"than there are processes ({ranks.world_size})"
                + (" (with --backed, blocks of 1,024 cells are divided between them)" if spec.data.backed else "")
                + "; lower train.batch_size or use fewer processes"
            )
        distributed.synchronise_batch_norm(model, torch_device)
        if not ranks.is_main:  # its own dropout and posterior draws (rank 0's follow the seed as alone)
            at = (state.epoch, state.step_in_epoch) if state else (0, 0)
            torch.manual_seed(int(np.random.default_rng([seed, ranks.rank, *at]).integers(2**63)))
        reporter.message(
            f"distributed: {ranks.world_size} processes, each holding 1 in {ranks.world_size} cells in memory"
            if shared_in_memory else
            f"distributed: {ranks.world_size} processes, each reading 1 in {ranks.world_size} blocks of the epoch"
        )
    setup.prepare(model)
    reporter.message(
        f"{spec.model.type}: {data.n_cells} cells x {data.n_genes} genes, {data.n_batch} batch(es), "
        f"{len(train_idx)} train / {len(validation_idx)} validation cells, {settings.max_epochs} epochs on {torch_device}"
    )

    def facts(state: TrainingState, started: float) -> dict:
        return {
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
            # the native kernel runs on the CPU, for NB / ZINB (Poisson has no such kernel)
            "compiled_likelihood": settings.compile and likelihood_compile_failure() is None
            and torch_device.type == "cpu" and getattr(spec.model, "gene_likelihood", None) != "poisson",
            "seconds": round(state.seconds, 3),
            "wall_seconds_this_run": round(time.perf_counter() - started, 3),
            "source": str(data_path),
            "fingerprint": fingerprint,
            **setup.facts(),
        }

    def checkpoint(state: TrainingState, started: float, resumable: bool) -> Checkpoint:
        extra = {}
        if resumable:
            extra = {"resume": state.to_dict(), "rng": _rng_states(), "fingerprint": fingerprint}
        return Checkpoint(
            model_type=spec.model.type,
            spec=spec.to_dict(),
            model_kwargs=kwargs,
            gene_names=list(data.gene_names),
            categories={key: list(values) for key, values in data.categories.items()},
            state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            history=state.history,
            training=facts(state, started),
            versions=current_versions(),
            extra=extra,
        )

    started = time.perf_counter()

    def on_epoch_end(state: TrainingState, metrics: dict[str, float]) -> None:
        reporter.epoch(state.epoch - 1, metrics)
        if writes and checkpoint_every and state.epoch % checkpoint_every == 0 and state.epoch < settings.max_epochs:
            save_checkpoint(resume_path, checkpoint(state, started, resumable=True))

    reporter.start(settings.max_epochs, first_epoch=state.epoch if state else 0)
    # The handlers stay installed until the final files are written: a SIGTERM arriving while
    # the checkpoint is being saved must not kill the process and lose the whole run.
    with stop_on_signals() if handle_signals else _no_signals() as stop_request:
        try:
            state = fit(
                model,
                train_batches,
                validation_batches,
                settings=settings,
                device=torch_device,
                state=state,
                on_epoch_end=on_epoch_end,
                should_stop=stop_request,
            )
        finally:
            reporter.close()
        if state.interrupted:
            if writes:
                save_checkpoint(resume_path, checkpoint(state, started, resumable=True))
                write_history_csv(history_path, state.history)
            raise TrainingStopped(
                f"received {stop_request.name}: saved resumable state to {resume_path} "
                f"(epoch {state.epoch + 1}, step {state.step_in_epoch}); rerun the same command with --resume to continue",
                exit_code=stop_request.exit_code,
            )
        setup.finish(model)
        if writes:
            save_checkpoint(out_path, checkpoint(state, started, resumable=False))
            write_history_csv(history_path, state.history)
            resume_path.unlink(missing_ok=True)
    return TrainResult(out_path, history_path, state.history, facts(state, started))


class _no_signals:
    """Stand-in for stop_on_signals when the caller handles signals itself."""

    def __enter__(self):
        return lambda: False

    def __exit__(self, *exc):
        return False


def _load_resume_state(path: Path, model, spec: Spec, fingerprint: str, force: bool) -> TrainingState:
    saved = load_checkpoint(path, expected_type=spec.model.type)
    resume = saved.extra.get("resume")
    if not isinstance(resume, dict):
        raise UsageError(f"{path}: not a resumable state (a finished checkpoint cannot be resumed)")
    if saved.extra.get("fingerprint") != fingerprint and not force:
        raise UsageError(
            f"{path}: was written for a different spec or data set; rerun without --resume, "
            "or with --force to continue anyway"
        )
    model.load_state_dict(saved.state_dict)
    _restore_rng_states(saved.extra["rng"])
    return TrainingState.from_dict(resume)
