"""Spectral series: one window's descriptors through the (n, n) Gram matrix vs the (d, d) correlation matrix.

`actstore.spectral_series` describes windows of a few consecutive tokens (EigenTrack uses tens) of hooks hundreds
to thousands wide, so each window's (d, d) matrix has rank < n. Variants per round, on the same windows of
n = 16 rows of d = 768 Gaussian values with one planted spike (a GPT-2-small residual width):

- full: `accumulated_descriptors` (covariance accumulator, correlation matrix, (d, d) eigendecomposition, MP
  null, bulk fit: what `windowed` monitoring runs per window);
- gram: `window_descriptors` (the (n, n) Gram route it takes for n < d).

Each cell is the per-round throughput ratio gram / full (windows per second). The two give the same numbers
(tests/analysis/test_spectral_series.py checks every descriptor to 1e-7).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.common import Ctx, best_ratio, fmt_ratio, fmt_x, interleave, md_table, median_of, per_round

NAME = "spectral_series"
TITLE = "10. Spectral series: a window's descriptors via its Gram matrix vs the full correlation matrix"
WINDOW, D = 16, 768


def _windows(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        x = rng.standard_normal((WINDOW, D))
        out.append(x + 3 * rng.standard_normal((WINDOW, 1)) * rng.standard_normal(D))
    return out


def run(ctx: Ctx) -> dict[str, Any]:
    from actstore.workers.covariance import CovarianceAccumulator
    from actstore.workers.spectra import accumulated_descriptors, window_descriptors

    windows = _windows(2 if ctx.quick else 4)

    def timed(fn: Any) -> dict[str, Any]:
        start = time.perf_counter()
        for w in windows:
            fn(w)
        s = time.perf_counter() - start
        return {"s": s, "windows_per_s": len(windows) / s}

    variants = [
        ("full", lambda: timed(lambda w: accumulated_descriptors(CovarianceAccumulator(D).update(w), 4.0,
                                                                 "correlation"))),
        ("gram", lambda: timed(window_descriptors)),
    ]
    results = interleave(variants, ctx.rounds, ctx.extra.get("meter"), warmup=True)
    rate = lambda r: r["windows_per_s"]  # noqa: E731
    return {"window": WINDOW, "d": D, "n_windows": len(windows), "results": results,
            "ratio": per_round(results, "gram", "full", rate), "best": best_ratio(results, "gram", "full", rate)}


def render(result: dict[str, Any]) -> str:
    res = result["results"]
    rows = [[f"{result['window']} x {result['d']}", f"{median_of(res['full'], 'windows_per_s'):.3g}",
             f"{median_of(res['gram'], 'windows_per_s'):.3g}", fmt_ratio(result["ratio"]), fmt_x(result["best"])]]
    return ("Windows per second (median over rounds) and gram / full throughput (> 1 = the Gram route is "
            f"faster), {result['n_windows']} windows per round:\n\n"
            + md_table(["window rows x d", "full (windows/s)", "gram (windows/s)", "gram / full", "best/best"], rows))


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(f"spectral-series window ({result['window']} x {result['d']}): Gram vs full matrix",
             fmt_ratio(result["ratio"]), "—", "—")]
