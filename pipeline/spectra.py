"""`actstore.spectrum` / `actstore spectra`: covariance spectra of stored activations as a Dask job.

Each ~64 MiB block of whole Zarr chunks becomes one Dask task computing a partial covariance (float64 sums of
the rows shifted by a common early mean estimate and of their outer products, `CovarianceAccumulator`); the
partials add up exactly in one flat step, and the eigen-analysis runs on the driver: Marchenko–Pastur fit, outliers above the edge plus a Tracy–Widom margin, KS distance, entropy,
effective rank, participation ratio and the power-law tail exponent. Special tokens are excluded by default.
"""

from __future__ import annotations

import json
from typing import Any

import dask
import numpy as np

from actstore.pipeline.blocks import chunk_blocks
from actstore.workers.dtypes import NUMPY_STORED
from actstore.workers.spectra import (
    PRECISIONS,
    CovarianceAccumulator,
    SpectrumResult,
    spectrum_from_covariance,
    windowed_descriptors,
)

_TASK_BYTES = 64 << 20  # stored bytes per Dask task: a few large tasks, not one per ~4 MiB Zarr chunk


def _row_blocks(store: Any, hook: str, keep: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(shard index, start, stop, global start) blocks of whole Zarr chunks, ~_TASK_BYTES each, holding kept rows."""
    h = store.manifest.hook(hook)
    target = _TASK_BYTES // (h.d * NUMPY_STORED[h.dtype].itemsize)
    starts = [s.token_start for s in store.manifest.shards]
    blocks = [(i, a, b, starts[i] + a) for i, a, b in chunk_blocks(store, hook, target_rows=target)]
    return [blk for blk in blocks if keep[blk[3]:blk[3] + blk[2] - blk[1]].any()]


def _partial(store: Any, hook: str, block: tuple[int, int, int, int], keep: np.ndarray, shift: np.ndarray,
             precision: str) -> dict[str, np.ndarray]:
    """Float64 partial sums of one block, shifted by the common `shift` (so partials merge by addition)."""
    i, a, b, _ = block
    x = store.read_rows(hook, i, a, b)
    x = x if keep.all() else x[keep]
    return CovarianceAccumulator(x.shape[1], precision).update(x, shift=shift).to_dict()


def _add_partials(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat reduction: partials with the same shift add exactly (no pairwise tree of re-centring merges)."""
    out = {k: np.array(v, copy=True) for k, v in parts[0].items()}
    for p in parts[1:]:
        for k in ("n", "sum", "sxx"):
            out[k] = out[k] + p[k]
    return out


def _early_shift(store: Any, hook: str, blocks: list, keep: np.ndarray, precision: str) -> np.ndarray:
    """The early mean estimate every block is shifted by: the mean of the first block's first kept rows."""
    i, a, b, g = blocks[0]
    stop = min(b, a + 8192)
    x = store.read_rows(hook, i, a, stop)[keep[g:g + stop - a]]
    if not len(x):  # the first rows are all special: use the whole block (it holds kept rows)
        x = store.read_rows(hook, i, a, b)[keep[g:g + b - a]]
    return CovarianceAccumulator(x.shape[1], precision)._early_mean(x)


def covariance(store: Any, hook: str, exclude_special: bool = True, max_tokens: int | None = None,
               scheduler: Any = None, precision: str = "float64") -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, covariance with denominator n-1, n) of a hook, from one blockwise pass.

    One Dask task per ~64 MiB of stored rows computes float64 partial sums around a common early mean; the
    partials are added in one flat step. `precision="float32"` runs the per-block products in float32 (see
    `CovarianceAccumulator`); the default float64 keeps eigenvalues within 1e-6 relative of a float64 reference.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    keep = ~store.special_mask() if exclude_special else np.ones(store.n_tokens, bool)
    if max_tokens is not None:
        keep[max_tokens:] = False
    blocks = _row_blocks(store, hook, keep)
    if not blocks:
        raise ValueError(f"need at least 2 rows for a covariance, have 0 (hook {hook!r})")
    shift = _early_shift(store, hook, blocks, keep, precision)
    parts = [dask.delayed(_partial)(store, hook, blk, keep[blk[3]:blk[3] + blk[2] - blk[1]], shift, precision)
             for blk in blocks]
    state = dask.compute(dask.delayed(_add_partials)(*parts), scheduler=scheduler)[0]
    return CovarianceAccumulator.from_dict(state).finalize()


def spectrum(store: Any, hook: str, exclude_special: bool = True, max_tokens: int | None = None,
             tw_margin: float = 4.0, scheduler: Any = None, precision: str = "float64") -> SpectrumResult:
    """Eigenvalues (descending), outliers and metrics of the hook's covariance (see module docstring).

    `precision="float32"` is an opt-in, faster mode whose per-block products run in float32 (eigenvalue error
    ~1e-8 of λ_max, but small eigenvalues may miss the 1e-6 relative contract that the float64 default meets).
    """
    if isinstance(store, str):
        from actstore.pipeline.store import open_store

        store = open_store(store)
    _, cov, n = covariance(store, hook, exclude_special, max_tokens, scheduler, precision)
    return spectrum_from_covariance(cov, n, tw_margin=tw_margin)


def windowed(store: Any, hook: str, window_rows: int, exclude_special: bool = True) -> list[dict[str, Any]]:
    """Spectral descriptors over consecutive token windows (streaming monitoring)."""
    keep = ~store.special_mask() if exclude_special else np.ones(store.n_tokens, bool)
    x = store.activations(hook)
    bounds = np.cumsum((0,) + x.chunks[0])

    def blocks():
        for i, b in enumerate(x.to_delayed().ravel()):
            yield np.asarray(b.compute(scheduler="sync"))[keep[bounds[i]:bounds[i + 1]]]

    return windowed_descriptors(blocks(), window_rows, tw_margin=4.0)


def save_spectrum(res: SpectrumResult, path: str, hook: str | None = None) -> None:
    """metrics + eigenvalues as JSON (plain numbers; no pickle)."""
    with open(path, "w") as f:
        json.dump({**res.to_json(), "hook": hook}, f, indent=1)
