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
