"""`actstore.train_probe` and the layer sweep: probes on one pooled vector per document, as Dask jobs.

Pooling streams the hook's chunks through `PoolAccumulator` (memory: documents x d), labels come from the
store's docs.parquet, and the split is by document (never by token), so no document is in two splits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from actstore.workers.probe import PoolAccumulator, ProbeConfig, ProbeResult, train_probe_arrays

METRIC_KEYS = ("auroc", "accuracy", "f1", "recall_at_1pct_fpr", "recall_at_5pct_fpr")


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


def doc_labels(store: Any, label: str, doc_ids: np.ndarray) -> np.ndarray:
    """Label of each doc id from docs.parquet (object array; None where missing)."""
    docs = store.docs()
    if label not in docs.column_names:
        fields = [c for c in docs.column_names if c not in ("doc_id", "source", "n_chars", "n_tokens")]
        raise ValueError(f"label {label!r} is not a document field of this store (fields: {', '.join(fields) or 'none'})")
    lookup = dict(zip(docs.column("doc_id").to_pylist(), docs.column(label).to_pylist()))
    return np.array([lookup.get(int(d)) for d in doc_ids], dtype=object)


def train_probe(store: Any, hook: str, label: str, pooling: str = "mean", kind: str = "logistic", seed: int = 0,
                exclude_special: bool = True, **more: Any) -> ProbeResult:
    """Train a probe for `label` on `hook` (pooled per document) and evaluate it on held-out documents.

    Extra keyword arguments go to `ProbeConfig` (l2, hidden, epochs, fractions, threads, ...).
    """
    if isinstance(store, str):
        from actstore.pipeline.store import open_store

        store = open_store(store)
    ids, x = pooled(store, hook, pooling, exclude_special)
    y = doc_labels(store, label, ids)
    keep = np.array([v is not None for v in y], bool)
    cfg = ProbeConfig(kind=kind, seed=seed, **more)
    res = train_probe_arrays(x[keep], y[keep], ids[keep], cfg)
    res.info.update({"hook": hook, "label": label, "pooling": pooling, "n_docs_labelled": int(keep.sum())})
    return res


@dataclass
class ProbeSweep:
    """AUROC etc. per hook; `.table` rows are JSON-able dicts."""

    label: str
    table: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.table, f, indent=1, default=float)

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(len(self.table)), [r["auroc"] for r in self.table], marker="o")
        ax.set_xticks(range(len(self.table)), [r["hook"] for r in self.table], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("test AUROC")
        ax.set_title(f"probe for {self.label!r} by layer")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _probe_task(url: str, storage_options: dict | None, hook: str, label: str, pooling: str, kind: str,
                seed: int, more: dict) -> dict[str, Any]:
    from actstore.pipeline.dask_jobs import task_threads
    from actstore.pipeline.store import open_store

    task_threads()
    res = train_probe(open_store(url, storage_options), hook, label, pooling, kind, seed, **more)
    return {"hook": hook, **{k: float(res.metrics.get(k, float("nan"))) for k in METRIC_KEYS},
            "n_docs": int(res.info["n_docs_labelled"]), "pooling": pooling, "kind": kind}


def _layer_key(hook: str) -> tuple:
    m = re.match(r"blocks\.(\d+)\.(.*)", hook)
    return (int(m.group(1)), m.group(2)) if m else (10**9, hook)


def probe_sweep(store: Any, label: str, hooks: list[str] | None = None, pooling: str = "mean",
                kind: str = "logistic", seed: int = 0, scheduler: Any = None, **more: Any) -> ProbeSweep:
    """One Dask task per hook (every stored hook by default), ordered by layer."""
    hooks = sorted(hooks or store.hooks, key=_layer_key)
    tasks = [dask.delayed(_probe_task)(store.url, store._storage_options, h, label, pooling, kind, seed, more)
             for h in hooks]
    return ProbeSweep(label, list(dask.compute(*tasks, scheduler=scheduler)))
