"""Covariance spectrum: `actstore.spectrum` on a stored float16 hook vs numpy `X.T @ X` in float32 in memory.

Data: n x 768 float16 activations (quick n = 50,000; full n = 200,000) with a non-zero mean (an offset of ~3 on
every dimension, as real residual streams have), decaying per-dimension scales and 5 planted spikes, written with
`from_arrays` (float16, default shards and chunks, page-cached). Variants per round:

- numpy: `X32.T @ X32` on the same values held in memory as float32 (the baseline the issue names; it is not
  even centred, so it does less than a covariance);
- actstore covariance: `actstore.pipeline.spectra.covariance` (read, decode, shift, float64 `XᵀX`, merge);
- actstore spectrum: `actstore.spectrum` (the above plus eigendecomposition, MP fit, outliers, metrics).

Accuracy: eigenvalues against a float64 numpy reference of the same float16 values (two-pass: mean, then
centred float64 products): max |Δλ|/λ over all eigenvalues and max |Δλ|/λ_max. The numpy float32 covariance
(E[xxᵀ] − μμᵀ from the float32 product) is shown for contrast.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.common import (
    Ctx,
    Variant,
    best_ratio,
    fmt_ratio,
    fmt_x,
    goal_status,
    interleave,
    log,
    md_table,
    median_of,
    per_round,
)

NAME = "spectra"
TITLE = "7. Covariance and spectrum vs numpy"
HOOK = "blocks.0.hook_resid_post"
D = 768


def make_data(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = (1.0 / np.sqrt(1 + np.arange(D) / 50)).astype(np.float32)
    x = np.empty((n, D), np.float16)
    spikes = rng.standard_normal((5, D)).astype(np.float32)
    spikes /= np.linalg.norm(spikes, axis=1, keepdims=True)
    mean = 3.0 + rng.standard_normal(D).astype(np.float32)
    for s in range(0, n, 16384):
        m = min(16384, n - s)
        z = rng.standard_normal((m, D), dtype=np.float32) * scales
        z += (rng.standard_normal((m, 5), dtype=np.float32) * np.array([8, 6, 5, 4, 3], np.float32)) @ spikes
        x[s:s + m] = (z + mean).astype(np.float16)
    return x


def reference_eigs(x16: np.ndarray) -> np.ndarray:
    """Descending eigenvalues of the float64 covariance (two-pass, blockwise to bound memory)."""
    n = x16.shape[0]
    mean = np.zeros(D)
    for s in range(0, n, 16384):
        mean += x16[s:s + 16384].astype(np.float64).sum(0)
    mean /= n
    cov = np.zeros((D, D))
    for s in range(0, n, 16384):
        y = x16[s:s + 16384].astype(np.float64) - mean
        cov += y.T @ y
    return np.linalg.eigvalsh(cov / (n - 1))[::-1]


def errors(eigs: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = np.abs(np.asarray(eigs) - ref)
    return {"max_rel": float(np.max(diff / np.abs(ref))), "max_rel_to_top": float(diff.max() / ref[0])}


def run(ctx: Ctx) -> dict[str, Any]:
    import actstore
    from actstore.pipeline.spectra import covariance

    n = 50_000 if ctx.quick else 200_000
    x16 = make_data(n)
    store = actstore.from_arrays({HOOK: x16}, str(ctx.tmp / "store"), dtype="float16")
    x32 = x16.astype(np.float32)
    log(f"spectra: {n} x {D} float16 ({x16.nbytes / 1e6:.0f} MB stored); float64 reference")
    ref = reference_eigs(x16)
    last: dict[str, Any] = {}

    def numpy_xtx() -> dict[str, Any]:
        t0 = time.perf_counter()
        g = x32.T @ x32
        dt = time.perf_counter() - t0
        last["g"] = g
        return {"s": dt}

    def ours_cov() -> dict[str, Any]:
        t0 = time.perf_counter()
        covariance(store, HOOK)
        return {"s": time.perf_counter() - t0}

    def ours_spectrum() -> dict[str, Any]:
        t0 = time.perf_counter()
        r = actstore.spectrum(store, HOOK)
        dt = time.perf_counter() - t0
        last["eigs"] = r.eigenvalues
        return {"s": dt, **errors(r.eigenvalues, ref)}

    def ours_spectrum32() -> dict[str, Any]:
        t0 = time.perf_counter()
        r = actstore.spectrum(store, HOOK, precision="float32")
        dt = time.perf_counter() - t0
        last["eigs32"] = r.eigenvalues
        return {"s": dt}

    variants: list[Variant] = [("numpy_float32_xtx", numpy_xtx), ("actstore_covariance", ours_cov),
                               ("actstore_spectrum", ours_spectrum), ("actstore_spectrum_float32", ours_spectrum32)]
    for _, fn in variants:
        fn()  # warm-up: page cache, BLAS threads, dask
    res = interleave(variants, ctx.rounds, ctx.extra.get("meter"))
    mu = x32.astype(np.float64).mean(0)
    cov32 = (last["g"] / n - np.outer(mu, mu).astype(np.float32)) * (n / (n - 1))
    np32 = errors(np.linalg.eigvalsh(cov32.astype(np.float64))[::-1], ref)
    rate = lambda r: 1.0 / r["s"]  # noqa: E731
    rows = []
    for name in ("actstore_covariance", "actstore_spectrum", "actstore_spectrum_float32"):
        rows.append({"name": name, "s": median_of(res[name], "s"), "base_s": median_of(res["numpy_float32_xtx"], "s"),
                     "ratio": per_round(res, name, "numpy_float32_xtx", rate),
                     "best": best_ratio(res, name, "numpy_float32_xtx", rate),
                     "other": median_of(res[name] + res["numpy_float32_xtx"], "other_share")})
    return {"n": n, "d": D, "raw": res, "rows": rows, "err_ours": errors(last["eigs"], ref), "err_numpy32": np32,
            "err_ours32": errors(last["eigs32"], ref),
            "top_eigs": ref[:6].tolist()}


def render(result: dict[str, Any]) -> str:
    table = [[r["name"], f"{r['base_s']:.3f} s", f"{r['s']:.3f} s", fmt_ratio(r["ratio"]), fmt_x(r["best"]),
              f"{r['other']:.0%}", ">= 0.7x" if r["name"] == "actstore_spectrum" else "—",
              goal_status(r["ratio"], 0.7) if r["name"] == "actstore_spectrum" else "—"] for r in result["rows"]]
    eo, en = result["err_ours"], result["err_numpy32"]
    e32 = result.get("err_ours32")
    acc = md_table(["eigenvalues vs float64 reference", "max abs. error / λ (all eigenvalues)",
                    "max abs. error / λ_max", "goal"],
                   [["actstore.spectrum", f"{eo['max_rel']:.2e}", f"{eo['max_rel_to_top']:.2e}",
                     "<= 1e-6 (" + ("met" if eo["max_rel"] <= 1e-6 else "**missed**") + ")"],
                    *([["actstore.spectrum(precision=\"float32\") (opt-in)", f"{e32['max_rel']:.2e}",
                        f"{e32['max_rel_to_top']:.2e}", "—"]] if e32 else []),
                    ["numpy float32 XᵀX − nμμᵀ", f"{en['max_rel']:.2e}", f"{en['max_rel_to_top']:.2e}", "—"]])
    return "\n\n".join([
        f"Goal (issue 11): >= 0.7x numpy's float32 `X.T @ X` on the same data in memory, with eigenvalues within "
        f"1e-6 relative of a float64 reference. Data: {result['n']:,} x {result['d']} float16 (offset mean, 5 "
        "planted spikes), read from a page-cached store. Ratio = numpy time / actstore time per round (> 1: "
        "actstore faster).",
        md_table(["actstore step", "numpy XᵀX (median)", "actstore (median)", "ratio", "best/best", "other CPU",
                  "goal", "status"], table),
        acc,
        "How the accuracy is kept: every block is shifted by one early mean estimate (the first block's mean) and "
        "cast to float64 before its `XᵀX` product (a SYRK); the partials of ~64 MiB tasks add up in one flat "
        "step. The opt-in `precision=\"float32\"` runs 1,024-row float32 products after a shift on the float16 "
        "grid, accumulated in float64: ~1e-8 of λ_max, but it misses 1e-6 on the smallest eigenvalues, so it is "
        "not the default. numpy's float32 route loses digits to the mean² term (offset data).",
    ])


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    r = next(r for r in result["rows"] if r["name"] == "actstore_spectrum")
    eo = result["err_ours"]
    return [("`actstore.spectrum` vs numpy float32 XᵀX", fmt_ratio(r["ratio"]), ">= 0.7x",
             goal_status(r["ratio"], 0.7)),
            ("spectrum eigenvalue max relative error vs float64", f"{eo['max_rel']:.1e}", "<= 1e-6",
             "met" if eo["max_rel"] <= 1e-6 else "**missed**")]
