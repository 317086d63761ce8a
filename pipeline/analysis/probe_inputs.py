"""Per-document probe inputs other than a hook's pooled rows: output-uncertainty features and spectral-series
summaries, alone or concatenated with the pooled hook (`train_probe(..., features="uncertainty+hook")`).

Every input is one row per document over the same documents a plain hook probe uses (those with a non-special
token), so the document split, which depends only on the ids, the labels and the seed, is the same and an
activation probe and its output-only baseline are scored on the same test documents. A document an input has no
value for (a one-token document has no prediction, a short one no spectral window) gets that feature's mean
over the other documents, counted in the probe's info; a feature no document has is left out.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from actstore.schemas.errors import AnalysisError, StoreError
from actstore.schemas.jobs import ProbeJob

log = logging.getLogger("actstore")
PARTS = ("uncertainty", "spectral", "hook")


def parts_of(features: str | None) -> list[str]:
    """The +-joined parts of a `features` value that this module builds (empty for None and sae:URL)."""
    if not features or features.startswith("sae:"):
        return []
    return features.split("+")


def needs_hook(features: str | None) -> bool:
    """Whether these features read a hook (a plain probe, `hook`, or `spectral`)."""
    parts = parts_of(features)
    return not parts or "hook" in parts or "spectral" in parts


def check_inputs(store: Any, job: ProbeJob) -> None:
    """Refuse, before any work, features this store cannot give (no token_outputs, no response rows)."""
    from actstore.pipeline.analysis.uncertainty import response_mask

    parts = parts_of(job.features)
    if "uncertainty" in parts and not store.has_token_outputs:
        raise StoreError(f"features {job.features!r} need per-token outputs, and store {store.url} has none; "
                         "extract it with `token_outputs: {topk: 2}`")
    if job.feature_rows == "response" and parts:
        response_mask(store.tokens(), f"features {job.features!r}:")


def document_ids(store: Any, exclude_special: bool) -> np.ndarray:
    """Sorted ids of the documents a pooled hook probe sees: those with at least one kept token."""
    docs = store.tokens().column("doc_id").to_numpy()
    return np.unique(docs[~store.special_mask()] if exclude_special else docs)


def _align(ids: np.ndarray, block_ids: np.ndarray, block: np.ndarray) -> np.ndarray:
    out = np.full((len(ids), block.shape[1]), np.nan)
    pos = np.searchsorted(block_ids, ids)
    ok = (pos < len(block_ids)) & (block_ids[np.minimum(pos, len(block_ids) - 1)] == ids)
    out[ok] = block[pos[ok]]
    return out


def _block(store: Any, job: ProbeJob, hook: str | None, part: str, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    if part == "uncertainty":
        from actstore.pipeline.analysis.uncertainty import doc_matrix

        block_ids, x, names = doc_matrix(store, job.feature_rows)
        return _align(ids, block_ids, x), [f"uncertainty.{n}" for n in names]
    if part == "spectral":
        from actstore.pipeline.analysis.spectral_series import doc_summaries, spectral_series

        series = spectral_series(store, [str(hook)], job.series_window, job.series_stride, job.feature_rows,
                                 exclude_special=job.exclude_special)
        x, names = doc_summaries(series, str(hook), ids)
        return x, [f"spectral.{n}" for n in names]
    from actstore.pipeline.analysis.pooling import pooled

    pooled_ids, x = pooled(store, str(hook), job.pooling, job.exclude_special)
    return _align(ids, pooled_ids, x.astype(np.float64)), [f"hook.{i}" for i in range(x.shape[1])]


def features_matrix(store: Any, job: ProbeJob, hook: str | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(doc ids, (n_docs, f) float32 inputs, info: feature names and imputed counts) of `job.features`."""
    ids = document_ids(store, job.exclude_special)
    blocks, names = zip(*(_block(store, job, hook, p, ids) for p in parts_of(job.features)), strict=True)
    x = np.concatenate(blocks, axis=1)
    names_all = [n for ns in names for n in ns]
    present = ~np.all(np.isnan(x), axis=0)
    if not present.any():
        raise AnalysisError(f"features {job.features!r}: no document has a value (documents too short for the "
                            "window, or no predictions); use a shorter series_window or other features")
    x, names_all = x[:, present], [n for n, p in zip(names_all, present, strict=True) if p]
    missing = np.isnan(x)
    if missing.any():
        x = np.where(missing, np.nanmean(x, axis=0), x)
        log.warning("features %r: %d document(s) lack some values, filled with the feature's mean",
                    job.features, int(missing.any(axis=1).sum()))
    info = {"feature_names": names_all if len(names_all) <= 64 else names_all[:64] + ["..."],
            "n_features": len(names_all), "n_docs_imputed": int(missing.any(axis=1).sum())}
    return ids, x.astype(np.float32), info
