"""`actstore.spectral_series`: spectral descriptors of sliding token windows, per document and hook (EigenTrack).

Each document's rows (in row order, special tokens left out by default, or only its generated response tokens)
are cut into windows of `window` consecutive tokens every `stride` tokens; each window's correlation (or
covariance) matrix gives the descriptors `windowed` monitoring uses (`actstore.workers.spectra.window_descriptors`):
spectral entropy, effective rank, top eigenvalue, bulk deviation from Marchenko-Pastur (KS), bulk σ², outliers
and total variance. A window is usually far shorter than the hook's width, so its matrix has rank < window:
the descriptors track how concentrated the few directions the tokens move along are, which is what EigenTrack
follows over a generation. Documents with fewer rows than `window` have no windows.

One Dask task per hook streams that hook's chunks, holding one document's rows at a time: on the cluster at
`scheduler` when the job names one, else in local threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actstore.schemas.errors import ConfigError
from actstore.schemas.jobs import SpectralSeriesJob
from actstore.workers.spectra import check_choices, window_descriptors

DESCRIPTORS = ("spectral_entropy", "effective_rank", "top_eigenvalue", "ks", "sigma2", "n_outliers",
               "total_variance")
SUMMARIZED = ("spectral_entropy", "effective_rank", "top_eigenvalue", "ks")  # what probes read per hook


def selected_rows(store: Any, rows: str, exclude_special: bool) -> np.ndarray:
    """Boolean per stored row: the rows the series windows."""
    from actstore.pipeline.analysis.uncertainty import response_mask

    keep = ~store.special_mask() if exclude_special else np.ones(store.n_tokens, bool)
    if rows == "response":
        keep &= response_mask(store.tokens(), "spectral_series")
    elif rows != "all":
        raise ConfigError(f"rows must be 'all' or 'response', got {rows!r}")
    return keep


def _doc_runs(store: Any, hook: str, keep: np.ndarray, docs: np.ndarray) -> Iterator[tuple[int, np.ndarray,
                                                                                          np.ndarray]]:
    """(doc id, its kept rows' global indices, those rows) per run of one document's rows, streaming chunks."""
    x = store.activations(hook)
    bounds = np.cumsum((0,) + x.chunks[0])
    cur: int | None = None
    idx: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    for i, block in enumerate(x.to_delayed().ravel()):
        a, b = int(bounds[i]), int(bounds[i + 1])
        arr = np.asarray(block.compute(scheduler="sync"))
        cuts = np.flatnonzero(np.diff(docs[a:b])) + 1
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, b - a], strict=True):
            if docs[a + s] != cur:
                if cur is not None:
                    yield cur, np.concatenate(idx), np.concatenate(parts)
                cur, idx, parts = int(docs[a + s]), [], []
            k = keep[a + s:a + e]
            idx.append(np.arange(a + s, a + e)[k])
            parts.append(arr[s:e][k])
    if cur is not None:
        yield cur, np.concatenate(idx), np.concatenate(parts)


def hook_series(store: Any, hook: str, keep: np.ndarray, docs: np.ndarray, window: int, stride: int, basis: str,
                tw_margin: float, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of the series of one hook (see the module docstring); `store` may be a URL (a remote Dask task)."""
    if isinstance(store, str):
        from actstore.pipeline.store.store import open_store

        store = open_store(store, storage_options)
    out = []
    for doc, idx, rows in _doc_runs(store, hook, keep, docs):
        for start in range(0, len(rows) - window + 1, stride):
            d = window_descriptors(rows[start:start + window].astype(np.float64), tw_margin, basis)
            out.append({"doc_id": doc, "hook": hook, "window_start": start, "window_end": start + window,
                        "first_row": int(idx[start]), "last_row": int(idx[start + window - 1]),
                        **{k: d[k] for k in DESCRIPTORS}})
    return out


def _schema() -> pa.Schema:
    ints = [("doc_id", pa.int64()), ("hook", pa.string()), ("window_start", pa.int64()), ("window_end", pa.int64()),
            ("first_row", pa.int64()), ("last_row", pa.int64())]
    return pa.schema(ints + [(k, pa.int64() if k == "n_outliers" else pa.float64()) for k in DESCRIPTORS])


def spectral_series(store: Any, hooks: list[str] | str | None = None, window: int = 16, stride: int | None = None,
                    rows: str = "all", basis: str = "correlation", exclude_special: bool = True,
                    tw_margin: float = 4.0, job: SpectralSeriesJob | None = None) -> pa.Table:
    """Spectral descriptors per (document, hook, window) as one pyarrow table.

    Columns: doc_id, hook, window_start/window_end (the window's tokens among the document's windowed tokens,
    end exclusive), first_row/last_row (their global store rows), then DESCRIPTORS. `store` is a Store, a URL
    or a SpectralSeriesJob (whose `out`, if set, receives the table as Parquet). `rows="response"` windows only
    the generated response tokens (ConfigError on a store without them).
    """
    import dask

    job, store = _job_and_store(store, hooks, window, stride, rows, basis, exclude_special, tw_margin, job)
    names = job.hooks or store.hooks
    for h in names:
        store.manifest.hook(h)  # unknown hook: its HookNameError before any work
    keep = selected_rows(store, job.rows, job.exclude_special)
    docs = store.tokens().column("doc_id").to_numpy()
    stride = job.stride or job.window
    # on a cluster each task opens the store itself; locally threads share this one (no cluster to start)
    src = job.store if job.scheduler else store
    tasks = [dask.delayed(hook_series)(src, h, keep, docs, job.window, stride, job.basis, job.tw_margin,
                                       job.storage_options) for h in names]
    if job.scheduler:
        from actstore.pipeline.analysis.dask_client import dask_client

        with dask_client(job.scheduler):
            parts = dask.compute(*tasks)
    else:
        parts = dask.compute(*tasks, scheduler="threads")
    table = pa.Table.from_pylist([r for p in parts for r in p], schema=_schema())
    if job.out:
        from actstore.pipeline.analysis.results import provenance
        from actstore.pipeline.analysis.uncertainty import write_table

        write_table(table, job.out, provenance(store, job, "spectral_series"), job.storage_options)
    return table


def _job_and_store(store: Any, hooks: Any, window: int, stride: int | None, rows: str, basis: str,
                   exclude_special: bool, tw_margin: float, job: SpectralSeriesJob | None) -> tuple[Any, Any]:
    if isinstance(store, SpectralSeriesJob):
        job, store = store, None
    if job is None:
        check_choices(basis, "mp")
        job = SpectralSeriesJob.build({
            "store": store if isinstance(store, str) else store.url,
            "hooks": [hooks] if isinstance(hooks, str) else list(hooks or []), "window": window, "stride": stride,
            "rows": rows, "basis": basis, "exclude_special": exclude_special, "tw_margin": tw_margin})
    if store is None or isinstance(store, str):
        from actstore.pipeline.store.store import open_store

        store = open_store(job.store, job.storage_options)
    return job, store


def doc_summaries(series: pa.Table, hook: str, doc_ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(len(doc_ids), 3 * len(SUMMARIZED)) mean/max/last of each summarised descriptor of `hook`'s series per
    document (NaN for a document without windows), and the feature names."""
    t = series.filter(pc.equal(series.column("hook"), hook))
    doc = t.column("doc_id").to_numpy()
    slot = {int(d): i for i, d in enumerate(doc_ids)}
    x = np.full((len(doc_ids), 3 * len(SUMMARIZED)), np.nan)
    names = [f"{how}_{k}" for k in SUMMARIZED for how in ("mean", "max", "last")]
    for j, k in enumerate(SUMMARIZED):
        v = t.column(k).to_numpy(zero_copy_only=False).astype(np.float64)
        for d in np.unique(doc):
            if int(d) in slot:
                vals = v[doc == d]  # rows of one document are in window order
                x[slot[int(d)], 3 * j:3 * j + 3] = (vals.mean(), vals.max(), vals[-1])
    return x, names
