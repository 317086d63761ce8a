"""Chunk-aligned row blocks of a stored hook: the unit the loader, `Store.to_numpy` and the spectrum iterate over.

A block never crosses a shard or a Zarr chunk boundary that is not also a block boundary, so reading one is a
zero-copy view (raw chunks) or one chunk decode.
"""

from __future__ import annotations

from typing import Any


def chunk_blocks(store: Any, hook: str, rows: tuple[int, int] | None = None,
                 target_rows: int = 0) -> list[tuple[int, int, int]]:
    """(shard index, start, stop) blocks in row order, restricted to the global row range `rows`.

    Each block is one Zarr chunk, or as many whole chunks as fit in `target_rows` (at least one).
    """
    lo, hi = rows or (0, store.n_tokens)
    out = []
    for i, info in enumerate(store.manifest.shards):
        chunk = int(store.shard_array(i, hook).chunks[0]) if info.n_tokens else 1
        step = chunk * max(1, target_rows // chunk)
        for s in range(0, info.n_tokens, step):
            a, b = max(s, lo - info.token_start), min(s + step, info.n_tokens, hi - info.token_start)
            if a < b:
                out.append((i, a, b))
    return out
