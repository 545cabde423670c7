"""Options shared by several commands, defined once so their names and help agree."""

from __future__ import annotations

import typer

Device = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps (auto: a GPU if one is visible).")
Threads = typer.Option(None, "--threads", min=1, help="CPU threads for torch and BLAS (default: torch's choice).")
InferenceBatchSize = typer.Option(1024, "--batch-size", min=1, help="Cells per inference minibatch.")
AllowMissingGenes = typer.Option(
    False, "--allow-missing-genes", help="Fill model genes that the data lacks with zeros (and say how many)."
)
Quiet = typer.Option(False, "--quiet", "-q", help="No progress output.")


def refuse_existing(data, where: str, mapping, keys, flag: str) -> None:
    """An .h5ad output must not silently replace an entry of the input (e.g. a 'counts' layer)."""
    from scvi_cli.errors import UsageError

    taken = [key for key in keys if key in mapping]
    if taken:
        raise UsageError(
            f"{data}: {where}[{taken[0]!r}] already exists; the output would replace it (choose another name with {flag})"
        )
