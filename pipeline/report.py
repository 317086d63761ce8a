"""`actstore report`: one self-contained HTML page summarising a store and the analyses run on it.

The page holds, in order: a store summary (model, tokens, shards, per-hook shapes, dtypes and summary
statistics), covariance spectra (eigenvalue histogram with the Marchenko–Pastur density and λ± marked, plus a
scree plot with the outliers), layer curves from `layer_statistics` (norm growth, consecutive-layer cosine,
update norms, massive activations, MLP sparsity), and any SAE and probe results found in a results directory.

Self-contained means: every figure is a base64 PNG drawn with matplotlib's Agg backend and embedded in an
`<img>` with a stable id (`spectrum-<hook>`, `layer-norms`, `probe-auroc`, ...), styles are inline, and the page
references no external URL, so it can be mailed or archived as one file. Every text from the store or the
results is HTML-escaped.

Results directory (default: the store directory's parent, for local stores), scanned a few levels deep without
descending into stores (directories with a manifest.json):
- `spectrum*.json` as written by `save_spectrum` (`actstore spectra --out`): used instead of recomputing;
- SAEs: any directory with `cfg.json` and `metrics.json` (or an `actstore.json` holding train metrics);
- probes: any `probes*.json` holding a list of {hook, auroc, accuracy, f1, recall_at_1pct_fpr, ...}.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_SPECTRA = 8
_SCAN_DEPTH = 4
_SKIP_DIRS = {"shards", "stats", "acts.zarr", "__pycache__", "node_modules"}
_HOOK_STATS = ("mean_norm", "norm_p1", "norm_p50", "norm_p99", "max_abs", "mean_variance", "zero_fraction",
               "n_massive", "firing_rate_mean", "dead_neuron_fraction")
_SPECTRUM_KEYS = ("n_samples", "d", "q", "sigma2", "lambda_minus", "lambda_plus", "n_outliers", "ks",
                  "spectral_entropy", "effective_rank", "participation_ratio", "alpha")
_PROBE_KEYS = ("auroc", "accuracy", "f1", "recall_at_1pct_fpr", "recall_at_5pct_fpr", "n_docs")
_SAE_FIRST = ("fvu", "ev_legacy", "ev_zero_centred", "l0", "dead_fraction", "dense_fraction", "cosine",
              "l2_ratio", "ce_score", "kl_score")


# --------------------------------------------------------------------------------------------------------------
# Finding results
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    """What a results directory holds (paths are strings, contents already parsed)."""

    spectra: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # hook -> (path, json)
    saes: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # (dir, cfg, metrics)
    probes: list[tuple[str, str, list[dict[str, Any]]]] = field(default_factory=list)  # (label, path, rows)
    notes: list[str] = field(default_factory=list)


def _load_json(path: str, notes: list[str]) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        notes.append(f"skipped {path}: {type(e).__name__}: {e}")
        return None


def _walk(root: str) -> list[tuple[str, list[str]]]:
    """(directory, file names) a few levels deep, never inside a store."""
    out = []
    base = root.rstrip(os.sep).count(os.sep)
    for d, dirs, files in os.walk(root):
        if "manifest.json" in files:  # an actstore store: its shards are no results
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        if d.count(os.sep) - base >= _SCAN_DEPTH:
            dirs[:] = []
        out.append((d, sorted(files)))
    return out


def scan_results(results_dir: str | os.PathLike | None) -> Results:
    """Spectra, SAE and probe results under `results_dir` (empty when it is None or missing)."""
    res = Results()
    if results_dir is None or not os.path.isdir(results_dir):
        return res
    for d, files in _walk(str(results_dir)):
        for name in files:
            path = os.path.join(d, name)
            if fnmatch.fnmatch(name, "spectrum*.json"):
                _add_spectrum(res, path, name)
            elif fnmatch.fnmatch(name, "probes*.json"):
                _add_probes(res, path, name)
        if "cfg.json" in files and ("metrics.json" in files or "actstore.json" in files):
            _add_sae(res, d, files)
    return res


def _add_spectrum(res: Results, path: str, name: str) -> None:
    data = _load_json(path, res.notes)
    if not isinstance(data, dict) or "eigenvalues" not in data or not isinstance(data.get("metrics"), dict):
        return
    hook = data["metrics"].get("hook") or name.removeprefix("spectrum-").removesuffix(".json")
    res.spectra.setdefault(str(hook), (path, data))


def _add_probes(res: Results, path: str, name: str) -> None:
    rows = _load_json(path, res.notes)
    if rows is None:
        return
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "hook" in r and "auroc" in r for r in rows):
        res.notes.append(f"skipped {path}: not a list of probe results with hook and auroc")
        return
    label = name.removeprefix("probes").removesuffix(".json").lstrip("-_") or Path(path).parent.name
    res.probes.append((label, path, rows))


def _add_sae(res: Results, d: str, files: list[str]) -> None:
    cfg = _load_json(os.path.join(d, "cfg.json"), res.notes)
    if "metrics.json" in files:
        metrics = _load_json(os.path.join(d, "metrics.json"), res.notes)
    else:  # saved by TrainResult.save: the train metrics live in actstore.json
        meta = _load_json(os.path.join(d, "actstore.json"), res.notes) or {}
        metrics = (meta.get("metadata") or {}).get("train_metrics") if isinstance(meta, dict) else None
    if isinstance(cfg, dict) and isinstance(metrics, dict):
        res.saes.append((d, cfg, _flatten(metrics)))


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
# HTML helpers
# --------------------------------------------------------------------------------------------------------------


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any) -> str:
    """A table cell's text: thousands separators for ints, 4 significant digits for floats."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}" if math.isfinite(v) else str(float(v))
    return str(v)


def table(headers: list[str], rows: list[list[Any]], table_id: str) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def figure(fig: Any, fig_id: str, caption: str) -> str:
    """Render a matplotlib figure to an embedded PNG `<img>` (and close it)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img id="{esc(fig_id)}" alt="{esc(fig_id)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import in a fresh process
    import matplotlib.pyplot as plt

    return plt


def _section(title: str, body: str, sec_id: str) -> str:
    return f'<section id="{esc(sec_id)}"><h2>{esc(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


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
    return _section("Store", table(["", "value"], facts, "store-summary")
                    + table(["hook", "shape", "dtype", *_HOOK_STATS], hooks, "hook-summary"), "summary")


def _hook_key(hook: str) -> tuple[int, int, str]:
    from actstore.schemas.hooks import BLOCK_KINDS, parse_hook

    spec = parse_hook(hook)
    if spec.layer is None:
        return 10**9, 0, hook
    return spec.layer, BLOCK_KINDS.index(spec.kind), hook


def default_spectra_hooks(hooks: list[str], cap: int = MAX_SPECTRA) -> list[str]:
    """Every hook in layer order, or `cap` of them evenly spaced (first and last included)."""
    ordered = sorted(hooks, key=_hook_key)
    if len(ordered) <= cap:
        return ordered
    return [ordered[i] for i in sorted({round(j * (len(ordered) - 1) / (cap - 1)) for j in range(cap)})]


def _spectrum_data(store: Any, hook: str, found: Results) -> tuple[np.ndarray, dict[str, Any], str]:
    if hook in found.spectra:
        path, data = found.spectra[hook]
        eig = np.array([np.nan if v is None else v for v in data["eigenvalues"]], np.float64)
        return eig, data["metrics"], path
    from actstore.pipeline.spectra import spectrum

    res = spectrum(store, hook)
    return np.asarray(res.eigenvalues, np.float64), res.metrics, "computed for this report"


def spectrum_figure(eig: np.ndarray, metrics: dict[str, Any], hook: str) -> Any:
    """Left: bulk histogram with the MP density and λ±; right: scree plot with λ+ and the outlier threshold."""
    from actstore.workers.spectra import mp_density

    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    s2, q = metrics.get("sigma2"), metrics.get("q")
    lo, hi = metrics.get("lambda_minus"), metrics.get("lambda_plus")
    eig = eig[np.isfinite(eig)]
    top = hi * 1.3 if hi and hi > 0 else float(eig.max(initial=1.0))
    # Zoom on the bulk; with q > 1 the (1 - 1/q) d zero eigenvalues stay in view at 0.
    left = max(0.0, lo - 0.3 * (hi - lo)) if hi and lo is not None and q and q < 1 else 0.0
    shown = eig[(eig >= left) & (eig <= top)]
    bins = np.linspace(left, top, max(10, min(60, eig.size // 3)) + 1)
    counts, _ = np.histogram(shown, bins)
    # Heights in "fraction of eigenvalues per unit", the normalisation of mp_density (integral min(1, 1/q)).
    ax.bar(bins[:-1], counts / (max(eig.size, 1) * np.diff(bins)), width=np.diff(bins), align="edge",
           color="#9bb7d4", edgecolor="white", label="eigenvalues")
    if s2 and q:
        xs = np.linspace(max(lo, 1e-12), hi, 400)
        ax.plot(xs, mp_density(xs, s2, q), color="#c0392b", lw=2, label=f"MP σ²={s2:.3g}, q={q:.3g}")
        for edge, name in ((lo, "λ−"), (hi, "λ+")):
            ax.axvline(edge, color="#444", ls="--", lw=1)
            ax.text(edge, ax.get_ylim()[1] * 0.92, f" {name}", fontsize=8)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"{hook}: {int(metrics.get('n_outliers') or 0)} outlier(s) beyond the axis", fontsize=9)
    ax.legend(fontsize=7)
    _scree(ax2, eig, metrics)
    fig.tight_layout()
    return fig


def _scree(ax: Any, eig: np.ndarray, metrics: dict[str, Any]) -> None:
    pos = eig[eig > 0]
    ranks = np.arange(1, pos.size + 1)
    thr = metrics.get("outlier_threshold") or metrics.get("lambda_plus") or np.inf
    out = pos > thr
    ax.semilogy(ranks[~out], pos[~out], ".", ms=3, color="#34495e", label="bulk")
    ax.semilogy(ranks[out], pos[out], "o", ms=5, color="#c0392b", label="outliers")
    if metrics.get("lambda_plus"):
        ax.axhline(metrics["lambda_plus"], color="#444", ls="--", lw=1, label="λ+")
    if metrics.get("outlier_threshold"):
        ax.axhline(metrics["outlier_threshold"], color="#c0392b", ls=":", lw=1, label="λ+ + TW margin")
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=7)


def spectra_section(store: Any, hooks: list[str], found: Results) -> str:
    figs, rows, notes = [], [], []
    for hook in hooks:
        try:
            eig, metrics, source = _spectrum_data(store, hook, found)
        except (ValueError, KeyError, np.linalg.LinAlgError) as e:
            notes.append(f"{hook}: no spectrum ({type(e).__name__}: {e})")
            continue
        figs.append(figure(spectrum_figure(eig, metrics, hook), f"spectrum-{hook}",
                           f"{hook} covariance spectrum ({source})"))
        rows.append([hook, *(metrics.get(k) for k in _SPECTRUM_KEYS), source])
    body = table(["hook", *_SPECTRUM_KEYS, "source"], rows, "spectra-summary") + "".join(figs)
    skipped = [h for h in store.hooks if h not in hooks]
    if skipped:
        notes.append(f"not shown (at most {MAX_SPECTRA} by default): {', '.join(skipped)}")
    return _section("Covariance spectra", body + "".join(_note(n) for n in notes), "spectra")


def _short(hook: str) -> str:
    return re.sub(r"^blocks\.(\d+)\.(hook_)?", r"L\1 ", hook).replace("resid_", "")


def _line_figure(series: list[tuple[str, list[Any], str]], labels: list[str], ylabel: str, title: str,
                 logy: bool = False) -> Any:
    plt = _pyplot()
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
                                         [_short(r["hook"]) for r in res], "mean token L2 norm",
                                         "Residual norm growth"), "layer-norms", "mean token norm per residual hook"))
    if pairs:
        labels = [f"→{_short(p['to'])}" for p in pairs]
        parts.append(figure(_line_figure([("cosine", [p["mean_cosine"] for p in pairs], "#16a085")], labels,
                                         "mean cosine", "Cosine between consecutive layers (same token)"),
                            "layer-cosine", "mean cosine similarity of consecutive residual points"))
        parts.append(figure(_line_figure([("‖update‖", [p["mean_update_norm"] for p in pairs], "#8e44ad"),
                                          ("‖update‖ / ‖input‖", [p["mean_relative_update"] for p in pairs],
                                           "#d35400")], labels, "mean norm", "Block update norms"),
                            "layer-updates", "mean norm of each block's update to the residual stream"))
    if mas:
        parts.append(figure(_line_figure([("max |x|", [m["max_abs"] for m in mas], "#c0392b")],
                                         [_short(m["hook"]) for m in mas], "max |x|", "Largest activation",
                                         logy=True), "layer-massive", "largest |x| per residual hook"))
        parts.append(_massive_table(mas))
    if mlp:
        parts.append(figure(_line_figure([("fraction > 0", [r["fraction_positive"] for r in mlp], "#2980b9"),
                                          ("dead neurons", [r["dead_fraction"] for r in mlp], "#7f8c8d")],
                                         [_short(r["hook"]) for r in mlp], "fraction", "MLP activation sparsity"),
                            "mlp-sparsity", "fraction of MLP activations > 0 and of dead neurons per layer"))
    if not parts:
        parts.append(_note("no residual or mlp.hook_post hooks in this store"))
    head = _note(f"{stats['n_tokens']:,} tokens counted, {stats['n_excluded']:,} special tokens excluded")
    return _section("Layer statistics", head + "".join(parts), "layers")


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
    return _section("Sparse autoencoders", table(["SAE", "hook", "architecture", "d_in", "d_sae", *keys], rows,
                                                 "sae-results"), "saes")


def probe_section(found: Results) -> str:
    if not found.probes:
        return ""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    hooks = sorted({r["hook"] for _, _, rows in found.probes for r in rows}, key=_hook_key)
    for label, _, rows in found.probes:
        by = {r["hook"]: r["auroc"] for r in rows}
        ax.plot(range(len(hooks)), [by[h] if by.get(h) is not None else np.nan for h in hooks],
                marker="o", label=label)
    ax.set_xticks(range(len(hooks)), [_short(h) for h in hooks], rotation=45, ha="right", fontsize=7)
    ax.axhline(0.5, color="#999", ls=":", lw=1)
    ax.set_ylabel("test AUROC")
    ax.set_title("Probe AUROC by layer", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    rows = [[label, r["hook"], *(r.get(k) for k in _PROBE_KEYS)] for label, _, rs in found.probes
            for r in sorted(rs, key=lambda r: _hook_key(r["hook"]))]
    body = figure(fig, "probe-auroc", "probe AUROC by hook") + table(["label", "hook", *_PROBE_KEYS], rows,
                                                                       "probe-results")
    return _section("Probes", body, "probes")


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 6px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto}
figure{margin:12px 0}img{max-width:100%}figcaption,.note{color:#666;font-size:12px}"""


def _store_dir_parent(store: Any) -> str | None:
    protocol = getattr(store.fs, "protocol", "file")
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    if "file" not in protocols and "local" not in protocols:
        return None
    return str(Path(store.root).resolve().parent)


def write_report(store_url_or_store: Any, out_path: str | os.PathLike, results_dir: str | os.PathLike | None = None,
                 spectra_hooks: list[str] | None = None, layer_stats: dict[str, Any] | None = None,
                 title: str | None = None) -> str:
    """Write the HTML report of a store (a Store or URL) to `out_path`; returns the path written.

    `results_dir` defaults to the store directory's parent (local stores only); `spectra_hooks` defaults to
    every hook, at most 8 evenly spaced; `layer_stats` reuses a `layer_statistics` result instead of computing.
    """
    from actstore.pipeline.layerstats import layer_statistics
    from actstore.pipeline.store import open_store

    store = open_store(str(store_url_or_store)) if isinstance(store_url_or_store, (str, os.PathLike)) \
        else store_url_or_store
    found = scan_results(results_dir if results_dir is not None else _store_dir_parent(store))
    hooks = list(spectra_hooks) if spectra_hooks is not None else default_spectra_hooks(store.hooks)
    stats = layer_stats if layer_stats is not None else layer_statistics(store)
    title = title or f"actstore report: {store.manifest.model.id if store.manifest.model else store.url}"
    body = (summary_section(store) + spectra_section(store, hooks, found) + layer_section(stats)
            + sae_section(found) + probe_section(found) + "".join(_note(n) for n in found.notes))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>\n")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # a reader never sees a half-written page
    return str(out)
