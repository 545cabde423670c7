"""The training report: one self-contained HTML page (and PNGs) a person can look at.

A leaf of the package: nothing else imports it. It needs the ``report`` extra (matplotlib, and
umap-learn for the UMAP of the latent; without umap-learn the map is the latent's first two
principal components, and the page says so).
"""

from __future__ import annotations

from scvi_cli.errors import UsageError

EXTRA_HINT = "pip install 'scvi-cli[report]'"


def require(module: str) -> None:
    """Import ``module`` or fail with one line naming the extra that provides it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as error:
        raise UsageError(f"the report needs {module}: {EXTRA_HINT}") from error


def umap_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None
