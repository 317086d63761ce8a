"""Token-level probes on span labels: `train_probe(store, hook, label="span:NAME", pooling="token")`.

The rows are the store's token rows that the label table `labels/NAME.parquet` labels (special tokens never are);
each is one training example, but the split is by document, as for every probe: tokens of one document are
strongly correlated, and a token split would leak the test set. Unlabelled tokens are left out, not taken as
negatives. Besides the token-level test metrics, a binary probe reports per-document metrics (`doc_*`): a test
document's score is the max over its labelled tokens of P(positive), its label positive when any of its tokens is.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from actstore.schemas.errors import AnalysisError, ConfigError
from actstore.schemas.jobs import ProbeJob
from actstore.workers.probe import ProbeResult, train_probe_arrays
from actstore.workers.probe_metrics import binary_metrics

log = logging.getLogger("actstore")
SPAN = "span:"


def span_name(label: str) -> str | None:
    """NAME of a `span:NAME` label, else None (a document field)."""
    return label[len(SPAN):] if label.startswith(SPAN) else None


def token_labels(store: Any, label: str) -> np.ndarray:
    """The label of every token row (object array, None where unlabelled)."""
    name = str(span_name(label))
    table = store.labels(name)
    if table.num_rows != store.n_tokens:
        raise AnalysisError(f"label {label!r} has {table.num_rows} rows but the store {store.n_tokens} token rows; "
                            "run `actstore verify` and label the store again")
    return np.array(table.column("label").to_pylist(), dtype=object)


def check_span_labels(store: Any, job: ProbeJob) -> dict[str, Any]:
    """Refuse span labels that cannot train a probe (before reading activations); returns class counts."""
    y = token_labels(store, job.label)
    present = np.array([v for v in y if v is not None], dtype=object)
    classes, counts = np.unique(present.astype(str), return_counts=True) if len(present) else (np.array([]),
                                                                                               np.array([]))
    if len(classes) < 2:
        raise AnalysisError(f"label {job.label!r} has {len(classes)} class(es) among {len(present)} labelled "
                            "tokens; a probe needs at least two")
    if len(classes) > 2 and not job.probe.multiclass:
        raise ConfigError(f"label {job.label!r} has {len(classes)} classes ({', '.join(classes[:6].tolist())}); "
                          "set multiclass: true (--multiclass) for a multiclass probe")
    return {"class_counts": dict(zip(classes.tolist(), counts.tolist())),
            "n_dropped_null": int(len(y) - len(present))}


def _rows(store: Any, hook: str, rows: np.ndarray) -> np.ndarray:
    """Activation rows `rows` (sorted) of a hook, read block by block (only blocks holding one of them)."""
    x = store.activations(hook)
    bounds = np.cumsum((0,) + x.chunks[0])
    out = np.empty((len(rows), x.shape[1]), np.float32)
    blocks = x.to_delayed().ravel()
    cuts = np.searchsorted(rows, bounds)
    for i, block in enumerate(blocks):
        a, b = cuts[i], cuts[i + 1]
        if a < b:
            out[a:b] = np.asarray(block.compute(scheduler="sync"))[rows[a:b] - bounds[i]]
    return out


def fit_tokens(job: ProbeJob, hook: str, store: Any) -> ProbeResult:
    """Train and evaluate a token-level probe on one hook; see the module docstring."""
    from actstore.pipeline.analysis.results import provenance

    counts = check_span_labels(store, job)
    y_all = token_labels(store, job.label)
    keep = np.array([v is not None for v in y_all], bool)
    if job.exclude_special:
        keep &= ~store.special_mask()
    rows = np.flatnonzero(keep)
    docs = store.tokens().column("doc_id").to_numpy()[rows]
    x, y = _rows(store, hook, rows), y_all[rows]
    res = train_probe_arrays(x, y, docs, job.probe)
    test = np.isin(docs, res.split["test"])
    if len(res.classes) == 2:
        res.metrics.update(doc_metrics(res, x[test], y[test], docs[test]))
    test_classes = np.unique(y[test].astype(str), return_counts=True)
    res.info.update({"hook": hook, "features": None, "label": job.label, "pooling": "token",
                     "n_tokens_labelled": len(rows), "n_docs_labelled": int(len(np.unique(docs))),
                     "n_docs_dropped_null": int(store.manifest.n_docs - len(np.unique(docs))),
                     "n_tokens_dropped_null": counts["n_dropped_null"], "class_counts": counts["class_counts"],
                     "test_class_counts": dict(zip(*(a.tolist() for a in test_classes))),
                     "provenance": provenance(store, job, "probe")})
    return res


def doc_metrics(res: ProbeResult, x: np.ndarray, y: np.ndarray, docs: np.ndarray) -> dict[str, float]:
    """Per-document metrics (prefixed doc_): score = max P(positive) over the document's tokens, label = any
    positive token. `x`, `y`, `docs` are the test split's token rows."""
    if not len(docs):
        return {}
    p = res.predict_proba(x)[:, 1]
    pos = y == res.classes[1]
    ids, inv = np.unique(docs, return_inverse=True)
    score = np.full(len(ids), -np.inf)
    np.maximum.at(score, inv, p)
    label = np.zeros(len(ids), bool)
    np.logical_or.at(label, inv, pos)
    out = {f"doc_{k}": v for k, v in binary_metrics(label, score, res.config.threshold).items()}
    out["doc_n_docs"] = float(len(ids))
    out["doc_n_positive"] = float(label.sum())
    return out
