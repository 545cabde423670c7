"""Where computation runs: device selection and thread limits, checked before any work starts.

torch is imported inside the functions, so the CLI can read THREAD_VARIABLES before any heavy import.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from scvi_cli.errors import DeviceUnavailableError, UsageError

if TYPE_CHECKING:
    import torch

# The environment variables that size the BLAS / OpenMP thread pools, read once when they load.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def set_thread_variables(threads: int) -> None:
    """Size the BLAS / OpenMP pools of libraries loaded after this call."""
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)


# glibc's mallopt parameters (malloc.h), and its initial mmap threshold (128 KiB)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
MMAP_THRESHOLD = 128 * 2**10


def retain_freed_memory() -> bool:
    """Keep freed memory in the process for reuse instead of returning it to the kernel.

    glibc serves large blocks with fresh pages (mmap above its threshold, or heap it has trimmed
    back to the kernel), faulted in and zeroed on first touch. A training step makes and frees
    a few dozen minibatch-sized tensors, so every step pays for its pages again: measured on 2
    threads, batch 1024 x 9k genes (37 MB blocks) 298 -> 192 ms per step with this setting, and
    batch 1024 x 2k genes (8 MB blocks, ~4,000 page faults per step without it) 78 -> 72 ms.
    The cost is that resident memory stays at its peak (the peak itself is unchanged: 20k x 2k
    training, 570 / 580 MiB at batch 128, 636 / 634 MiB at batch 1024). glibc only (elsewhere
    nothing changes); returns whether the settings were applied.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def retain_memory_for_minibatches(cells: int, genes: int) -> bool:
    """retain_freed_memory() when a (cells x genes) float32 block exceeds glibc's initial mmap
    threshold, i.e. for any real minibatch (tiny ones, as in tests, leave the allocator alone)."""
    if cells * genes * 4 <= MMAP_THRESHOLD:
        return False
    return retain_freed_memory()


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device; a missing GPU is an error."""
    import torch

    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return torch.device(name)
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceUnavailableError("--device mps: Apple MPS is not available on this machine")
        return torch.device("mps")
    raise UsageError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")


def limit_threads(threads: int | None) -> None:
    """Cap torch's intra-op pool and the BLAS/OpenMP pools (for libraries loaded after this call).

    On shared HPC nodes a job must not use more cores than it was given; the same thread count
    also makes CPU results reproducible run to run.
    """
    if threads is None:
        return
    import torch

    if threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1")
    set_thread_variables(threads)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set once in this process: the intra-op limit still applies
        pass


def count_layout(device) -> str:
    """How minibatch counts should come for work on ``device`` (a CSRMinibatches layout).

    On the CPU as CSR rows: the encoders' first layer and the fused likelihood read only the
    nonzeros (the first layer takes 3-4x less time than dense at 5-10% density, see
    benchmarks/sparse_first_layer.py), and nothing densifies the counts unless a plain formula
    asks for them. Elsewhere dense, cuBLAS's home.
    """
    kind = getattr(device, "type", str(device).split(":")[0])
    return "sparse" if kind == "cpu" else "dense"
