"""One exception type per kind of failure; the CLI maps each to an exit code in one place.

Library code raises these where a problem is found; it never calls sys.exit.
"""

from __future__ import annotations


class ScviCliError(Exception):
    """Base class: a failure the user can act on, reported as one line without a traceback."""

    exit_code = 1


class DataError(ScviCliError):
    """The input data (h5ad file, counts, obs keys, genes) is unusable."""

    exit_code = 1


class SpecError(ScviCliError):
    """The model spec or a command-line override is invalid."""

    exit_code = 2


class UsageError(ScviCliError):
    """Command-line arguments are inconsistent (beyond what the parser can check)."""

    exit_code = 2


class CheckpointError(ScviCliError):
    """A checkpoint is missing, truncated, foreign, or does not fit the request."""

    exit_code = 1


class OutputError(ScviCliError):
    """An output path cannot be written (missing or unwritable directory, unknown extension)."""

    exit_code = 1


class DeviceUnavailableError(ScviCliError):
    """A GPU (or other accelerator) was asked for but is not available."""

    exit_code = 3


def first_line(error: BaseException, *, with_type: bool = True, limit: int = 200) -> str:
    """An exception as one short line for a message: 'Type: first line of its text' (or the
    text alone without ``with_type``; the type name when it has no text)."""
    text = str(error).strip().splitlines()
    line = text[0].strip() if text else ""
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    if not line:
        return type(error).__name__
    return f"{type(error).__name__}: {line}" if with_type else line
