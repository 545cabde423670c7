"""The `scvi-cli` command line: thin Typer commands over the library, one module per command.

Commands parse arguments, call library functions and print what was written. Library errors
(`ScviCliError`) become one line on stderr and the error type's exit code; tracebacks only with
`--debug`. Heavy modules (torch, anndata) are imported inside commands so `--help` stays fast.
"""

from __future__ import annotations

import sys
import traceback
import warnings

import typer

from scvi_cli import __version__
from scvi_cli.cli import embed, evaluate, impute, info, loadings, sample, train, vamp_prior
from scvi_cli.errors import ScviCliError

EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="scvi-cli",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"scvi-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full Python tracebacks on errors."),
) -> None:
    """Train and apply scVI-family models (scVI, LDVAE, CondSCVI) on single-cell count data.

    Exit codes: 0 success, 1 data or runtime error, 2 usage or spec error, 3 GPU asked for but
    not available, 130 interrupted.
    """


# The command table: (module, function) -> `scvi-cli NAME`.
COMMANDS = [
    ("train", train.train, train.EPILOG),
    ("evaluate", evaluate.evaluate, evaluate.EPILOG),
    ("embed", embed.embed, embed.EPILOG),
    ("impute", impute.impute, impute.EPILOG),
    ("loadings", loadings.loadings, loadings.EPILOG),
    ("sample", sample.sample, sample.EPILOG),
    ("vamp-prior", vamp_prior.vamp_prior, vamp_prior.EPILOG),
    ("info", info.info, info.EPILOG),
]
for _name, _function, _epilog in COMMANDS:
    app.command(name=_name, epilog=_epilog)(_function)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"scvi-cli: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn every failure into a message and exit code.

    Typer reports usage errors itself (exit 2); library errors and bugs are turned into one line
    here, so no traceback reaches a pipeline log unless ``--debug`` asks for it.
    """
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if not debug:
        warnings.showwarning = _one_line_warning
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        app(args=args, prog_name="scvi-cli")  # exits through SystemExit with typer's code
        code = 0
    except ScviCliError as error:
        if debug:
            traceback.print_exc()
        print(f"scvi-cli: error: {error}", file=sys.stderr)
        code = error.exit_code
    except KeyboardInterrupt:
        print("scvi-cli: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as error:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"scvi-cli: internal error: {type(error).__name__}: {message} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        code = 1
    sys.exit(code)
