"""The report's spectrum panels: one figure per hook, legible on real (anisotropic, power-law) spectra.

Left: where the eigenvalues lie, on log-spaced bins when they span more than ~1.5 decades (real correlation
spectra run from ~1e-2 to ~1e2), as the fraction of eigenvalues per decade; the fitted bulk's Marchenko–Pastur
density and the null's MP density are drawn on the same per-decade scale, outliers (above the null's
threshold) in red. Right: the scree plot (rank vs eigenvalue, log-log) with the null's edge and threshold
(both nulls' when both were computed). The titles name the basis, the null and the outlier counts; the
dominant (massive) dimensions of the raw covariance go in a table below the figures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from actstore.workers.spectra import mp_density, mp_edges

_LOG_SPAN = 30.0  # max/min eigenvalue ratio above which the histogram uses a log axis
_ZERO = 1e-7  # eigenvalues below this fraction of the largest are numerical zeros (not drawn)
_BULK, _OUT, _NULL, _FIT = "#9bb7d4", "#c0392b", "#444444", "#1f6f8b"


def spectrum_title(metrics: dict[str, Any], hook: str) -> str:
    basis, null = metrics.get("basis") or "covariance", metrics.get("null") or "mp"
    counts = f"{int(metrics.get('n_outliers') or 0)} outliers of {metrics.get('d')} ({null} null)"
    other = "permutation" if null == "mp" else "mp"
    if metrics.get(f"n_outliers_{other}") is not None:
        counts += f", {int(metrics[f'n_outliers_{other}'])} ({other})"
    return f"{hook}: {basis} basis, {counts}"


def spectrum_figure(eig: np.ndarray, metrics: dict[str, Any], hook: str, plt: Any) -> Any:
    """The two panels of one hook's spectrum (see the module docstring)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    eig = np.sort(eig[np.isfinite(eig)])[::-1]
    # Numerical zeros (the direction a LayerNorm removes, d > n) would stretch a log axis over ten decades.
    pos = eig[eig > _ZERO * eig[0]] if eig.size and eig[0] > 0 else eig[:0]
    thr = metrics.get("outlier_threshold") or metrics.get("lambda_plus") or np.inf
    if pos.size:
        _histogram(ax, pos, metrics, thr)
        _scree(ax2, pos, metrics, thr)
    zeros = f"; {eig.size - pos.size} eigenvalue(s) ~0 not shown" if eig.size > pos.size else ""
    fig.suptitle(spectrum_title(metrics, hook) + zeros, fontsize=10)
    fig.tight_layout()
    return fig


def _histogram(ax: Any, pos: np.ndarray, metrics: dict[str, Any], thr: float) -> None:
    lo, hi = float(pos[-1]), float(pos[0])
    log = hi / lo > _LOG_SPAN
    n_bins = int(np.clip(pos.size // 4, 10, 60))
    bins = np.geomspace(lo, hi * 1.0001, n_bins + 1) if log else np.linspace(lo * 0.98, hi * 1.02, n_bins + 1)
    width = np.diff(np.log10(bins)) if log else np.diff(bins)
    top = 0.0
    for part, color, label in ((pos[pos <= thr], _BULK, "bulk"), (pos[pos > thr], _OUT, "outliers")):
        heights = np.histogram(part, bins)[0] / (pos.size * width)
        top = max(top, float(heights.max(initial=0.0)))
        ax.bar(bins[:-1], heights, width=np.diff(bins), align="edge", color=color, edgecolor="white",
               linewidth=0.3, label=f"{label} ({part.size})")
    q = metrics.get("q")
    for s2, color, style, name in ((metrics.get("sigma2"), _FIT, "-", "bulk MP fit"),
                                   (metrics.get("mp_sigma2", metrics.get("null_sigma2")), _NULL, "--", "MP null")):
        if s2 and q and math.isfinite(s2) and (name == "bulk MP fit" or metrics.get("basis") == "correlation"):
            a, b = mp_edges(s2, q)
            xs = np.geomspace(max(a, lo / 10, 1e-12), b, 300) if log else np.linspace(a, b, 300)
            ys = mp_density(xs, s2, q) * (xs * math.log(10) if log else 1.0)
            if name == "bulk MP fit":  # the fit describes the bulk's share of the eigenvalues only
                ys = ys * min(1.0, (metrics.get("n_bulk") or pos.size) / pos.size)
            ax.plot(xs, ys, color=color, ls=style, lw=1.5, label=f"{name} σ²={s2:.3g}")
    ax.axvline(thr, color=_OUT, ls=":", lw=1, label="outlier threshold")
    # An MP density over a small q is a narrow peak many times the histogram's height: clip it, keep the bars.
    ax.set_ylim(0, 1.5 * top if top > 0 else None)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("eigenvalue" + (" (log)" if log else ""))
    ax.set_ylabel("fraction per decade" if log else "density")
    ax.legend(fontsize=7)


def _scree(ax: Any, pos: np.ndarray, metrics: dict[str, Any], thr: float) -> None:
    ranks = np.arange(1, pos.size + 1)
    out = pos > thr
    ax.loglog(ranks[~out], pos[~out], ".", ms=3, color="#34495e", label="bulk")
    ax.loglog(ranks[out], pos[out], "o", ms=3.5, color=_OUT, label=f"outliers ({int(out.sum())})")
    for key, style, name in (("mp_threshold", "--", "MP null threshold"),
                             ("permutation_threshold", "-.", "permutation null threshold")):
        if metrics.get(key):
            ax.axhline(metrics[key], color=_NULL, ls=style, lw=1, label=f"{name} {metrics[key]:.3g}")
    if metrics.get("lambda_plus") and math.isfinite(metrics["lambda_plus"]):
        ax.axhline(metrics["lambda_plus"], color=_FIT, ls=":", lw=1, label=f"bulk fit λ+ {metrics['lambda_plus']:.3g}")
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=7)


def massive_rows(hook: str, dims: list[dict[str, Any]], per_hook: int = 5) -> list[list[Any]]:
    """Rows of the dominant-dimensions table: hook, dim, variance, x median, share of total variance, mean."""
    return [[hook, r.get("dim"), r.get("variance"), r.get("variance_ratio"), r.get("variance_share"), r.get("mean")]
            for r in dims[:per_hook]]


MASSIVE_HEADERS = ["hook", "dim", "variance", "x median variance", "share of total variance", "mean"]
