"""The report's spectral-series section: windowed spectral descriptors over a few documents (EigenTrack-style).

Series tables (`actstore spectral-series ... -o FILE.parquet`) are found in the results folder by the provenance in
their Parquet metadata. For each, the deepest hook's spectral entropy and top eigenvalue are drawn window by
window for a few documents; with a document label (the report's `label`), documents of each class are drawn in
that class's colour, so a reader sees whether the classes' trajectories separate.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actstore.pipeline.analysis.report_html import (
    ResultScan,
    figure,
    hook_order,
    note,
    pyplot,
    section,
    short_hook,
    table,
)

SERIES_PANELS = ("spectral_entropy", "top_eigenvalue")
DOCS_PER_CLASS = 4
MAX_DOCS = 8  # without a label


def add_series(scan: ResultScan, path: str) -> None:
    """Keep a Parquet result if it is a spectral series made from the store being reported."""
    try:
        with scan.fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        prov = json.loads(meta.get(b"actstore", b"null"))
    except (OSError, ValueError, pa.ArrowInvalid):
        return  # not a result of ours (a user's own Parquet file, say)
    if not isinstance(prov, dict) or prov.get("kind") != "spectral_series" or not scan.ours(prov):
        return
    try:
        with scan.fs.open(path, "rb") as f:
            scan.res.series.append((path, pq.read_table(f)))
    except (OSError, pa.ArrowInvalid) as e:
        scan.res.notes.append(f"skipped {path}: {type(e).__name__}: {e}")


def _pick_docs(doc_ids: np.ndarray, labels: dict[int, Any] | None) -> list[tuple[int, str | None]]:
    """(doc id, class or None) of the documents drawn: a few per class with a label, else the first few."""
    docs = list(dict.fromkeys(doc_ids.tolist()))
    if labels is None:
        return [(d, None) for d in docs[:MAX_DOCS]]
    by: dict[str, list[int]] = {}
    for d in docs:
        v = labels.get(d)
        if v is not None and len(by.setdefault(str(v), [])) < DOCS_PER_CLASS:
            by[str(v)].append(d)
    return [(d, c) for c in sorted(by) for d in by[c]]


def _doc_labels(store: Any, label: str | None) -> tuple[dict[int, Any] | None, str | None]:
    if label is None:
        return None, None
    docs = store.docs()
    if label not in docs.column_names:
        return None, f"label {label!r} is not a document field of this store; series drawn without classes"
    return dict(zip(docs.column("doc_id").to_pylist(), docs.column(label).to_pylist())), None


def series_section(store: Any, series: list[tuple[str, pa.Table]], label: str | None = None) -> str:
    """One figure per series file (its deepest hook), plus a table of the documents drawn."""
    if not series:
        return ""
    labels, problem = _doc_labels(store, label)
    body = note(problem) if problem else ""
    for i, (path, t) in enumerate(series):
        body += _series_figure(t, labels, label, f"series-{i}", path)
    return section("Spectral series", body, "spectral-series")


def _series_figure(t: pa.Table, labels: dict[int, Any] | None, label: str | None, fig_id: str, path: str) -> str:
    hooks = sorted(set(t.column("hook").to_pylist()), key=hook_order)
    if not hooks:
        return note(f"{path}: no windows (documents shorter than the window)")
    hook = hooks[-1]
    rows = t.filter(pc.equal(t.column("hook"), hook))
    doc = rows.column("doc_id").to_numpy()
    picked = _pick_docs(doc, labels)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SERIES_PANELS), figsize=(9, 3.2))
    classes = sorted({c for _, c in picked if c is not None})
    colours = {c: f"C{j}" for j, c in enumerate(classes)}
    for ax, key in zip(axes, SERIES_PANELS):
        y = rows.column(key).to_numpy(zero_copy_only=False)
        for j, (d, c) in enumerate(picked):
            m = doc == d
            ax.plot(np.arange(m.sum()), y[m], marker=".", lw=1, color=colours[c] if c is not None else f"C{j % 10}",
                    label=(c if c is not None else f"doc {d}"))
        ax.set_xlabel("window")
        ax.set_title(f"{short_hook(hook)}: {key.replace('_', ' ')}", fontsize=9)
        if key == "top_eigenvalue":
            ax.set_yscale("log")
    handles, names = axes[0].get_legend_handles_labels()
    seen = dict(zip(names, handles))  # one legend entry per class (or document)
    axes[-1].legend(seen.values(), seen.keys(), fontsize=7, title=label)
    fig.tight_layout()
    cells = [[d, c, int((doc == d).sum())] for d, c in picked]
    return (figure(fig, fig_id, f"{path}: {hook}, {len(picked)} documents")
            + table(["doc_id", label or "class", "windows"], cells, f"{fig_id}-docs"))
