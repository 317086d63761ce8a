"""`actstore.train_probe` and the layer sweep: probes on one pooled vector per document, as Dask jobs.

Pooling streams the hook's chunks through `PoolAccumulator` (memory: documents x d), labels come from the
store's docs.parquet, and the split is by document (never by token), so no document is in two splits.
Documents whose label is null are dropped and counted; a label with more than two classes needs
`multiclass: true`. A sweep writes `probes-<label>.json` (one row per hook, with provenance) and each probe's
weights as safetensors (`probes-<label>/<hook>.safetensors`, classes and config in its metadata).
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from actstore.pipeline.analysis.pooling import doc_labels, label_column, pooled
from actstore.pipeline.analysis.results import Output, clean, provenance
from actstore.schemas.errors import AnalysisError, ConfigError
from actstore.schemas.jobs import ProbeJob
from actstore.workers.probe import ProbeResult, train_probe_arrays

log = logging.getLogger("actstore")
METRIC_KEYS = ("auroc", "accuracy", "f1", "recall_at_1pct_fpr", "recall_at_5pct_fpr")
DOC_METRIC_KEYS = tuple(f"doc_{k}" for k in METRIC_KEYS)  # token probes: per-document (max over tokens)


def check_labels(store: Any, job: ProbeJob) -> dict[str, Any]:
    """Refuse a label that cannot train this probe, before any activation is read; returns its class counts."""
    if job.pooling == "token":
        from actstore.pipeline.analysis.token_probes import check_span_labels

        return check_span_labels(store, job)
    _, y = label_column(store, job.label)
    present = [v for v in y if v is not None and not (isinstance(v, float) and np.isnan(v))]
    classes, counts = np.unique(np.array(present, dtype=object).astype(str), return_counts=True) if present \
        else (np.array([]), np.array([]))
    if len(classes) < 2:
        raise AnalysisError(f"label {job.label!r} has {len(classes)} class(es) among {len(present)} labelled "
                            f"documents; a probe needs at least two")
    if len(classes) > 2 and not job.probe.multiclass:
        shown = ", ".join(classes[:6].tolist()) + (", ..." if len(classes) > 6 else "")
        raise ConfigError(f"label {job.label!r} has {len(classes)} classes ({shown}); set multiclass: true "
                          "(--multiclass) for a multiclass probe, or give a two-class label")
    return {"class_counts": dict(zip(classes.tolist(), counts.tolist())), "n_dropped_null": len(y) - len(present)}


def fit(job: ProbeJob, hook: str | None, store: Any = None) -> ProbeResult:
    """Train and evaluate the job's probe on one hook (None: features that read no hook, e.g. uncertainty)."""
    store = store if store is not None and not isinstance(store, str) else _open(job)
    if job.pooling == "token":  # span labels: one row per labelled token
        from actstore.pipeline.analysis.token_probes import fit_tokens

        return fit_tokens(job, str(hook), store)
    counts = check_labels(store, job)
    extra: dict[str, Any] = {}
    if job.features and job.features.startswith("sae:"):  # SAE latents of a feature store (`actstore encode`)
        from actstore.pipeline.analysis.features import feature_store_for, pooled_features

        ids, x = pooled_features(feature_store_for(store, job.features, job.storage_options), job.pooling,
                                 job.exclude_special)
    elif job.features:  # uncertainty / spectral summaries, maybe with the pooled hook
        from actstore.pipeline.analysis.probe_inputs import features_matrix

        ids, x, extra = features_matrix(store, job, hook)
    else:
        ids, x = pooled(store, str(hook), job.pooling, job.exclude_special)
    y = doc_labels(store, job.label, ids)
    keep = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in y], bool)
    if (~keep).any():
        log.warning("label %r: %d of %d documents have no label and are left out", job.label, int((~keep).sum()),
                    len(keep))
    res = train_probe_arrays(x[keep], y[keep], ids[keep], job.probe)
    test_classes = np.unique(y[keep][np.isin(ids[keep], res.split["test"])].astype(str), return_counts=True)
    res.info.update({"hook": hook, "features": job.features, "label": job.label, "pooling": job.pooling,
                     "n_docs_labelled": int(keep.sum()),
                     "n_docs_dropped_null": int((~keep).sum()), "class_counts": counts["class_counts"],
                     "test_class_counts": dict(zip(*(a.tolist() for a in test_classes))),
                     "provenance": provenance(store, job, "probe"), **extra})
    return res


def _open(job: ProbeJob) -> Any:
    from actstore.pipeline.store.store import open_store

    return open_store(job.store, job.storage_options)


def train_probe(store: Any, hook: str | None = None, label: str | None = None, pooling: str = "mean",
                kind: str = "logistic", seed: int = 0, exclude_special: bool = True, features: str | None = None,
                **more: Any) -> ProbeResult:
    """Train a probe for `label` on `hook` (pooled per document) and evaluate it on held-out documents.

    `features="sae:URL"` probes the SAE latents of a feature store encoded from this store instead (the hook
    is then the feature store's). `features="uncertainty"` probes the output-uncertainty features
    (`actstore.uncertainty`; no hook needed), `"spectral"` the per-document summaries of the hook's spectral
    series (`actstore.spectral_series`), and `"uncertainty+hook"` (any +-join) their concatenation with the
    hook's pooled rows; every variant uses the same document split as the plain hook probe.
    `label="span:NAME", pooling="token"` trains on the token rows the label table NAME (`actstore label`)
    labels, split by document, and adds per-document metrics `doc_*` (max over a document's tokens vs any
    positive token) to `.metrics`.
    `store` is a Store, a URL, or a `ProbeJob` alone (then its first hook is used unless `hook` is given).
    Extra keyword arguments go to `ProbeConfig` (l2, hidden, epochs, fractions, multiclass, threads, ...),
    except `feature_rows`, `series_window` and `series_stride`, which are ProbeJob fields.
    Returns a ProbeResult (.metrics: auroc, accuracy, f1, recall_at_1pct_fpr, recall_at_5pct_fpr, ...; .info:
    hook, label, class counts, dropped documents, provenance). Raises ConfigError for an unknown label or a
    multiclass label without multiclass, AnalysisError when the data cannot train a probe.
    """
    from actstore.pipeline.analysis.probe_inputs import needs_hook

    if isinstance(store, ProbeJob):
        job = store
        if not needs_hook(job.features):
            return fit(job, None)
        return fit(job, hook or (job.hooks[0] if job.hooks else _open(job).hooks[0]))
    url = store if isinstance(store, str) else store.url
    if features and features.startswith("sae:") and hook is None:
        from actstore.pipeline.analysis.features import open_features, parse_features_ref

        hook = open_features(parse_features_ref(features)).hook
    job_keys: dict[str, Any] = {k: more.pop(k) for k in ("feature_rows", "series_window", "series_stride") if k in more}
    if hook is None and needs_hook(features):
        raise ConfigError(f"features {features or 'of a plain probe'!r} read a hook: give hook=")
    job = ProbeJob.build({"store": url, "label": label, "hooks": [hook] if hook else [], "pooling": pooling,
                          "exclude_special": exclude_special, "features": features, **job_keys,
                          "probe": {"kind": kind, "seed": seed, **more}})
    return fit(job, hook, store)


@dataclass
class ProbeSweep:
    """AUROC etc. per hook; `.table` rows are JSON-able dicts."""

    label: str
    table: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "rows": self.table, "provenance": self.provenance}

    def save(self, out: str, name: str | None = None, storage_options: dict[str, Any] | None = None) -> str:
        """Write the table (with provenance) as `name` (default probes-<label>.json) under the folder/URL `out`."""
        return Output(out, storage_options).put_json(name or f"probes-{file_label(self.label)}.json", self.to_json())

    def plot(self, out: str, name: str | None = None, storage_options: dict[str, Any] | None = None) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(len(self.table)), [r["auroc"] for r in self.table], marker="o")
        ax.set_xticks(range(len(self.table)), [r["hook"] for r in self.table], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("test AUROC")
        ax.set_title(f"probe for {self.label!r} by layer")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return Output(out, storage_options).put_bytes(name or f"probes-{file_label(self.label)}.png", buf.getvalue())


def file_label(label: str) -> str:
    """A label as it appears in result file names (`span:NAME` -> `span-NAME`: no colons in object keys)."""
    return label.replace(":", "-")


def save_weights(res: ProbeResult, out: Output, name: str) -> str:
    """The probe's parameters as safetensors; classes, config and provenance in the metadata (no pickle)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in res.model.state_dict().items()}
    meta = {"actstore": json.dumps(clean({"classes": res.classes.tolist(), "config": asdict(res.config),
                                          "info": res.info}))}
    return out.put_bytes(name, save(tensors, metadata=meta))


def _probe_task(job_data: dict[str, Any], hook: str | None) -> dict[str, Any]:
    from actstore.pipeline.analysis.dask_client import task_threads

    job = ProbeJob.model_validate(job_data)
    task_threads(job.probe.threads)
    res = fit(job, hook)
    if job.out:
        save_weights(res, Output(job.out, job.storage_options),
                     f"probes-{file_label(job.label)}/{hook or job.features}.safetensors")
    m = res.metrics
    token = {k: float(m.get(k, float("nan"))) for k in DOC_METRIC_KEYS} | {
        "n_tokens": int(res.info["n_tokens_labelled"])} if job.pooling == "token" else {}
    return {"hook": hook or job.features, **{k: float(m.get(k, float("nan"))) for k in METRIC_KEYS}, **token,
            **{f"{k}_reliable": m.get(f"{k}_reliable") for k in METRIC_KEYS[3:]},
            "n_docs": int(res.info["n_docs_labelled"]), "n_docs_dropped_null": res.info["n_docs_dropped_null"],
            "n_test_docs": int(m.get("n_docs", 0)), "test_class_counts": res.info["test_class_counts"],
            "pooling": job.pooling, "kind": job.probe.kind}


def _layer_key(hook: str) -> tuple:
    m = re.match(r"blocks\.(\d+)\.(.*)", hook)
    return (int(m.group(1)), m.group(2)) if m else (10**9, hook)


def probe_sweep(store: Any, label: str | None = None, hooks: list[str] | None = None, pooling: str = "mean",
                kind: str = "logistic", seed: int = 0, **more: Any) -> ProbeSweep:
    """One Dask task per hook (every stored hook by default), ordered by layer; `store` may be a ProbeJob."""
    import dask

    from actstore.pipeline.analysis.probe_inputs import needs_hook

    if isinstance(store, ProbeJob):
        job, opened = store, _open(store)
    else:
        opened = store
        job = ProbeJob.build({"store": store.url, "label": label, "hooks": hooks or [], "pooling": pooling,
                              "probe": {"kind": kind, "seed": seed, **more}})
    counts = check_labels(opened, job)
    for h in job.hooks:
        opened.manifest.hook(h)
    names: list[str | None] = [*sorted(job.hooks or opened.hooks, key=_layer_key)]
    if job.features and job.features.startswith("sae:"):  # one probe, on the feature store's latents
        from actstore.pipeline.analysis.features import feature_store_for

        names = [feature_store_for(opened, job.features, job.storage_options).hook]
    elif not needs_hook(job.features):  # output-only features: one probe, whatever the hooks
        names = [None]
    tasks = [dask.delayed(_probe_task)(job.model_dump(), h) for h in names]
    sweep = ProbeSweep(job.label, list(dask.compute(*tasks)), provenance(opened, job, "probe_sweep"))
    sweep.provenance.update(counts)
    return sweep
