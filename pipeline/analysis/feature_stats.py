"""`actstore.features` / `actstore features`: what each SAE latent of a feature store does, in one streaming pass.

Per latent: count and density (fraction of tokens it fires on), mean activation over those tokens, mean over
all tokens, max activation, and the top-N contexts: the N tokens where it fires most (ties: the earlier row),
each with its document id, position, value and a text window of `window` tokens either side (decoded with the
model's tokenizer; the token's character span in that text is given, so it can be highlighted). The top-N are
kept in an (N x d_sae) table merged block by block, so memory stays N x d_sae values whatever the store's size.
Per document: how many of its tokens each latent fires on and their sum (doc_counts). With a `label` (a
docs.parquet field: numeric, or two classes), each latent's Pearson correlation between its per-document mean
activation and the label.

Results (`save`, default `<feature store>/summary/`): latents.parquet, contexts.parquet, doc_counts.parquet and
features-summary.json (the N most frequent and most label-correlated latents with their contexts, and the
provenance naming the source store, which `actstore report` matches to draw feature pages).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actstore.pipeline.analysis.features import FeatureStore, open_features
from actstore.schemas import layout
from actstore.schemas.errors import AnalysisError, ConfigError
from actstore.schemas.jobs import FeaturesJob

SUMMARY_JSON = "features-summary.json"
REPORT_LATENTS = 12  # latents per list (most frequent, most label-correlated) in the summary and the report


class TopN:
    """The N largest (value, row) entries per latent, ties broken by the smaller row; (d_sae, N) arrays."""

    def __init__(self, d_sae: int, n: int) -> None:
        self.n = n
        self.value = np.full((d_sae, n), -np.inf, np.float32)
        self.row = np.full((d_sae, n), -1, np.int64)

    def update(self, latent: np.ndarray, value: np.ndarray, row: np.ndarray) -> None:
        """Merge candidate entries (one per (token, latent) pair; rows ascending as the store is read)."""
        keep = value > self.value[latent, -1]  # a tie with the N-th keeps the earlier (already kept) row
        if not keep.any():
            return
        latent, value, row = latent[keep], value[keep].astype(np.float32), row[keep]
        lat = np.unique(latent)
        all_l = np.concatenate([np.repeat(lat, self.n), latent])
        all_v = np.concatenate([self.value[lat].ravel(), value])
        all_r = np.concatenate([self.row[lat].ravel(), row])
        order = np.lexsort((np.where(all_r < 0, np.iinfo(np.int64).max, all_r), -all_v, all_l))
        all_l, all_v, all_r = all_l[order], all_v[order], all_r[order]
        first = np.searchsorted(all_l, lat)
        rank = np.arange(len(all_l)) - np.repeat(first, np.diff(np.r_[first, len(all_l)]))
        sel = rank < self.n
        self.value[lat] = all_v[sel].reshape(len(lat), self.n)
        self.row[lat] = all_r[sel].reshape(len(lat), self.n)


@dataclass
class FeaturesResult:
    """Per-latent statistics, top contexts and per-document counts of a feature store."""

    latents: pa.Table
    """latent, count, density, mean_activation (over firing tokens), mean_all (over all tokens), max_activation,
    and label_correlation with a label."""
    contexts: pa.Table
    """latent, rank, row, doc_id, seq_id, position, value, token_id, token, text, highlight_start, highlight_end."""
    doc_counts: pa.Table | None
    """doc_id, latent, count (tokens it fired on), sum (of its activations)."""
    info: dict[str, Any] = field(default_factory=dict)
    """n_tokens counted, label, the feature store's URL and its source (with provenance)."""

    def top(self, by: str = "count", n: int = REPORT_LATENTS) -> list[int]:
        """Latent ids with the largest `by` (count, or |label_correlation|), ties by the smaller id."""
        if by not in self.latents.column_names:
            return []
        v = np.nan_to_num(np.abs(self.latents.column(by).to_numpy(zero_copy_only=False).astype(np.float64)), nan=-1)
        order = np.lexsort((self.latents.column("latent").to_numpy(), -v))
        return [int(self.latents.column("latent")[int(i)].as_py()) for i in order[:n] if v[i] > 0]

    def save(self, out: str, storage_options: dict[str, Any] | None = None) -> list[str]:
        """latents/contexts/doc_counts Parquet files and features-summary.json under the folder/URL `out`."""
        import pyarrow.parquet as pq

        from actstore.pipeline.analysis.results import Output

        o = Output(out, storage_options)
        written = []
        for name, table in (("latents.parquet", self.latents), ("contexts.parquet", self.contexts),
                            ("doc_counts.parquet", self.doc_counts)):
            if table is not None:
                buf = io.BytesIO()
                pq.write_table(table, buf, compression="zstd")
                written.append(o.put_bytes(name, buf.getvalue()))
        written.append(o.put_json(SUMMARY_JSON, self.summary()))
        return written

    def summary(self) -> dict[str, Any]:
        """The JSON the report reads: density histogram data and the featured latents with their contexts."""
        dens = self.latents.column("density").to_numpy()
        lists = {"most_frequent": self.top("count"), "most_label_correlated": self.top("label_correlation")}
        chosen = sorted({i for ids in lists.values() for i in ids})
        lat = self.latents.to_pylist()
        ctx = self.contexts.filter(pc.is_in(self.contexts.column("latent"), pa.array(chosen, pa.int32())))
        return {**self.info, "lists": lists, "latents": {str(i): lat[i] for i in chosen},
                "contexts": ctx.to_pylist(), "density": dens.tolist()}


def _job(url: Any, more: dict[str, Any]) -> FeaturesJob:
    if isinstance(url, FeaturesJob):
        return url
    return FeaturesJob.build({"store": url if isinstance(url, str) else url.url, **more})


def features(url: Any, **more: Any) -> FeaturesResult:
    """Per-latent density, mean/max activation and top contexts of a feature store (see the module docstring).

    `url` is a feature store URL, a FeatureStore or a FeaturesJob; `more` takes FeaturesJob fields (top_n,
    window, label, exclude_special, doc_counts, out, storage_options). With `out` the results are written there.
    """
    job = _job(url, more)
    fstore = url if isinstance(url, FeatureStore) else open_features(job.store, job.storage_options)
    labels = _labels(fstore, job.label) if job.label else None
    acc = _Pass(fstore, job)
    for i in range(len(fstore.shards)):
        acc.add_shard(i)
    res = acc.result(labels)
    if job.out:
        res.save(job.out, job.storage_options)
    return res


class _Pass:
    """The streaming accumulators of `features`."""

    def __init__(self, fstore: FeatureStore, job: FeaturesJob) -> None:
        d = fstore.d_sae
        self.fstore, self.job = fstore, job
        self.count, self.sum, self.max = np.zeros(d, np.int64), np.zeros(d), np.full(d, -np.inf)
        self.top = TopN(d, job.top_n)
        self.n_tokens = 0
        self.docs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.doc_tokens = np.zeros(0, np.int64)  # counted tokens per doc id

    def add_shard(self, i: int) -> None:
        fs = self.fstore
        tok = fs.shard_tokens(i, ["doc_id", "special"])
        ids, vals = fs.codes(i)
        keep = ~tok.column("special").to_numpy(zero_copy_only=False).astype(bool) if self.job.exclude_special \
            else np.ones(len(ids), bool)
        doc = tok.column("doc_id").to_numpy()
        self.n_tokens += int(keep.sum())
        per_doc = np.bincount(doc[keep], minlength=len(self.doc_tokens)) if keep.any() else np.zeros(0, np.int64)
        if len(per_doc) > len(self.doc_tokens):
            self.doc_tokens = np.pad(self.doc_tokens, (0, len(per_doc) - len(self.doc_tokens)))
        self.doc_tokens[:len(per_doc)] += per_doc
        rows, ranks = np.nonzero((ids >= 0) & keep[:, None])
        lat, val = ids[rows, ranks].astype(np.int64), vals[rows, ranks].astype(np.float64)
        d = fs.d_sae
        self.count += np.bincount(lat, minlength=d)
        self.sum += np.bincount(lat, val, minlength=d)
        np.maximum.at(self.max, lat, val)
        self.top.update(lat, val.astype(np.float32), rows + int(fs.shards[i]["token_start"]))
        if self.job.doc_counts or self.job.label:
            key = doc[rows].astype(np.int64) * d + lat
            uk, inv = np.unique(key, return_inverse=True)
            self.docs.append((uk // d, uk % d, np.bincount(inv), np.bincount(inv, val)))

    def result(self, labels: np.ndarray | None) -> FeaturesResult:
        n = max(self.n_tokens, 1)
        cols: dict[str, Any] = {
            "latent": pa.array(np.arange(len(self.count), dtype=np.int32)), "count": pa.array(self.count),
            "density": pa.array(self.count / n),
            "mean_activation": pa.array(np.where(self.count > 0, self.sum / np.maximum(self.count, 1), 0.0)),
            "mean_all": pa.array(self.sum / n), "max_activation": pa.array(np.where(self.count > 0, self.max, 0.0))}
        doc_table = _merge_docs(self.docs) if self.docs else None
        if labels is not None and doc_table is not None:
            cols["label_correlation"] = pa.array(self._correlation(doc_table, labels))
        info = {"feature_store": self.fstore.url, "feature_manifest_sha256": self.fstore.manifest_sha256,
                "hook": self.fstore.hook, "d_sae": self.fstore.d_sae, "k": self.fstore.k, "n_tokens": self.n_tokens,
                "label": self.job.label, "top_n": self.job.top_n, "window": self.job.window,
                "provenance": _provenance(self.fstore, self.job)}
        contexts = contexts_table(self.fstore, self.top, self.job.window)
        return FeaturesResult(pa.table(cols), contexts, doc_table if self.job.doc_counts else None, info)

    def _correlation(self, docs: pa.Table, labels: np.ndarray) -> np.ndarray:
        """Pearson r over labelled documents of (latent's mean activation per counted token of the doc, label)."""
        d, m = self.fstore.d_sae, len(self.doc_tokens)
        y_all = np.full(m, np.nan)
        y_all[:min(m, len(labels))] = labels[:m]
        counted = np.flatnonzero((self.doc_tokens > 0) & np.isfinite(y_all))
        n, y = len(counted), y_all[counted]
        doc, lat, total = (docs.column(c).to_numpy() for c in ("doc_id", "latent", "sum"))
        sel = np.isfinite(y_all[doc])
        x, yx = total[sel] / self.doc_tokens[doc[sel]], y_all[doc[sel]]
        sx, sxx, sxy = (np.bincount(lat[sel], w, d) for w in (x, x * x, x * yx))
        sy, syy = y.sum(), (y * y).sum()
        den = np.sqrt(np.clip(n * sxx - sx * sx, 0, None) * max(n * syy - sy * sy, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (n * sxy - sx * sy) / np.where(den > 0, den, 1), np.nan)


def _merge_docs(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> pa.Table:
    """Per (document, latent): tokens fired on and sum; documents spanning shards are merged."""
    doc, lat, cnt, tot = (np.concatenate(c) for c in zip(*parts))
    key = np.stack([doc, lat])
    uk, inv = np.unique(key, axis=1, return_inverse=True)
    inv = inv.reshape(-1)
    return pa.table({"doc_id": pa.array(uk[0]), "latent": pa.array(uk[1].astype(np.int32)),
                     "count": pa.array(np.bincount(inv, cnt).astype(np.int64)), "sum": pa.array(np.bincount(inv, tot))})


def _labels(fstore: FeatureStore, label: str) -> np.ndarray:
    """Label per doc id as float (numeric, or 0/1 for two classes; NaN where missing)."""
    docs = fstore.docs()
    if label not in docs.column_names:
        raise ConfigError(f"label {label!r} is not a document field of this store (fields: "
                          f"{', '.join(c for c in docs.column_names if c not in ('doc_id', 'source', 'n_chars', 'n_tokens'))})")
    ids = docs.column("doc_id").to_numpy()
    vals = docs.column(label).to_pylist()
    present = sorted({v for v in vals if v is not None and not (isinstance(v, float) and np.isnan(v))},
                     key=lambda v: (str(type(v)), v))
    numeric = all(isinstance(v, (int, float, bool)) for v in present)
    if not numeric and len(present) != 2:
        raise ConfigError(f"label {label!r} has {len(present)} classes; correlation needs a numeric or two-class label")
    code = {v: float(i) for i, v in enumerate(present)} if not numeric else None
    out = np.full(int(ids.max()) + 1 if len(ids) else 0, np.nan)
    for i, v in zip(ids, vals):
        if v is not None and not (isinstance(v, float) and np.isnan(v)):
            out[int(i)] = code[v] if code else float(v)
    if np.isfinite(out).sum() < 2 or np.nanstd(out) == 0:
        raise AnalysisError(f"label {label!r} has fewer than two distinct labelled values")
    return out


def _provenance(fstore: FeatureStore, job: FeaturesJob) -> dict[str, Any]:
    from actstore.pipeline.analysis.results import version

    src = fstore.source
    return {"kind": "features", "store_url": src.get("store_url"),
            "store_manifest_sha256": src.get("store_manifest_sha256"), "feature_store": fstore.url,
            "job_type": "FeaturesJob", "job": job.public_dict(), "actstore_version": version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -------------------------------------------------------------------------------------------------- contexts


def contexts_table(fstore: FeatureStore, top: TopN, window: int) -> pa.Table:
    """One row per kept (latent, rank): where it fired and the text around it."""
    lat, rank = np.nonzero(top.row >= 0)
    rows, vals = top.row[lat, rank], top.value[lat, rank]
    n = len(rows)
    cols: dict[str, np.ndarray | list[Any]] = {"doc_id": np.zeros(n, np.int64), "seq_id": np.zeros(n, np.int64),
                                               "position": np.zeros(n, np.int32), "token_id": np.zeros(n, np.int32)}
    text: list[Any] = [None] * n
    span = np.full((n, 2), -1, np.int64)
    tok_text: list[Any] = [None] * n
    decode = _decoder(fstore)
    starts = np.array([s["token_start"] for s in fstore.shards] + [fstore.n_tokens])
    shard_of = np.searchsorted(starts, rows, side="right") - 1
    for i in np.unique(shard_of):
        sel = np.flatnonzero(shard_of == i)
        t = fstore.shard_tokens(int(i), ["token_id", "doc_id", "seq_id", "position"])
        local = rows[sel] - starts[i]
        for name in cols:
            cols[name][sel] = t.column(name).to_numpy()[local]
        if decode is not None:
            _windows(t, local, sel, window, decode, text, span, tok_text)
    return pa.table({"latent": pa.array(lat.astype(np.int32)), "rank": pa.array(rank.astype(np.int32)),
                     "row": pa.array(rows), **{k: pa.array(v) for k, v in cols.items()}, "value": pa.array(vals),
                     "token": pa.array(tok_text, pa.string()), "text": pa.array(text, pa.string()),
                     "highlight_start": pa.array(span[:, 0]), "highlight_end": pa.array(span[:, 1])})


def _windows(t: pa.Table, local: np.ndarray, sel: np.ndarray, window: int, decode: Any, text: list[Any],
             span: np.ndarray, tok_text: list[Any]) -> None:
    """Text of `window` tokens either side (within the sequence) and the token's character span in it."""
    ids, seq = t.column("token_id").to_numpy(), t.column("seq_id").to_numpy()
    bounds = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1], True])
    for j, r in zip(sel, local):
        s = np.searchsorted(bounds, r, side="right") - 1
        a, b = max(bounds[s], r - window), min(bounds[s + 1], r + window + 1)
        before, upto = decode(ids[a:r]), decode(ids[a:r + 1])
        text[j] = upto + decode(ids[r + 1:b]) if b > r + 1 else upto
        span[j] = (len(before), len(upto))
        tok_text[j] = decode(ids[r:r + 1])


def _decoder(fstore: FeatureStore) -> Any:
    """ids -> text with the source model's tokenizer (None when it cannot be loaded: contexts keep ids only)."""
    import logging

    src = fstore.source
    try:
        from actstore.workers.runner import load_tokenizer

        tok = load_tokenizer(str(src.get("model")), src.get("revision"))
    except Exception as e:  # noqa: BLE001  (no tokenizer: the contexts still name documents and positions)
        logging.getLogger("actstore").warning("feature contexts without text: %s", str(e).splitlines()[0][:200])
        return None
    return lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def check_features_job(job: FeaturesJob) -> FeatureStore:
    """Open the feature store and check the label and output before the pass."""
    from actstore.pipeline.analysis.results import check_writable

    fstore = open_features(job.store, job.storage_options)
    if job.label:
        _labels(fstore, job.label)
    check_writable(job.out or default_out(fstore), job.storage_options, "output")
    return fstore


def default_out(fstore: FeatureStore) -> str:
    return f"{fstore.url.rstrip('/')}/{layout.FEATURE_SUMMARY}"
