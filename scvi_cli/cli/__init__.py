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
from typer.exceptions import TyperException

from scvi_cli import __version__
from scvi_cli.cli import de, embed, evaluate, export, import_model, impute, info, loadings, map_query, report, sample, train, transfer_labels, vamp_prior
from scvi_cli.device import set_thread_variables
from scvi_cli.errors import ScviCliError, first_line

EXIT_INTERRUPTED = 130

# The arguments of this invocation, as given to main(): what --log-file records.
invocation: list[str] = []

app = typer.Typer(
    name="scvi-cli",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
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

    Exit codes: 0 success, 1 data or runtime error, 2 usage or spec error, 3 GPU asked for but not available, 130 / 138 / 143 stopped by SIGINT / SIGUSR1 / SIGTERM after saving a resumable state.
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
    ("import-model", import_model.import_model, import_model.EPILOG),
    ("export", export.export, export.EPILOG),
    ("map", map_query.map_command, map_query.EPILOG),
    ("transfer-labels", transfer_labels.transfer_labels, transfer_labels.EPILOG),
    ("de", de.de, de.EPILOG),
    ("report", report.report, report.EPILOG),
]
for _name, _function, _epilog in COMMANDS:
    # the listing shows the docstring's whole first line (click would cut it at ~45 characters)
    app.command(name=_name, epilog=_epilog, short_help=(_function.__doc__ or "").strip().splitlines()[0])(_function)

# Value placeholders in --help, by annotation: `--out PATH`, `--seed INTEGER`; flags take none.
_METAVARS = {"Path": "PATH", "int": "INTEGER", "float": "NUMBER", "str": "TEXT"}


def _annotation_name(annotation) -> str:
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:  # Optional[X], list[X]
        return _annotation_name(args[0])
    return getattr(annotation, "__name__", str(annotation))


def command():
    """The click command tree of ``app``, with upper-case argument names and plain value
    placeholders (this Typer shows ``<path>`` and ``{model}``; well-made CLIs show PATH, MODEL)."""
    import typer.main

    group = typer.main.get_command(app)
    for sub in group.commands.values():
        for param in sub.params:
            if param.metavar is not None:
                continue
            if param.param_type_name == "argument":
                param.metavar = name = param.name.upper()
                # "scvi-cli embed [OPTIONS] MODEL DATA" (optional ones in brackets), no "<path>" beside
                param._usage_display_name = lambda name=name, required=param.required: name if required else f"[{name}]"
                param.display_type_rich = lambda ctx: None
                continue
            annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
            name = _annotation_name(annotation)
            if name != "bool" and not getattr(param, "is_flag", False) and name in _METAVARS:
                param.metavar = _METAVARS[name]
    return group


def _limit_native_thread_pools(args: list[str]) -> None:
    """Apply ``--threads N`` to the BLAS/OpenMP pools before numpy or torch load them.

    Those pools read their size from the environment once, at library load; the commands import
    numpy and torch lazily, so setting the variables here is early enough (torch's own pool is
    also set by the command through torch.set_num_threads).
    """
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--threads" and i + 1 < len(args) else arg.partition("=")[2] if arg.startswith("--threads=") else None
        if value is not None and value.isdigit() and int(value) >= 1:
            set_thread_variables(int(value))


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"scvi-cli: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn every failure into a message and exit code.

    Usage errors from the parser (exit 2), library errors (their own codes) and bugs (exit 1)
    all become one line here, so no traceback reaches a pipeline log unless ``--debug`` asks.
    """
    args = sys.argv[1:] if argv is None else argv
    invocation[:] = [str(a) for a in args]
    debug = "--debug" in args
    _limit_native_thread_pools(args)
    if not debug:
        warnings.showwarning = _one_line_warning
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        returned = command().main(args=args, prog_name="scvi-cli", standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
    except TyperException as error:  # usage errors found by the parser: one line, exit 2
        if type(error).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            context = getattr(error, "ctx", None)
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            print(f"scvi-cli: error: {error.format_message()}{hint}", file=sys.stderr)
        code = getattr(error, "exit_code", 2)
    except typer.Abort:
        print("scvi-cli: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
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
        print(
            f"scvi-cli: internal error: {first_line(error)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        code = 1
    sys.exit(code)
