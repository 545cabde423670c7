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
Backed = typer.Option(
    False, "--backed", help="Read the counts from the file as needed instead of loading them (memory stays flat with cells)."
)
# The resumable runs (train, map): OUT.resume.ckpt beside the output checkpoint.
CheckpointEvery = typer.Option(
    None, "--checkpoint-every", min=1, help="Write a resumable state (MODEL.resume.ckpt) every N epochs."
)
Resume = typer.Option(False, "--resume", help="Continue from MODEL.resume.ckpt when it exists (start afresh otherwise).")
Force = typer.Option(False, "--force", help="With --resume: accept a state written for another spec or data.")
Json = typer.Option(False, "--json", help="Print a final JSON summary on stdout.")
Model = typer.Argument(..., help="Checkpoint written by `scvi-cli train`.")
QueryData = typer.Argument(..., help="h5ad with the model's genes (matched by name, any order).")


def load_model(model, device: str, threads, expected_type=None):
    """The common start of commands that apply a model: device, thread limits, then the checkpoint.

    Returns ``(trained_model, torch_device)``.
    """
    from scvi_cli.device import limit_threads, resolve_device
    from scvi_cli.errors import UsageError
    from scvi_cli.trained_model import load_trained_model
    from scvi_cli.training.distributed import ranks_from_environment

    ranks = ranks_from_environment()
    if ranks is not None:
        # Inference streams the cells once (about 25k cells/s per CPU process at 9k genes, far more
        # on a GPU): N processes would each write the whole output. Only training is distributed.
        raise UsageError(
            f"this command runs in one process, not under torchrun / srun (WORLD_SIZE={ranks.world_size}); "
            "start it directly (only train is distributed)"
        )
    torch_device = resolve_device(device)
    limit_threads(threads)
    return load_trained_model(model, expected_type, device=torch_device), torch_device


def refuse_existing(data, where: str, mapping, keys, flag: str) -> None:
    """An .h5ad output must not silently replace an entry of the input (e.g. a 'counts' layer)."""
    from scvi_cli.errors import UsageError

    taken = [key for key in keys if key in mapping]
    if taken:
        raise UsageError(
            f"{data}: {where}[{taken[0]!r}] already exists; the output would replace it (choose another name with {flag})"
        )
