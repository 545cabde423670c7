"""`scvi-cli map`: a query h5ad mapped onto a trained reference (scArches-style surgery)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scvi_cli.cli import options

EPILOG = (
    "Examples:\n\n"
    "  scvi-cli map reference.ckpt query.h5ad --out query_model.ckpt\n\n"
    "  scvi-cli map reference.ckpt query.h5ad --out query_model.ckpt --set train.max_epochs=200\n\n"
    "  scvi-cli transfer-labels --reference ref.h5ad --query query.h5ad --model query_model.ckpt "
    "--labels-key cell_type --out predictions.csv\n\n"
    "The query's batch (and categorical covariate) values that the reference lacks become new "
    "categories; only their weights, and by default the decoder's batch norm, are trained, on the "
    "query cells only, without weight decay. Everything else keeps the reference's exact values. The "
    "output is an ordinary checkpoint for reference and query cells alike; `scvi-cli info` shows its "
    "lineage (reference file and digest, new categories, trained parameters)."
)


def map_command(
    reference: Path = typer.Argument(..., help="Reference checkpoint (scVI or LDVAE; trained or imported)."),
    data: Path = typer.Argument(..., help="Query .h5ad with raw counts and the reference's obs keys."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write for the mapped model."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a train.* key (or data.layer / data.backed): SECTION.KEY=VALUE (repeatable)."
    ),
    unfrozen: bool = typer.Option(False, "--unfrozen", help="Train every parameter, not only the new ones."),
    freeze_dropout: bool = typer.Option(False, "--freeze-dropout", help="No dropout while training the query."),
    freeze_expression: bool = typer.Option(
        True, "--freeze-expression/--no-freeze-expression", help="Keep the encoders' first-layer gene weights."
    ),
    freeze_decoder_first_layer: bool = typer.Option(
        True, "--freeze-decoder-first-layer/--no-freeze-decoder-first-layer",
        help="Keep the decoder's first layer (its new covariate columns still learn); scVI's px_decoder only, "
        "LDVAE's linear decoder keeps its loadings either way.",
    ),
    freeze_batchnorm_encoder: bool = typer.Option(
        True, "--freeze-batchnorm-encoder/--no-freeze-batchnorm-encoder", help="Keep the encoders' batch norm."
    ),
    freeze_batchnorm_decoder: bool = typer.Option(
        False, "--freeze-batchnorm-decoder/--no-freeze-batchnorm-decoder", help="Keep the decoder's batch norm."
    ),
    device: str = options.Device,
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed (same as --set train.seed=N)."),
    threads: Optional[int] = options.Threads,
    allow_missing_genes: bool = options.AllowMissingGenes,
    backed: bool = options.Backed,
    checkpoint_every: Optional[int] = options.CheckpointEvery,
    resume: bool = options.Resume,
    force: bool = options.Force,
    quiet: bool = options.Quiet,
    as_json: bool = options.Json,
) -> None:
    """Map query cells onto a reference model: new batch weights trained, the reference frozen."""
    from scvi_cli.progress import make_reporter
    from scvi_cli.training.mapping import QueryOptions, map_query

    shortcuts = ([f"train.seed={seed}"] if seed is not None else []) + (["data.backed=true"] if backed else [])
    reporter = make_reporter(quiet)
    result = map_query(
        reference, data, out,
        overrides=list(overrides) + shortcuts,
        options=QueryOptions(
            unfrozen=unfrozen, freeze_dropout=freeze_dropout, freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer, freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        ),
        allow_missing_genes=allow_missing_genes, reporter=reporter, device=device, threads=threads,
        checkpoint_every=checkpoint_every, resume=resume, force=force,
    )
    mapping = result.training["mapping"]
    if as_json:
        typer.echo(json.dumps({"checkpoint": str(result.checkpoint_path), "history": str(result.history_path),
                               "training": result.training, "final_metrics": result.final_metrics()}))
    elif not quiet:
        trained = mapping.get("trained", [])
        reporter.message(f"trained: {', '.join(trained) if trained else 'nothing (mapped as is)'}")
        reporter.message(f"wrote {result.checkpoint_path} and {result.history_path}")
