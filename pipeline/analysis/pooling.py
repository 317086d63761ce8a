"""One vector per document from a stored hook (mean, last or max over its tokens) and document labels.

Shared by probes, the probe inputs and the direction methods that compare class means.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore.schemas.errors import ConfigError
from actstore.workers.probe import PoolAccumulator

_NOT_LABELS = ("doc_id", "source", "n_chars", "n_tokens")


def pooled(store: Any, hook: str, pooling: str = "mean", exclude_special: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(doc ids, pooled (n_docs, d) float32) over each document's non-special tokens, chunk by chunk."""
    x = store.activations(hook)
    tok = store.tokens()
    docs = tok.column("doc_id").to_numpy()
    special = store.special_mask() if exclude_special else np.zeros(store.n_tokens, bool)
    acc = PoolAccumulator(pooling)
    bounds = np.cumsum((0,) + x.chunks[0])
    for i, block in enumerate(x.to_delayed().ravel()):
        a, b = bounds[i], bounds[i + 1]
        acc.update(np.asarray(block.compute(scheduler="sync")), docs[a:b], special[a:b])
    return acc.result()


def label_column(store: Any, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(doc ids, labels as an object array with None where missing) of a docs.parquet field."""
    docs = store.docs()
    if label not in docs.column_names:
        fields = [c for c in docs.column_names if c not in _NOT_LABELS]
        raise ConfigError(f"label {label!r} is not a document field of this store "
                          f"(fields: {', '.join(fields) or 'none'})")
    return docs.column("doc_id").to_numpy(), np.array(docs.column(label).to_pylist(), dtype=object)


def doc_labels(store: Any, label: str, doc_ids: np.ndarray) -> np.ndarray:
    """Label of each doc id from docs.parquet (object array; None where missing)."""
    ids, y = label_column(store, label)
    lookup = dict(zip(ids.tolist(), y.tolist()))
    return np.array([lookup.get(int(d)) for d in doc_ids], dtype=object)
