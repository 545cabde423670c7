"""Reading gzip-compressed HDF5 arrays on several threads.

h5py inflates a dataset's chunks one after another on one thread: for the counts of a
100k x 9k h5ad (48M values in 2,048 gzip chunks per array) that was most of a command's
start-up. Here the chunks are fetched as stored (``read_direct_chunk``: no filter runs, the
bytes are copied out of the file) and inflated on a thread pool, ISA-L's inflate when the
``isal`` package is present (2-3x zlib's speed), zlib's otherwise; both release the GIL.
Anything else (other filters, unchunked or multi-dimensional layouts, unallocated chunks, a
chunk that does not inflate to its size) is read by h5py, which then reports what is wrong.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

try:  # python-isal: the same zlib stream format, a faster decoder
    from isal.isal_zlib import decompress as _inflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps the reader working without it
    from zlib import decompress as _inflate

# Below this many stored bytes one thread (h5py) is as quick as starting a pool.
MIN_PARALLEL_BYTES = 4 << 20
# Chunks in flight per thread: bounds the compressed bytes held beyond the output array.
_IN_FLIGHT = 8


def _filter_positions(dataset) -> tuple[int, int | None] | None:
    """(deflate's, shuffle's or None) positions in the dataset's filter pipeline, or None when
    the pipeline is anything but [shuffle,] deflate."""
    import h5py

    plist = dataset.id.get_create_plist()
    codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if codes == [h5py.h5z.FILTER_DEFLATE]:
        return 0, None
    if codes == [h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE]:
        return 1, 0
    return None


def parallel_eligible(dataset, threads: int) -> tuple[int, int | None] | None:
    """The filter positions when ``dataset`` is read faster by ``read_array`` than by h5py."""
    if threads < 2 or dataset.ndim != 1 or dataset.chunks is None or dataset.dtype.kind not in "iuf":
        return None
    if dataset.size * dataset.dtype.itemsize < MIN_PARALLEL_BYTES:
        return None
    return _filter_positions(dataset)


def _decode_chunk(raw: bytes, mask: int, deflate: int, shuffle: int | None, dtype: np.dtype, chunk: int) -> np.ndarray:
    """One stored chunk's values: inflated, then un-shuffled (bit i of ``mask`` set: filter i was skipped)."""
    data = raw if mask & (1 << deflate) else _inflate(raw)
    if len(data) != chunk * dtype.itemsize:
        raise ValueError(f"a chunk inflated to {len(data)} bytes, not {chunk * dtype.itemsize}")
    values = np.frombuffer(data, dtype=np.uint8)
    if shuffle is not None and not mask & (1 << shuffle):
        values = values.reshape(dtype.itemsize, chunk).T.copy()  # byte planes back to elements
    return values.view(dtype)


def _read_chunks(dataset, deflate: int, shuffle: int | None, threads: int) -> np.ndarray:
    n, chunk, dtype = dataset.shape[0], dataset.chunks[0], dataset.dtype
    out = np.empty(n, dtype=dtype)

    def place(start: int, mask: int, raw: bytes) -> None:
        stop = min(start + chunk, n)
        out[start:stop] = _decode_chunk(raw, mask, deflate, shuffle, dtype, chunk)[: stop - start]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for start in range(0, n, chunk):
            mask, raw = dataset.id.read_direct_chunk((start,))
            pending.append(pool.submit(place, start, mask, raw))
            if len(pending) >= _IN_FLIGHT * threads:
                pending.popleft().result()
        for job in pending:
            job.result()
    return out


def read_array(dataset, threads: int) -> np.ndarray:
    """The whole 1-d ``dataset`` in memory, the same array h5py's ``dataset[()]`` gives."""
    positions = parallel_eligible(dataset, threads)
    if positions is not None:
        try:
            return _read_chunks(dataset, *positions, threads)
        except Exception:  # unallocated or damaged chunks: h5py reads (and reports) them
            pass
    return dataset[()]


def read_sparse_group(group, encoding: str, threads: int) -> sp.csr_matrix | sp.csc_matrix:
    """An h5ad ``csr_matrix`` / ``csc_matrix`` group as scipy holds it after anndata's read:
    data, indices and indptr as stored (no index dtype conversion)."""
    matrix_class = sp.csr_matrix if encoding == "csr_matrix" else sp.csc_matrix
    data = read_array(group["data"], threads)
    matrix = matrix_class(tuple(int(s) for s in group.attrs["shape"]), dtype=data.dtype)
    matrix.data = data
    matrix.indices = read_array(group["indices"], threads)
    matrix.indptr = read_array(group["indptr"], threads)
    return matrix
