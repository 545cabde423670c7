"""scvi-cli: the scVI family of models (scVI, LDVAE, CondSCVI) for single-cell counts, as a library and a CLI."""

__version__ = "0.1.0"
