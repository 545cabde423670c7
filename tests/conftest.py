"""Shared fixtures: the bundled small real dataset and a way to run the CLI in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parent / "data"
PBMC_SMALL = DATA_DIR / "pbmc_small_seurat.h5ad"


@pytest.fixture
def pbmc_small() -> Path:
    return PBMC_SMALL


@pytest.fixture
def run_cli(capsys):
    """Run `scvi-cli ARGS...` through the real entry point; return (exit code, stdout, stderr)."""
    from scvi_cli.cli import main

    def run(*args: str):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run
