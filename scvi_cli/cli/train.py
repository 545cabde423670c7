"""`scvi-cli train`: h5ad + YAML spec in, one checkpoint (and its history CSV) out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options
from scvi_cli.errors import ScviCliError

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli train pbmc.h5ad --spec example_configs/scvi_zinb_batch.yaml --out pbmc.ckpt\n\n"
    "  scvi-cli train pbmc.h5ad --out pbmc.ckpt --batch-key sample --labels-key cell_type\n\n"
    "  scvi-cli train pbmc.h5ad --out pbmc.ckpt --set model.n_latent=20 --set train.max_epochs=50\n\n"
    "  scvi-cli train ref.h5ad --spec example_configs/condscvi.yaml --out ref.ckpt --device cuda --seed 1"
)


def train(
    data: Path = typer.Argument(..., help="Input .h5ad with raw counts (X, a layer, or raw.X; see data.layer)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (e.g. model.ckpt); history goes to model.history.csv."),
    spec: Optional[Path] = typer.Option(None, "--spec", "-s", help="YAML model spec (sections model, data, train); defaults when omitted."),
    overrides: list[str] = typer.Option([], "--set", help="Override a spec key: SECTION.KEY=VALUE (repeatable)."),
    device: str = options.Device,
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed (same as --set train.seed=N)."),
    batch_key: Optional[str] = typer.Option(None, "--batch-key", help="obs column of the batches (same as --set data.batch_key=KEY)."),
    labels_key: Optional[str] = typer.Option(None, "--labels-key", help="obs column of the labels (same as --set data.labels_key=KEY)."),
    threads: Optional[int] = options.Threads,
    quiet: bool = options.Quiet,
    as_json: bool = options.Json,
    checkpoint_every: Optional[int] = options.CheckpointEvery,
    resume: bool = options.Resume,
    force: bool = options.Force,
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic GPU kernels (slower)."),
    backed: bool = options.Backed,
    report: bool = typer.Option(
        False, "--report", help="Also write MODEL.report.html (curves, card, latent map of DATA; needs the report extra)."
    ),
    log_file: Optional[Path] = typer.Option(
        None, "--log-file", help="Append the command line, versions and per-epoch metrics to this file."
    ),
) -> None:
    """Train a model on an h5ad file and write one checkpoint file.

    On SIGTERM or SIGUSR1 (sent by SLURM before it kills a job) or Ctrl-C, training stops after
    the current step, writes MODEL.resume.ckpt and exits with 128 + the signal number (143 for
    SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C); rerun the same command with --resume to continue.
    """
    from scvi_cli.progress import make_reporter
    from scvi_cli.spec import load_spec

    shortcuts = ([f"train.seed={seed}"] if seed is not None else []) + (["data.backed=true"] if backed else [])
    shortcuts += [f"data.{name}={value}" for name, value in (("batch_key", batch_key), ("labels_key", labels_key)) if value is not None]
    spec_obj = load_spec(spec, list(overrides) + shortcuts)
    from scvi_cli.training.distributed import ranks_from_environment
    from scvi_cli.training.job import train_from_h5ad

    ranks = ranks_from_environment()
    if ranks is not None and not ranks.is_main:  # a torchrun rank other than 0: it trains, rank 0 speaks
        quiet, as_json, log_file, report = True, False, None, False
    if report:  # before the hours of training: the extra must be there
        from scvi_cli.report import require

        require("matplotlib")
    reporter = make_reporter(quiet)
    if log_file is not None:
        reporter = open_log(log_file, reporter)
    try:
        result = train_from_h5ad(
            data,
            spec_obj,
            out,
            device=device,
            threads=threads,
            reporter=reporter,
            checkpoint_every=checkpoint_every,
            resume=resume,
            force=force,
            deterministic=deterministic,
        )
        final = result.final_metrics()
        summary = (
            f"wrote {result.checkpoint_path} and {result.history_path} "
            f"({result.training['epochs_run']} epochs, {result.training['seconds']:.1f} s)"
        )
        if as_json:
            typer.echo(json.dumps({"checkpoint": str(result.checkpoint_path), "history": str(result.history_path),
                                   "training": result.training, "final_metrics": final}))
        elif not quiet:
            shown = ", ".join(
                f"{k} {v:.2f}" for k, v in final.items() if k.startswith(("elbo", "reconstruction", "kl_local"))
            )
            reporter.message(f"last epoch, per cell: {shown}")
            reporter.message(summary)
        if log_file is not None:
            reporter.record(summary)
        if report:
            written = write_training_report(result.checkpoint_path, data, threads)
            if not quiet and not as_json:
                reporter.message(f"wrote {written}")
    except ScviCliError as error:  # the log must say how the run ended, preemption included
        if log_file is not None:
            reporter.record(f"exit {error.exit_code}: {error}")
        raise
    finally:
        if log_file is not None:
            reporter.close_log()


def write_training_report(checkpoint: Path, data: Path, threads) -> Path:
    """MODEL.report.html beside the checkpoint, with the training data's latent map."""
    from scvi_cli.report.build import build_report, write_report

    out = checkpoint.with_name(checkpoint.stem + ".report.html")
    write_report(build_report(checkpoint, data), out)
    return out


def open_log(path: Path, reporter):
    """A reporter that also appends to ``path``, starting with the exact command line and versions."""
    import shlex

    from scvi_cli.atomic import check_writable
    from scvi_cli.cli import invocation
    from scvi_cli.checkpoint import current_versions
    from scvi_cli.progress import LogFileReporter

    check_writable(path)
    logged = LogFileReporter(reporter, path)
    versions = " ".join(f"{k}={v}" for k, v in current_versions().items())
    logged.header([f"# command: {shlex.join(['scvi-cli', *invocation])}", f"# versions: {versions}"])
    return logged
