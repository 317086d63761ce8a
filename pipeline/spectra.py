"""`actstore.spectrum` / `actstore spectra`: covariance spectra of stored activations as a Dask job.

Each chunk of the hook's dask array becomes a partial covariance (float64 sums of the shifted rows and their
outer products, `CovarianceAccumulator`), the partials are tree-merged exactly, and the eigen-analysis runs on
the driver: Marchenko–Pastur fit, outliers above the edge plus a Tracy–Widom margin, KS distance, entropy,
effective rank, participation ratio and the power-law tail exponent. Special tokens are excluded by default.
"""

from __future__ import annotations

import json
from typing import Any

import dask
import numpy as np

from actstore.workers.spectra import (
    CovarianceAccumulator,
    SpectrumResult,
    merge_partials,
    spectrum_from_covariance,
    windowed_descriptors,
)


def _partial(block: np.ndarray, keep: np.ndarray) -> dict[str, np.ndarray]:
    return CovarianceAccumulator(block.shape[1]).update(block[keep]).to_dict()


def _tree(parts: list[Any]) -> Any:
    """Pairwise merge tree of delayed partials (depth log2(n))."""
    while len(parts) > 1:
        parts = [dask.delayed(merge_partials)(*parts[i:i + 2]) for i in range(0, len(parts), 2)]
    return parts[0]


def covariance(store: Any, hook: str, exclude_special: bool = True, max_tokens: int | None = None,
               scheduler: Any = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, covariance with denominator n-1, n) of a hook, from one blockwise pass."""
    x = store.activations(hook)
    keep = ~store.special_mask() if exclude_special else np.ones(store.n_tokens, bool)
    if max_tokens is not None:
        keep &= np.arange(store.n_tokens) < max_tokens
    blocks, bounds = x.to_delayed().ravel(), np.cumsum((0,) + x.chunks[0])
    parts = [dask.delayed(_partial)(b, keep[bounds[i]:bounds[i + 1]]) for i, b in enumerate(blocks)]
    state = dask.compute(_tree(parts), scheduler=scheduler)[0]
    return CovarianceAccumulator.from_dict(state).finalize()


def spectrum(store: Any, hook: str, exclude_special: bool = True, max_tokens: int | None = None,
             tw_margin: float = 4.0, scheduler: Any = None) -> SpectrumResult:
    """Eigenvalues (descending), outliers and metrics of the hook's covariance (see module docstring)."""
    if isinstance(store, str):
        from actstore.pipeline.store import open_store

        store = open_store(store)
    _, cov, n = covariance(store, hook, exclude_special, max_tokens, scheduler)
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
