"""`actstore.uncertainty`: output-only uncertainty features of a store's per-token predictions.

These are the baselines hallucination detectors compare activation probes with: how surprised the model was by
each token it was given (surprisal = next-token loss), how spread its next-token distribution was (entropy), and
how far its favourite stood above the runner-up (top-1 minus top-2 log-probability, when `token_outputs` stored
top-k with k >= 2). They come from `store.token_outputs()`, so no model runs here.

Per token, the table is row-aligned with `tokens()` (row t holds the prediction *of* row t+1). Per document,
features aggregate the predictions of the document's own tokens: row t counts when row t+1 is in the same
sequence and the same document (with packing, the prediction across a document boundary is not the document's),
and with `rows="response"` only when row t+1 is a generated response token. A document without such a
prediction (a one-token document) has null features.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas.errors import ConfigError, StoreError
from actstore.schemas.jobs import UncertaintyJob

# per-document features, in the order probes read them
DOC_FEATURES = ("mean_surprisal", "max_surprisal", "mean_entropy", "max_entropy", "mean_margin")


@dataclass
class UncertaintyResult:
    """`.tokens`: one row per token row; `.docs`: one row per document of docs(); `.info`: provenance etc."""

    tokens: pa.Table
    docs: pa.Table
    info: dict[str, Any] = field(default_factory=dict)

    def table(self, level: str = "document") -> pa.Table:
        return self.docs if level == "document" else self.tokens


def _column(out: pa.Table, name: str) -> np.ndarray | None:
    if name not in out.column_names:
        return None
    return out.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN


def _margin(out: pa.Table) -> np.ndarray | None:
    if "topk_logprobs" not in out.column_names or out.schema.field("topk_logprobs").type.list_size < 2:
        return None
    col = out.column("topk_logprobs").combine_chunks()
    lp = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
    return (lp[:, 0] - lp[:, 1]).astype(np.float64)


def response_mask(tokens: pa.Table, what: str) -> np.ndarray:
    """The boolean `response` column of the token index, or a ConfigError naming why there is none."""
    if "response" not in tokens.column_names:
        raise ConfigError(f"{what} rows='response' needs a store of generated responses (its tokens() have no "
                          "`response` column); use rows='all'")
    return tokens.column("response").to_numpy(zero_copy_only=False).astype(bool)


def token_features(store: Any, rows: str = "all") -> pa.Table:
    """Per-token table row-aligned with tokens(): doc_id, seq_id, position, surprisal, chosen_prob, entropy (when
    stored), margin (with top-k >= 2), `counted` (the prediction is one of its document's, see the module doc)."""
    if not store.has_token_outputs:
        raise StoreError(f"store {store.url} has no per-token outputs, so no uncertainty features; extract it with "
                         "`token_outputs: {topk: 2}` (any causal LM)")
    tok, out = store.tokens(), store.token_outputs()
    doc, seq = tok.column("doc_id").to_numpy(), tok.column("seq_id").to_numpy()
    surprisal = _column(out, "loss")
    assert surprisal is not None
    chosen = _column(out, "chosen_prob")
    cols: dict[str, Any] = {"doc_id": doc, "seq_id": seq, "position": tok.column("position").to_numpy(),
                            "surprisal": surprisal,
                            # stores written before chosen_prob existed: it is exp(-loss) by definition
                            "chosen_prob": np.exp(-surprisal) if chosen is None else chosen}
    for name, values in (("entropy", _column(out, "entropy")), ("margin", _margin(out))):
        if values is not None:
            cols[name] = values
    counted = np.zeros(len(doc), bool)
    counted[:-1] = (doc[1:] == doc[:-1]) & (seq[1:] == seq[:-1]) & ~np.isnan(surprisal[:-1])
    if rows == "response":
        counted[:-1] &= response_mask(tok, "uncertainty")[1:]
    elif rows != "all":
        raise ConfigError(f"rows must be 'all' or 'response', got {rows!r}")
    cols["counted"] = counted
    return pa.table({k: pa.array(v, mask=np.isnan(v)) if v.dtype == np.float64 else pa.array(v)
                     for k, v in cols.items()})


def doc_features(tokens: pa.Table, doc_ids: np.ndarray) -> pa.Table:
    """One row per id of `doc_ids`: n_predictions and the DOC_FEATURES present (null without predictions)."""
    keep = tokens.column("counted").to_numpy(zero_copy_only=False)
    doc = tokens.column("doc_id").to_numpy()[keep]
    slot = np.searchsorted(doc_ids, doc)
    if np.any(slot >= len(doc_ids)) or np.any(doc_ids[np.minimum(slot, len(doc_ids) - 1)] != doc):
        raise StoreError("token_outputs name documents that docs.parquet lacks; run `actstore verify` on the store")
    n = np.bincount(slot, minlength=len(doc_ids))
    cols: dict[str, Any] = {"doc_id": pa.array(doc_ids, pa.int64()), "n_predictions": pa.array(n, pa.int64())}
    for name in ("surprisal", "entropy", "margin"):
        if name not in tokens.column_names:
            continue
        v = tokens.column(name).to_numpy(zero_copy_only=False).astype(np.float64)[keep]
        for how in ("mean", "max") if name != "margin" else ("mean",):
            f = f"{how}_{name}"
            agg = _group(v, slot, len(doc_ids), how, n)
            cols[f] = pa.array(agg, pa.float64(), mask=np.isnan(agg))
    return pa.table(cols)


def _group(v: np.ndarray, slot: np.ndarray, n_groups: int, how: str, n: np.ndarray) -> np.ndarray:
    if how == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.bincount(slot, v, minlength=n_groups) / n
    out = np.full(n_groups, -np.inf)
    np.maximum.at(out, slot, v)
    return np.where(n > 0, out, np.nan)


def uncertainty(store: Any, rows: str = "all", job: UncertaintyJob | None = None) -> UncertaintyResult:
    """Per-token and per-document uncertainty features of `store` (a Store, a URL or an UncertaintyJob).

    `.docs` columns: doc_id, n_predictions, mean/max_surprisal, mean/max_entropy (stores with entropy),
    mean_margin (top-k >= 2); `.tokens`: see `token_features`. With a job whose `out` is set, the chosen table is
    also written there as Parquet (provenance in its metadata). Raises StoreError for a store without
    token_outputs, ConfigError for rows='response' on a store without generated responses.
    """
    if isinstance(store, UncertaintyJob):
        job, store = store, None
    if job is None:
        job = UncertaintyJob.build({"store": store if isinstance(store, str) else store.url, "rows": rows})
    if store is None or isinstance(store, str):
        from actstore.pipeline.store.store import open_store

        store = open_store(job.store, job.storage_options)
    tokens = token_features(store, job.rows)
    doc_ids = np.sort(store.docs().column("doc_id").to_numpy())
    from actstore.pipeline.analysis.results import provenance

    res = UncertaintyResult(tokens, doc_features(tokens, doc_ids), {"provenance": provenance(store, job,
                                                                                             "uncertainty")})
    if job.out:
        res.info["written"] = write_table(res.table(job.level), job.out, res.info["provenance"],
                                          job.storage_options)
    return res


def write_table(table: pa.Table, url: str, prov: dict[str, Any], storage_options: dict[str, Any] | None) -> str:
    """Write `table` as one Parquet file at `url`, atomically, with the provenance as JSON schema metadata."""
    from actstore.pipeline.analysis.results import clean
    from actstore.workers import storage

    meta = {**(table.schema.metadata or {}), b"actstore": json.dumps(clean(prov)).encode()}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    fs, path = storage.get_fs(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    storage.with_retries(lambda: storage.put_atomic(fs, path, buf.getvalue()), f"writing {url}")
    return url


def doc_matrix(store: Any, rows: str = "all") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(doc ids, (n_docs, f) float64 features with NaN where missing, feature names) for probes."""
    docs = uncertainty(store, rows).docs
    names = [c for c in DOC_FEATURES if c in docs.column_names]
    x = np.stack([docs.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in names], axis=1)
    return docs.column("doc_id").to_numpy(), x, names
