"""`python -m scvi_cli` runs the command line."""

from scvi_cli.cli import main

main()
