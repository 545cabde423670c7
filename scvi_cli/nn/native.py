"""The NB / ZINB likelihood kernel in C (``nb_kernel.c``), built on first use with the machine's C
compiler and loaded with ctypes.

Why C: the training likelihood is a handful of transcendental functions per cell x gene entry,
and most entries are zero counts. The kernel treats every entry as a zero count in one
vectorised pass per row (glibc's vector exp / log1p where available) and then corrects the
row's stored counts in place, so there is no dense copy of the counts, no scatter and no
lgamma for the small integer counts that make up most of the rest. It has no dependency but
libc and libm, so it builds in well under a second; the shared library is cached, keyed by its
source, the compiler and the flags, and written atomically (concurrent jobs may share a cache).

Only the CPU, float32 and CSR counts of the likelihood's own shape are handled here; everything
else takes the eager passes in likelihoods.py, which compute the same formulas.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

from scvi_cli.nn.sparse_input import SparseRows

SOURCE_NAME = "nb_kernel.c"
BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
LIBRARIES = ["-lm", "-lpthread"]
# glibc's vector exp / log / log1p (libmvec: x86-64, glibc >= 2.35), called from the vectorised loops
LIBMVEC = (["-DUSE_LIBMVEC=1"], ["-lmvec"])
# GCC's OpenMP: the library then needs libgomp.so.1, which inside a torch process is the one torch
# loaded, so the kernel's rows run on torch's own threads. (A second runtime, or threads of the
# kernel's own, would compete with torch's OpenMP threads, which spin for a while after each
# parallel operation: measured 9.7 against 5.2 ms for the kernel at 128 x 9,015 on 2 cores.)
OPENMP = (["-fopenmp"], [])

# nb_nll_rows(n_rows, n_genes, n_threads, loc_is_log, loc, theta, theta_stride, pi, pi_stride,
#             indptr, indices, values, nll, d_loc, d_theta, d_pi)
ARGUMENT_TYPES = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 7
_LIBRARY: dict = {"handle": None, "error": None}


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded; the message says why in one line."""


def find_compiler() -> str | None:
    """$CC, else cc, gcc or clang on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    """$SCVI_CLI_CACHE_DIR, else $XDG_CACHE_HOME/scvi-cli, else ~/.cache/scvi-cli; where that
    cannot be written (a read-only home on a cluster node), a folder of this user's in the temp dir."""
    if os.environ.get("SCVI_CLI_CACHE_DIR"):
        return Path(os.environ["SCVI_CLI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    preferred = Path(base) / "scvi-cli"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    return _private_temp_dir()


def _private_temp_dir() -> Path:
    """<tmp>/scvi-cli-<uid>, made 0700; if it exists but is another user's or open to others
    (a library planted there would be loaded), a fresh private folder for this process instead."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    shared = Path(tempfile.gettempdir()) / f"scvi-cli-{uid if uid is not None else 'user'}"
    try:
        shared.mkdir(mode=0o700, exist_ok=True)
        status = shared.lstat()
        if uid is None or (status.st_uid == uid and not status.st_mode & 0o077 and shared.is_dir() and not shared.is_symlink()):
            return shared
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="scvi-cli-"))


def _vector_flags() -> list[str]:
    """AVX2 and FMA where torch found them on this CPU (its own dispatch check), else none."""
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma"]
    return []


@functools.cache
def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout


def _uses_libgomp(compiler: str) -> bool:
    """Whether an OpenMP build shares torch's thread pool: ``compiler`` is GCC on Linux (its
    -fopenmp links libgomp.so.1) and this process has loaded a library of exactly that name
    (torch's OpenMP runtime; a torch built with another runtime, or with a renamed copy of
    libgomp, would get a second pool, which competes with its own)."""
    version = _compiler_version(compiler)
    if platform.system() != "Linux" or "Free Software Foundation" not in version or "clang" in version.lower():
        return False
    try:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in maps)
    except OSError:
        return False


def _flag_sets(compiler: str) -> list[tuple[list[str], list[str]]]:
    """(compiler flags, libraries) of the builds to try in order: with OpenMP and glibc's vector
    maths where they apply, then without each; the last is plain C99 and runs on one thread."""
    vector = _vector_flags()
    mvec = bool(vector) and platform.system() == "Linux" and ctypes.util.find_library("mvec") is not None
    openmp = _uses_libgomp(compiler)
    sets = []
    for use_openmp, use_mvec in ((True, True), (True, False), (False, True), (False, False)):
        if (use_openmp and not openmp) or (use_mvec and not mvec):
            continue
        cflags, libraries = BASE_FLAGS + vector, list(LIBRARIES)
        if use_openmp:
            cflags, libraries = cflags + OPENMP[0], OPENMP[1] + libraries
        if use_mvec:
            cflags, libraries = cflags + LIBMVEC[0], LIBMVEC[1] + libraries
        sets.append((cflags, libraries))
    return sets


def _build(compiler: str, source: bytes, flags: tuple[list[str], list[str]]) -> Path:
    cflags, libraries = flags
    version = _compiler_version(compiler)
    key = hashlib.sha256(b"\0".join([source, " ".join(cflags + libraries).encode(), compiler.encode(), version.encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"nb_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source_path = Path(work) / SOURCE_NAME
        source_path.write_bytes(source)
        built = Path(work) / "kernel.so"
        done = subprocess.run([compiler, *cflags, str(source_path), "-o", str(built), *libraries],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            first_error = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no output")
            raise KernelUnavailable(f"{Path(compiler).name} failed: {first_error}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
    return target


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load() -> ctypes.CDLL:
    compiler = find_compiler()
    if compiler is None:
        raise KernelUnavailable("no C compiler (cc, gcc, clang or $CC) on the PATH")
    try:
        source = resources.files("scvi_cli.nn").joinpath(SOURCE_NAME).read_bytes()
        flag_sets = _flag_sets(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        raise KernelUnavailable(_one_line(error)) from error
    errors = []
    for flags in flag_sets:
        try:
            handle = ctypes.CDLL(str(_build(compiler, source, flags)))
        except (KernelUnavailable, OSError, subprocess.SubprocessError) as error:
            errors.append(_one_line(error))
            continue
        handle.nb_nll_rows.restype = None
        handle.nb_nll_rows.argtypes = ARGUMENT_TYPES
        return handle
    raise KernelUnavailable(errors[-1])


def kernel() -> ctypes.CDLL:
    """The loaded library (built at the first call of the process); KernelUnavailable if it can't
    be, for the rest of the process."""
    if _LIBRARY["handle"] is None:
        if _LIBRARY["error"] is not None:
            raise KernelUnavailable(_LIBRARY["error"])
        try:
            _LIBRARY["handle"] = _load()
        except KernelUnavailable as error:
            _LIBRARY["error"] = str(error)
            raise
    return _LIBRARY["handle"]


def _row_stride(t: torch.Tensor, n_rows: int, n_genes: int) -> int | None:
    """How the kernel reads ``t`` against (B, G) entries: one (G,) row shared by every row
    (stride 0) or a (B, G) block (stride G, (B, 1) expanded); None for other shapes."""
    if t.dim() == 1 or (t.dim() == 2 and t.shape[0] == 1):
        return 0 if t.shape[-1] == n_genes else None
    if t.dim() == 2 and t.shape[0] == n_rows and t.shape[-1] in (1, n_genes):
        return n_genes
    return None


def _row_operand(t: torch.Tensor, n_rows: int, n_genes: int) -> tuple[torch.Tensor, int]:
    """``t`` laid out as ``_row_stride`` says (contiguous; a copy only where it is not already)."""
    stride = _row_stride(t, n_rows, n_genes)
    if stride == 0:
        return t.reshape(n_genes).contiguous(), 0
    return t.expand(n_rows, n_genes).contiguous(), n_genes


def handles(x, loc: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None) -> bool:
    """Whether the kernel computes this likelihood: float32 CSR counts on the CPU of exactly the
    shape of ``loc`` (B, G), and theta / pi_logits per gene or per entry."""
    if not isinstance(x, SparseRows) or loc.dim() != 2 or tuple(loc.shape) != x.shape:
        return False
    operands = (theta,) if pi_logits is None else (theta, pi_logits)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (loc, x.values, *operands)):
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.int64 or not t.is_contiguous() for t in (x.indptr, x.indices)):
        return False  # SparseRows holds them so; the kernel reads raw memory
    n_rows, n_genes = loc.shape
    return all(_row_stride(t, n_rows, n_genes) is not None for t in operands)


def nb_nll_rows(x, loc: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor | None, loc_is_log: bool,
                need_loc: bool, need_theta: bool, need_pi: bool):
    """Per-row NLL (B,) and the local derivatives (B, G) to save (None where not needed): what
    likelihoods._fused_nb_forward returns, for inputs ``handles`` accepts."""
    library = kernel()
    n_rows, n_genes = loc.shape
    loc = loc.detach().contiguous()
    theta, theta_stride = _row_operand(theta.detach(), n_rows, n_genes)
    pi, pi_stride = (None, 0) if pi_logits is None else _row_operand(pi_logits.detach(), n_rows, n_genes)
    nll = loc.new_empty(n_rows)
    d_loc, d_theta = loc.new_empty((n_rows, n_genes)), loc.new_empty((n_rows, n_genes))  # the kernel writes both
    d_pi = None if pi is None else loc.new_empty((n_rows, n_genes))
    pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    library.nb_nll_rows(
        n_rows, n_genes, torch.get_num_threads(), int(loc_is_log), pointer(loc), pointer(theta), theta_stride, pointer(pi),
        pi_stride, pointer(x.indptr), pointer(x.indices), pointer(x.values), pointer(nll), pointer(d_loc), pointer(d_theta),
        pointer(d_pi),
    )
    return nll, d_loc if need_loc else None, d_theta if need_theta else None, d_pi if need_pi else None
