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

from actstore.pipeline.store.blocks import chunk_blocks
from actstore.workers.dtypes import decoded_dtype


def read_hook(store: Any, hook: str, threads: int | None = None) -> np.ndarray:
    """The hook's (n_tokens, d) rows, decoded (bfloat16 -> float32), in one preallocated array."""
    h = store.manifest.hook(hook)
    out = np.empty((store.n_tokens, h.d), decoded_dtype(h.dtype))

    def copy(block: tuple[int, int, int]) -> None:
        i, a, b = block
        dst = store.manifest.shards[i].token_start + a  # shards' global row ranges tile [0, n_tokens)
        out[dst:dst + b - a] = store.read_rows(hook, i, a, b)

    with ThreadPoolExecutor(max(1, threads or min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(copy, chunk_blocks(store, hook)))  # list(): re-raise the first failed chunk's error here
    return out
