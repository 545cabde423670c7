"""`scvi-cli info`: what a checkpoint holds (spec, genes, categories, last metrics, versions)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

EPILOG = "Examples:\n\n  scvi-cli info pbmc.ckpt\n\n  scvi-cli info pbmc.ckpt --json | jq .final_metrics"


def info(
    model: Path = typer.Argument(..., help="Checkpoint (or resumable state) written by `scvi-cli train`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Print the spec, genes, categories, training facts and last metrics of a checkpoint."""
    import yaml

    from scvi_cli.checkpoint import final_metrics, load_checkpoint

    checkpoint = load_checkpoint(model)
    final = final_metrics(checkpoint.history)
    summary = {
        "checkpoint": str(model),
        "model_type": checkpoint.model_type,
        "resumable": "resume" in checkpoint.extra,
        "n_genes": len(checkpoint.gene_names),
        "genes": checkpoint.gene_names,
        "categories": checkpoint.categories,
        "spec": checkpoint.spec,
        "training": checkpoint.training,
        "final_metrics": final,
        "versions": checkpoint.versions,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    genes = checkpoint.gene_names
    shown_genes = ", ".join(genes[:8]) + (f", ... ({len(genes)} in all)" if len(genes) > 8 else "")
    typer.echo(f"{model}: {checkpoint.model_type} model{' (resumable state)' if summary['resumable'] else ''}")
    typer.echo(f"genes: {shown_genes}")
    for key, values in checkpoint.categories.items():
        shown = ", ".join(values[:10]) + (f", ... ({len(values)} in all)" if len(values) > 10 else "")
        typer.echo(f"categories[{key}]: {shown}")
    typer.echo("spec:")
    typer.echo("  " + yaml.safe_dump(checkpoint.spec, sort_keys=False).strip().replace("\n", "\n  "))
    training = checkpoint.training
    if training:
        typer.echo(
            f"training: {training.get('epochs_run')} of {training.get('max_epochs')} epochs, "
            f"{training.get('n_train')} train / {training.get('n_validation')} validation cells, "
            f"seed {training.get('seed')}, {training.get('seconds')} s on {training.get('device')}"
        )
    mapping = training.get("mapping")
    if isinstance(mapping, dict):
        new = "; ".join(f"{k}: {', '.join(v)}" for k, v in mapping.get("new_categories", {}).items()) or "none"
        trained = mapping.get("trained", [])
        typer.echo(
            f"mapped onto reference {mapping.get('reference')} (sha256 {str(mapping.get('reference_sha256'))[:12]}...); "
            f"new categories: {new}; trained: {', '.join(trained) if trained else 'nothing'}"
        )
    if final:
        typer.echo("last epoch: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    typer.echo("versions: " + ", ".join(f"{k} {v}" for k, v in checkpoint.versions.items()))
