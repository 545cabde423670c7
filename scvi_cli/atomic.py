"""Write files so that a reader never sees half of one.

Every output and checkpoint is written to a hidden temporary file in the target's directory and
renamed onto the target only once it is complete and flushed to disk. A crash, Ctrl-C, a full disk
or a killed job therefore leaves either the old file or the new one, never a truncated one
(the approach CellBender's checkpoints take). The rename is atomic only within one filesystem,
which is why the temporary lives beside the target and not in /tmp.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from scvi_cli.errors import OutputError

# Suffixes that wrap another format: kept together with the one before them ('.csv.gz').
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def check_writable(path: str | os.PathLike) -> None:
    """Fail fast (before hours of training) when `path` could not be written later.

    Raises OutputError when the parent directory is missing, is not a directory or is not
    writable, or when `path` itself is an existing directory.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name for the output")
    parent = target.parent
    if not parent.exists():
        raise OutputError(f"{path}: directory '{parent}' does not exist")
    if not parent.is_dir():
        raise OutputError(f"{path}: '{parent}' is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory '{parent}' is not writable")


def refuse_input_as_output(out: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """Fail when an output path is one of the input files: writing it would destroy the input."""
    target = Path(out).resolve()
    for source in inputs:
        if Path(source).resolve() == target:
            raise OutputError(f"{out}: is also the input file; choose another output path")


def _host_tag() -> str:
    """This machine's name as it appears in temporary names (letters, digits and '_' only)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"


def _split_suffix(name: str) -> tuple[str, str]:
    """'out.h5ad' -> ('out', '.h5ad'), 'x.csv.gz' -> ('x', '.csv.gz'), '.hidden' -> ('.hidden', '')."""
    stem, suffix = name, ""
    base, dot, last = name.rpartition(".")
    if dot and base:  # a leading dot marks a hidden name, not a suffix
        stem, suffix = base, "." + last
        if suffix.lower() in _COMPRESSION_SUFFIXES:
            inner_base, inner_dot, inner = base.rpartition(".")
            if inner_dot and inner_base:
                stem, suffix = inner_base, f".{inner}{suffix}"
    return stem, suffix


def temp_name(name: str) -> str:
    """Hidden temporary name for `name` that keeps its real suffix last.

    'out.h5ad' -> '.out.tmp-<host>-<pid>-<hex>.h5ad', 'x.csv.gz' -> '.x.tmp-<host>-<pid>-<hex>.csv.gz',
    so libraries that choose a format by suffix (np.save appends '.npy' otherwise) still work,
    and a later run can tell whether the writer of a leftover temporary still runs.
    """
    stem, suffix = _split_suffix(name)
    return f".{stem}.tmp-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True  # cannot tell: keep the file
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `path` that a killed writer left behind, and say so.

    A process killed outright (SIGKILL, the out-of-memory killer, a node failure) cannot remove
    its temporary, which may be gigabytes. A temporary of `path` whose name says it was written
    on this machine by a process that no longer runs is removed, with a warning naming it and its
    size. Temporaries from other machines (a shared filesystem) or from running processes are
    left alone. Returns the removed paths.
    """
    target = Path(path)
    stem, suffix = _split_suffix(target.name)
    pattern = re.compile(rf"\.{re.escape(stem)}\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{{8}}{re.escape(suffix)}")
    host, removed = _host_tag(), []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match["host"] != host or _process_runs(int(match["pid"])):
            continue
        try:
            size = entry.stat().st_size
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
        warnings.warn(
            f"{target}: removed {entry.name} ({_human_size(size)}), an unfinished temporary left by "
            f"process {match['pid']}, which no longer runs",
            UserWarning,
            stacklevel=3,
        )
    return removed


def _human_size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _fsync_path(path: Path) -> None:
    """Flush a file's data to disk so the rename cannot land before the bytes do."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort (some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A reserved temporary file beside `path` that becomes `path` only on commit().

    For writers that stay open across calls (chunked writers); `atomic_write` is the
    context-manager form for one-shot writes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        check_writable(self.path)
        remove_stale_temporaries(self.path)
        while True:
            tmp = self.path.parent / temp_name(self.path.name)
            try:
                # O_EXCL reserves the name; mode 0o666 lets the umask decide the final permissions
                # (mkstemp would make every output private to its owner).
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"{path}: cannot create a file in '{self.path.parent}': {exc.strerror}") from exc
            os.close(fd)
            break
        self.tmp_path = tmp
        self.done = False

    def commit(self) -> None:
        """Flush the temporary to disk and rename it onto the target."""
        if self.done:
            raise RuntimeError(f"{self.path}: temporary file already committed or discarded")
        try:
            _fsync_path(self.tmp_path)
            os.replace(self.tmp_path, self.path)
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError):
                raise as_output_error(self.path, exc) from exc
            raise
        self.done = True
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Remove the temporary; the target (if any) is left as it was."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


def as_output_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """One-line OutputError for an OS failure while writing `path` (disk full, quota, ...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"{path}: cannot write: {reason}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any exception
    (KeyboardInterrupt included) it is removed and `path` is left untouched.

    OSErrors raised while writing become OutputError naming `path`.
    """
    pending = AtomicFile(path)
    try:
        yield pending.tmp_path
    except BaseException as exc:
        pending.discard()
        if isinstance(exc, OSError):
            raise as_output_error(path, exc) from exc
        raise
    pending.commit()
