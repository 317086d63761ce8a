"""The report's building blocks: the scan of a results folder and the HTML pieces (tables, figures, sections).

Shared by the report's store, spectra and causal sections, which all render through these helpers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actstore.schemas import layout

SCAN_DEPTH = 4
SKIP_DIRS = {layout.SHARDS, layout.STATS, layout.ACTS, "__pycache__", "node_modules"}


@dataclass
class Results:
    """What a results folder holds for one store (paths are strings, contents already parsed)."""

    spectra: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # hook -> (path, json)
    saes: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # (dir, cfg, metrics)
    probes: list[tuple[str, str, list[dict[str, Any]]]] = field(default_factory=list)  # (label, path, rows)
    series: list[tuple[str, Any]] = field(default_factory=list)  # (path, spectral series pyarrow Table)
    clts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (dir, metrics) of cross-layer transcoders
    notes: list[str] = field(default_factory=list)
    other_stores: int = 0  # results made from other stores (or without provenance), left out


class ResultScan:
    """Reads result files under one folder or URL, keeping only those made from the store being reported."""

    def __init__(self, root: str, manifest_sha256: str | None, storage_options: dict[str, Any] | None) -> None:
        from actstore.workers import storage

        self.fs, self.root = storage.get_fs(root, storage_options)
        self.sha, self.res = manifest_sha256, Results()

    def load(self, path: str) -> Any:
        try:
            return json.loads(self.fs.cat_file(path))
        except (OSError, ValueError) as e:
            self.res.notes.append(f"skipped {path}: {type(e).__name__}: {e}")
            return None

    def ours(self, prov: Any) -> bool:
        """Whether a result's provenance names this store (by manifest hash, never by folder)."""
        if self.sha is None:
            return True
        if isinstance(prov, dict) and prov.get("store_manifest_sha256") == self.sha:
            return True
        self.res.other_stores += 1
        return False

    def walk(self) -> list[tuple[str, list[str]]]:
        """(folder, file names) a few levels deep, never inside a store."""
        out = []
        for d, dirs, files in self.fs.walk(self.root, maxdepth=SCAN_DEPTH, detail=False):
            names = sorted(files)
            if layout.MANIFEST in names:  # an actstore store: its shards are no results
                dirs.clear()
                continue
            dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
            out.append((d, names))
        return out


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


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import in a fresh process
    import matplotlib.pyplot as plt

    return plt


def section(title: str, body: str, sec_id: str) -> str:
    return f'<section id="{esc(sec_id)}"><h2>{esc(title)}</h2>{body}</section>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def short_hook(hook: str) -> str:
    return re.sub(r"^blocks\.(\d+)\.(hook_)?", r"L\1 ", hook).replace("resid_", "")


def hook_order(hook: str) -> tuple[int, int, str]:
    """Sort key: layer, then hook kind in block order; hooks outside blocks last."""
    from actstore.schemas.hooks import BLOCK_KINDS, parse_hook

    spec = parse_hook(hook)
    if spec.layer is None:
        return 10**9, 0, hook
    return spec.layer, BLOCK_KINDS.index(spec.kind), hook
