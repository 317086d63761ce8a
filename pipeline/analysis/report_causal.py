"""Report sections for the causal and feature analyses: the logit lens by layer and SAE feature pages.

Found in the results folder like the other results, and kept only when their provenance names the reported
store's manifest: `lens.json` (`actstore lens --out`) becomes a plot of loss, KL to the final layer and top-1
agreement per residual hook; `features-summary.json` (`actstore features`) becomes a feature page: the density
histogram of all latents, then, for the most frequent and the most label-correlated latents, their statistics
and top-activating contexts with the token highlighted. Every text is HTML-escaped.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import numpy as np

from actstore.pipeline.analysis.report_html import (
    ResultScan,
    esc,
    figure,
    fmt,
    note,
    pyplot,
    section,
    short_hook,
    table,
)

CONTEXTS_SHOWN = 3  # contexts per latent on a feature page


def scan(results_dir: str | None, manifest_sha256: str | None, storage_options: dict[str, Any] | None
         ) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
    """(lens results, feature summaries) under `results_dir`, as (path, parsed JSON), made from this store."""
    lens: list[tuple[str, dict[str, Any]]] = []
    feats: list[tuple[str, dict[str, Any]]] = []
    if results_dir is None:
        return lens, feats
    sc = ResultScan(str(results_dir), manifest_sha256, storage_options)
    if not sc.fs.isdir(sc.root):
        return lens, feats
    for d, files in sc.walk():
        for name in files:
            path = f"{d.rstrip('/')}/{name}"
            if fnmatch.fnmatch(name, "lens*.json"):
                data = sc.load(path)
                if isinstance(data, dict) and isinstance(data.get("rows"), list) and sc.ours(data.get("provenance")):
                    lens.append((path, data))
            elif name == "features-summary.json":
                data = sc.load(path)
                if isinstance(data, dict) and "latents" in data and sc.ours(data.get("provenance")):
                    feats.append((path, data))
    return lens, feats


def lens_section(found: list[tuple[str, dict[str, Any]]]) -> str:
    if not found:
        return ""
    plt = pyplot()
    parts = []
    for path, data in found:
        rows = data["rows"]
        labels = [short_hook(r["hook"]) for r in rows]
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(11, 3.4))
        x = np.arange(len(rows))
        a1.plot(x, [r["loss"] for r in rows], marker="o", color="#2c3e50", label="next-token loss")
        a1.plot(x, [r["entropy"] for r in rows], marker="^", color="#7f8c8d", label="entropy")
        a2.plot(x, [r["kl_to_final"] for r in rows], marker="s", color="#c0392b")
        a3.plot(x, [r["top1_agreement"] for r in rows], marker="o", color="#16a085")
        for ax, ylabel in ((a1, "nats"), (a2, "KL(final || layer), nats"), (a3, "top-1 agreement with final")):
            ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        a1.legend(fontsize=7)
        a3.set_ylim(-0.02, 1.02)
        fig.suptitle("Logit lens by layer", fontsize=10)
        fig.tight_layout()
        keys = ("loss", "top1_agreement", "kl_to_final", "entropy", "n_tokens")
        parts.append(figure(fig, "logit-lens", f"logit lens ({path})")
                     + table(["hook", *keys], [[r["hook"], *(r.get(k) for k in keys)] for r in rows], "lens-results"))
    return section("Logit lens", "".join(parts), "lens")


def features_section(found: list[tuple[str, dict[str, Any]]]) -> str:
    if not found:
        return ""
    pages = [_feature_page(i, path, data) for i, (path, data) in enumerate(found)]
    return section("SAE features", "".join(pages), "features")


def _feature_page(i: int, path: str, data: dict[str, Any]) -> str:
    dens = np.asarray(data.get("density") or [], np.float64)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    alive = dens[dens > 0]
    if alive.size:
        ax.hist(np.log10(alive), bins=40, color="#9bb7d4", edgecolor="white")
    ax.set_xlabel("log10 density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"{data.get('hook')}: {alive.size} of {dens.size} latents fire", fontsize=9)
    fig.tight_layout()
    head = (note(f"feature store {data.get('feature_store')} (d_sae={data.get('d_sae')}, k={data.get('k')}, "
                  f"{fmt(data.get('n_tokens'))} tokens)")
            + figure(fig, f"feature-density-{i}", f"latent density histogram ({path})"))
    ctx: dict[int, list[dict[str, Any]]] = {}
    for c in data.get("contexts", []):
        ctx.setdefault(int(c["latent"]), []).append(c)
    body = ""
    for key, title in (("most_frequent", "Most frequent latents"),
                       ("most_label_correlated", f"Latents most correlated with {data.get('label')!r}")):
        ids = (data.get("lists") or {}).get(key) or []
        if ids:
            body += f"<h3>{esc(title)}</h3>" + _latent_table(ids, data["latents"], ctx, f"features-{i}-{key}")
    return head + body


def _latent_table(ids: list[int], latents: dict[str, Any], ctx: dict[int, list[dict[str, Any]]], tid: str) -> str:
    cols = ("density", "mean_activation", "max_activation", "label_correlation")
    head = "".join(f"<th>{esc(h)}</th>" for h in ("latent", *cols, "top contexts"))
    rows = []
    for j in ids:
        stats = latents.get(str(j), {})
        shown = sorted(ctx.get(j, []), key=lambda c: c["rank"])[:CONTEXTS_SHOWN]
        texts = "<br>".join(_highlight(c) for c in shown)
        rows.append(f"<tr><td>{j}</td>" + "".join(f"<td>{esc(fmt(stats.get(k)))}</td>" for k in cols)
                    + f'<td style="text-align:left">{texts}</td></tr>')
    return (f'<div class="scroll"><table id="{esc(tid)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _highlight(c: dict[str, Any]) -> str:
    """The context's text with the token marked (or its ids when no text was decoded), and its value."""
    text, a, b = c.get("text"), c.get("highlight_start"), c.get("highlight_end")
    val = f' <span class="note">({fmt(c.get("value"))}, doc {c.get("doc_id")})</span>'
    if not isinstance(text, str) or a is None or b is None or a < 0:
        return esc(f"row {c.get('row')} token {c.get('token_id')}") + val
    return f"<code>{esc(text[:a])}<mark>{esc(text[a:b])}</mark>{esc(text[b:])}</code>{val}"


def causal_sections(results_dir: str | None, store: Any, storage_options: dict[str, Any] | None) -> str:
    """The lens and feature sections for `write_report` (empty when no such results exist)."""
    lens, feats = scan(results_dir, store.manifest_sha256, storage_options)
    return lens_section(lens) + features_section(feats)
