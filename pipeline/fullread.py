"""Read a whole hook into one in-memory numpy array, fast: `Store.to_numpy(hook)`.

`Store.activations(h).compute()` goes through Dask: one task per Zarr chunk, then a final concatenation, which
costs graph dispatch and, on few cores, lock hand-offs. When the result is meant to sit in memory anyway, this
preallocates it once and copies every chunk into its place from a small thread pool (numpy copies and the
memory-mapped / decoded chunk reads release the GIL), so each byte is copied once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from actstore.workers.dtypes import decoded_dtype


def chunk_jobs(store: Any, hook: str) -> list[tuple[int, int, int, int]]:
    """(shard index, start, stop, destination row) for every Zarr chunk of the hook, in row order."""
    jobs, row = [], 0
    for i, info in enumerate(store.manifest.shards):
        step = max(1, int(store.shard_array(i, hook).chunks[0])) if info.n_tokens else 1
        jobs += [(i, a, min(a + step, info.n_tokens), row + a) for a in range(0, info.n_tokens, step)]
        row += info.n_tokens
    return jobs


def read_hook(store: Any, hook: str, threads: int | None = None) -> np.ndarray:
    """The hook's (n_tokens, d) rows, decoded (bfloat16 -> float32), in one preallocated array."""
    h = store.manifest.hook(hook)
    out = np.empty((sum(s.n_tokens for s in store.manifest.shards), h.d), decoded_dtype(h.dtype))

    def copy(job: tuple[int, int, int, int]) -> None:
        i, a, b, dst = job
        out[dst:dst + b - a] = store.read_rows(hook, i, a, b)

    jobs = chunk_jobs(store, hook)
    with ThreadPoolExecutor(max(1, threads or min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(copy, jobs))  # list(): re-raise the first failed chunk's error here
    return out
