"""`actstore report`: one self-contained HTML page summarising a store and the analyses run on it.

The page holds, in order: a store summary (model, tokens, shards, per-hook shapes, dtypes and summary
statistics), spectra (correlation basis by default: eigenvalue histogram with the fitted bulk's and the null's
Marchenko–Pastur densities, a log-log scree plot with the null thresholds and the outliers, and the dimensions
that dominate the raw covariance; see `report_spectra`), layer curves from `layer_statistics` (norm growth, consecutive-layer cosine,
update norms, massive activations, MLP sparsity), and any SAE and probe results found in a results directory.

Self-contained means: every figure is a base64 PNG drawn with matplotlib's Agg backend and embedded in an
`<img>` with a stable id (`spectrum-<hook>`, `layer-norms`, `probe-auroc`, ...), styles are inline, and the page
references no external URL, so it can be mailed or archived as one file. Every text from the store or the
results is HTML-escaped.

Results directory (default: the store directory's parent, for local stores), scanned a few levels deep without
descending into stores (directories with a manifest.json):
- `spectrum*.json` as written by `save_spectrum` (`actstore spectra --out`): used instead of recomputing;
- SAEs: any directory with `cfg.json` and `metrics.json` (or an `actstore.json` holding train metrics);
- probes: any `probes*.json` holding a list of {hook, auroc, accuracy, f1, recall_at_1pct_fpr, ...};
- the logit lens (`lens.json`) and SAE feature pages (`features-summary.json`): see `report_causal`.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import numpy as np

from actstore.pipeline.analysis.report_html import (
    Results,
    ResultScan,
    esc,
    figure,
    hook_order,
    note,
    pyplot,
    section,
    short_hook,
    table,
)
from actstore.pipeline.analysis.report_series import add_series, series_section

MAX_SPECTRA = 8
_HOOK_STATS = ("mean_norm", "norm_p1", "norm_p50", "norm_p99", "max_abs", "mean_variance", "zero_fraction",
               "n_massive", "firing_rate_mean", "dead_neuron_fraction")
_SPECTRUM_KEYS = ("basis", "null", "n_samples", "d", "q", "n_outliers", "n_outliers_mp", "n_outliers_permutation",
                  "null_edge", "sigma2", "lambda_minus", "lambda_plus", "ks", "spectral_entropy", "effective_rank",
                  "participation_ratio", "alpha", "n_massive_dims")
_CLT_KEYS = ("fvu", "l0", "dead_fraction", "ce_loss_score", "kl_score")
_PROBE_KEYS = ("auroc", "accuracy", "f1", "recall_at_1pct_fpr", "recall_at_5pct_fpr", "n_docs")
_TOKEN_PROBE_KEYS = ("n_tokens", "doc_auroc", "doc_f1", "doc_recall_at_5pct_fpr")  # token probes add these
_SAE_FIRST = ("fvu", "ev_legacy", "ev_zero_centred", "l0", "dead_fraction", "dense_fraction", "cosine",
              "l2_ratio", "ce_score", "kl_score")


# --------------------------------------------------------------------------------------------------------------
# Finding results
# --------------------------------------------------------------------------------------------------------------


def scan_results(results_dir: str | os.PathLike | None, manifest_sha256: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> Results:
    """Spectra, SAE, probe and spectral-series results under `results_dir` (a folder or URL; empty when None or missing).

    With `manifest_sha256`, only results whose provenance names that store's manifest are kept."""
    if results_dir is None:
        return Results()
    scan = ResultScan(str(results_dir), manifest_sha256, storage_options)
    if not scan.fs.isdir(scan.root):
        return scan.res
    for d, files in scan.walk():
        for name in files:
            path = f"{d.rstrip('/')}/{name}"
            if fnmatch.fnmatch(name, "spectrum*.json"):
                _add_spectrum(scan, path, name)
            elif fnmatch.fnmatch(name, "probes*.json"):
                _add_probes(scan, path, name)
            elif name.endswith(".parquet"):
                add_series(scan, path)
        if "cfg.json" in files and "metrics.json" in files:
            _add_sae(scan, d)
        if "clt.json" in files and "metrics.json" in files:
            _add_clt(scan, d)
    if scan.res.other_stores:
        scan.res.notes.append(f"{scan.res.other_stores} result file(s) under {results_dir} were made from other "
                              "stores (or record no store) and are not shown")
    return scan.res


def _add_spectrum(scan: ResultScan, path: str, name: str) -> None:
    data = scan.load(path)
    if not isinstance(data, dict) or "eigenvalues" not in data or not isinstance(data.get("metrics"), dict):
        return
    if not scan.ours(data.get("provenance")):
        return
    hook = data.get("hook") or data["metrics"].get("hook") or name.removeprefix("spectrum-").removesuffix(".json")
    scan.res.spectra.setdefault(str(hook), (path, data))


def _add_probes(scan: ResultScan, path: str, name: str) -> None:
    data = scan.load(path)
    if data is None:
        return
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "hook" in r and "auroc" in r for r in rows):
        scan.res.notes.append(f"skipped {path}: not a list of probe results with hook and auroc")
        return
    if not scan.ours(data.get("provenance") if isinstance(data, dict) else None):
        return
    label = (data.get("label") if isinstance(data, dict) else None) or \
        name.removeprefix("probes").removesuffix(".json").lstrip("-_")
    scan.res.probes.append((str(label), path, rows))


def _add_sae(scan: ResultScan, d: str) -> None:
    cfg = scan.load(f"{d.rstrip('/')}/cfg.json")
    metrics = scan.load(f"{d.rstrip('/')}/metrics.json")
    if not isinstance(cfg, dict) or not isinstance(metrics, dict) or not scan.ours(metrics.get("provenance")):
        return
    scan.res.saes.append((d, cfg, _flatten({k: v for k, v in metrics.items() if k not in ("provenance", "hooks")})))


def _add_clt(scan: ResultScan, d: str) -> None:
    metrics = scan.load(f"{d.rstrip('/')}/metrics.json")
    if isinstance(metrics, dict) and scan.ours(metrics.get("provenance")):
        scan.res.clts.append((d, metrics))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar entries of a (one level nested) metrics dict, nested keys dotted."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flatten(v, f"{k}."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[prefix + str(k)] = v
    return out


# --------------------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


def summary_section(store: Any) -> str:
    m = store.manifest
    model = m.model
    facts = [["store", store.url], ["model", model.id if model else None],
             ["revision", (model.commit or model.revision) if model else None],
             ["tokenizer", m.tokenizer.name if m.tokenizer else None], ["tokens", m.n_tokens],
             ["sequences", m.n_sequences], ["documents", m.n_docs], ["shards", len(m.shards)],
             ["context length", m.context_length], ["packing", m.packing], ["schema version", m.schema_version],
             ["written by", f"actstore {m.created_by}"]]
    hooks = [[h.name, f"({m.n_tokens:,}, {h.d:,})", h.dtype, *(m.stats.get(h.name, {}).get(k) for k in _HOOK_STATS)]
             for h in m.hooks]
    return section("Store", table(["", "value"], facts, "store-summary")
                    + table(["hook", "shape", "dtype", *_HOOK_STATS], hooks, "hook-summary"), "summary")


def default_spectra_hooks(hooks: list[str], cap: int = MAX_SPECTRA) -> list[str]:
    """Every hook in layer order, or `cap` of them evenly spaced (first and last included)."""
    ordered = sorted(hooks, key=hook_order)
    if len(ordered) <= cap:
        return ordered
    return [ordered[i] for i in sorted({round(j * (len(ordered) - 1) / (cap - 1)) for j in range(cap)})]


def _spectrum_data(store: Any, hook: str, found: Results) -> tuple[np.ndarray, dict[str, Any], list, str]:
    """(eigenvalues, metrics, massive dimensions, source) from a saved spectrum, else computed (defaults)."""
    if hook in found.spectra:
        path, data = found.spectra[hook]
        eig = np.array([np.nan if v is None else v for v in data["eigenvalues"]], np.float64)
        metrics = {"basis": data.get("basis", "covariance"), "null": data.get("null", "mp"), **data["metrics"]}
        return eig, metrics, list(data.get("massive_dims") or []), path
    from actstore.pipeline.analysis.spectra import spectrum

    res = spectrum(store, hook)
    return np.asarray(res.eigenvalues, np.float64), res.metrics, res.massive_dims, "computed for this report"


def spectra_section(store: Any, hooks: list[str], found: Results) -> str:
    from actstore.pipeline.analysis.report_spectra import MASSIVE_HEADERS, massive_rows, spectrum_figure

    figs, rows, dims, notes = [], [], [], []
    for hook in hooks:
        try:
            eig, metrics, massive, source = _spectrum_data(store, hook, found)
        except (ValueError, KeyError, np.linalg.LinAlgError) as e:
            notes.append(f"{hook}: no spectrum ({type(e).__name__}: {e})")
            continue
        figs.append(figure(spectrum_figure(eig, metrics, hook, pyplot()), f"spectrum-{hook}",
                           f"{hook} {metrics.get('basis', 'covariance')} spectrum ({source})"))
        rows.append([hook, *(metrics.get(k) for k in _SPECTRUM_KEYS), source])
        dims += massive_rows(hook, massive)
    body = table(["hook", *_SPECTRUM_KEYS, "source"], rows, "spectra-summary")
    if dims:
        body += note("Dimensions that dominate the raw covariance (variance >= 10x the median): they set the "
                      "top of a covariance-basis spectrum, which is why the correlation basis is the default.")
        body += table(MASSIVE_HEADERS, dims, "spectra-massive-dims")
    body += "".join(figs)
    skipped = [h for h in store.hooks if h not in hooks]
    if skipped:
        notes.append(f"not shown (at most {MAX_SPECTRA} by default): {', '.join(skipped)}")
    return section("Spectra", body + "".join(note(n) for n in notes), "spectra")


def _line_figure(series: list[tuple[str, list[Any], str]], labels: list[str], ylabel: str, title: str,
                 logy: bool = False) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(labels))
    for name, ys, color in series:
        ax.plot(x, [np.nan if v is None else v for v in ys], marker="o", color=color, label=name)
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def layer_section(stats: dict[str, Any]) -> str:
    parts = []
    res, pairs, mlp, mas = stats["residual"], stats["consecutive"], stats["mlp"], stats["massive"]
    if res:
        parts.append(figure(_line_figure([("mean norm", [r["mean_norm"] for r in res], "#2c3e50")],
                                         [short_hook(r["hook"]) for r in res], "mean token L2 norm",
                                         "Residual norm growth"), "layer-norms", "mean token norm per residual hook"))
    if pairs:
        labels = [f"→{short_hook(p['to'])}" for p in pairs]
        parts.append(figure(_line_figure([("cosine", [p["mean_cosine"] for p in pairs], "#16a085")], labels,
                                         "mean cosine", "Cosine between consecutive layers (same token)"),
                            "layer-cosine", "mean cosine similarity of consecutive residual points"))
        parts.append(figure(_line_figure([("‖update‖", [p["mean_update_norm"] for p in pairs], "#8e44ad"),
                                          ("‖update‖ / ‖input‖", [p["mean_relative_update"] for p in pairs],
                                           "#d35400")], labels, "mean norm", "Block update norms"),
                            "layer-updates", "mean norm of each block's update to the residual stream"))
    if mas:
        parts.append(figure(_line_figure([("max |x|", [m["max_abs"] for m in mas], "#c0392b")],
                                         [short_hook(m["hook"]) for m in mas], "max |x|", "Largest activation",
                                         logy=True), "layer-massive", "largest |x| per residual hook"))
        parts.append(_massive_table(mas))
    if mlp:
        parts.append(figure(_line_figure([("fraction > 0", [r["fraction_positive"] for r in mlp], "#2980b9"),
                                          ("dead neurons", [r["dead_fraction"] for r in mlp], "#7f8c8d")],
                                         [short_hook(r["hook"]) for r in mlp], "fraction", "MLP activation sparsity"),
                            "mlp-sparsity", "fraction of MLP activations > 0 and of dead neurons per layer"))
    if not parts:
        parts.append(note("no residual or mlp.hook_post hooks in this store"))
    head = note(f"{stats['n_tokens']:,} tokens counted, {stats['n_excluded']:,} special tokens excluded")
    return section("Layer statistics", head + "".join(parts), "layers")


def _massive_table(mas: list[dict[str, Any]], per_hook: int = 3) -> str:
    rows = [[m["hook"], m["n_massive"], m["n_above_abs"], t["dim"], t["row"], t["token_id"], t["position"],
             t["value"], t["ratio_to_median"]] for m in mas for t in m["top"][:per_hook]]
    return table(["hook", "massive (all)", "|x|>100 (all)", "dim", "row", "token_id", "position", "value",
                  "|x| / token median"], rows, "massive-activations")


def sae_section(found: Results) -> str:
    if not found.saes:
        return ""
    keys = [k for k in _SAE_FIRST if any(k in m for _, _, m in found.saes)]
    keys += sorted({k for _, _, m in found.saes for k in m} - set(keys))
    rows = [[os.path.basename(d.rstrip(os.sep)), cfg.get("hook_name"), cfg.get("architecture"), cfg.get("d_in"),
             cfg.get("d_sae"), *(m.get(k) for k in keys)] for d, cfg, m in found.saes]
    return section("Sparse autoencoders", table(["SAE", "hook", "architecture", "d_in", "d_sae", *keys], rows,
                                                 "sae-results"), "saes")


def clt_section(found: Results) -> str:
    """Per cross-layer transcoder: its totals, and FVU and L0 layer by layer."""
    if not found.clts:
        return ""
    body = ""
    for i, (d, m) in enumerate(found.clts):
        name = os.path.basename(d.rstrip("/").rstrip(os.sep))
        layers = [f"L{layer}" for layer in m.get("layers") or range(len(m.get("fvu_per_layer") or []))]
        fig = _line_figure([("FVU", list(m.get("fvu_per_layer") or []), "C0")], layers, "held-out FVU",
                           f"{name}: FVU of each layer's MLP output")
        body += figure(fig, f"clt-{i}", f"{d}: reconstruction of each layer's MLP output")
        body += table(["CLT", *_CLT_KEYS], [[name, *(m.get(k) for k in _CLT_KEYS)]], f"clt-{i}-results")
        if m.get("l0_per_layer"):
            body += table(["", *layers], [["L0 (features active per token)", *m["l0_per_layer"]]], f"clt-{i}-l0")
    return section("Cross-layer transcoders", body, "clts")


def probe_section(found: Results) -> str:
    if not found.probes:
        return ""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    hooks = sorted({r["hook"] for _, _, rows in found.probes for r in rows}, key=hook_order)
    for i, (label, _, rows) in enumerate(found.probes):
        for key, style, name in (("auroc", "-", label), ("doc_auroc", "--", f"{label} (per document: max)")):
            by = {r["hook"]: r.get(key) for r in rows}
            if any(v is not None for v in by.values()):  # doc_auroc: token probes only
                ax.plot(range(len(hooks)), [by[h] if by.get(h) is not None else np.nan for h in hooks],
                        marker="o", ls=style, color=f"C{i % 10}", label=name)
    ax.set_xticks(range(len(hooks)), [short_hook(h) for h in hooks], rotation=45, ha="right", fontsize=7)
    ax.axhline(0.5, color="#999", ls=":", lw=1)
    ax.set_ylabel("test AUROC")
    ax.set_title("Probe AUROC by layer", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    keys = _PROBE_KEYS + tuple(k for k in _TOKEN_PROBE_KEYS if any(k in r for _, _, rs in found.probes for r in rs))
    cells = [[label, r["hook"], *(r.get(k) for k in keys)] for label, _, rs in found.probes
             for r in sorted(rs, key=lambda r: hook_order(r["hook"]))]
    body = figure(fig, "probe-auroc", "probe AUROC by hook (token probes: per token, and per document as the "
                  "max over its tokens)") + table(["label", "hook", *keys], cells, "probe-results")
    return section("Probes", body, "probes")


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 6px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto}
figure{margin:12px 0}img{max-width:100%}figcaption,.note{color:#666;font-size:12px}"""


def _store_dir_parent(store: Any) -> str | None:
    """The folder (or URL prefix) that holds the store: where results of a store are usually written."""
    url = str(store.url).rstrip("/")
    return url.rsplit("/", 1)[0] if "/" in url else "."


def write_report(store_url_or_store: Any, out_path: str | os.PathLike, results_dir: str | os.PathLike | None = None,
                 spectra_hooks: list[str] | None = None, layer_stats: dict[str, Any] | None = None,
                 title: str | None = None, storage_options: dict[str, Any] | None = None,
                 label: str | None = None) -> str:
    """Write the HTML report of a store (a Store or URL) to `out_path` (a path or fsspec URL); returns it.

    `results_dir` (default: the folder holding the store) is searched for results made from this store, matched
    by the store's manifest SHA-256; `spectra_hooks` defaults to every hook, at most 8 evenly spaced;
    `layer_stats` reuses a `layer_statistics` result instead of computing; `label` (a document field) colours the
    spectral series by class.
    """
    from actstore.pipeline.analysis.layer_stats import layer_statistics
    from actstore.pipeline.analysis.results import Output
    from actstore.pipeline.store.store import open_store

    store = open_store(str(store_url_or_store), storage_options) \
        if isinstance(store_url_or_store, (str, os.PathLike)) else store_url_or_store
    from actstore.pipeline.analysis.report_causal import causal_sections

    where = results_dir if results_dir is not None else _store_dir_parent(store)
    found = scan_results(where, store.manifest_sha256, storage_options or getattr(store, "_storage_options", None))
    hooks = list(spectra_hooks) if spectra_hooks is not None else default_spectra_hooks(store.hooks)
    stats = layer_stats if layer_stats is not None else layer_statistics(store)
    title = title or f"actstore report: {store.manifest.model.id if store.manifest.model else store.url}"
    body = (summary_section(store) + spectra_section(store, hooks, found) + layer_section(stats)
            + sae_section(found) + clt_section(found) + probe_section(found) + series_section(store, found.series, label)
            + causal_sections(None if where is None else str(where), store,
                              storage_options or getattr(store, "_storage_options", None))
            + "".join(note(n) for n in found.notes))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>\n")
    out = str(out_path).rstrip("/")
    folder, _, name = out.rpartition("/")
    # a reader never sees a half-written page: the write is atomic
    Output(folder or ".", storage_options).put_bytes(name, page.encode("utf-8"))
    return str(out_path)
