"""Random-matrix-theory (RMT) spectra of activation covariances: the numpy kernels behind `actstore.spectrum`.

What runs here (pure numpy, no Ray/Dask/scipy, so Dask tasks can call it on plain chunks):

- `CovarianceAccumulator`: a streaming, exactly mergeable covariance. Each block is shifted by an early mean
  estimate (the mean of the first block it saw) and cast to float64 *before* the `XᵀX` product (or, opt-in,
  multiplied in float32 in short blocks), so a float16 activation with a large common offset (e.g. +100) loses
  no precision to cancellation. Partial results travel between Dask tasks as dicts of plain numpy arrays (`to_dict` / `from_dict`, or `merge_partials`).
- `mp_fit`: Marchenko–Pastur (MP) noise level σ² and edges λ± for the aspect ratio q = d/n. For q > 1 the
  spectrum has (1 - 1/q)·d exact zeros, so only the min(d, n) nonzero eigenvalues are fitted.
- Outliers: eigenvalues above λ+ plus `tw_margin` Tracy–Widom scales of the largest bulk eigenvalue
  (Johnstone 2001). The top eigenvalue of pure noise fluctuates around λ+ on that scale (TW1: mean −1.21,
  sd 1.27, P(TW1 > 0) ≈ 0.17), so the plain edge reports false outliers; P(TW1 > 4) is below 1e-3.
- `mp_density` / `mp_cdf` / `ks_distance`: the MP law and the Kolmogorov–Smirnov distance of the bulk to it.
- Summary statistics: spectral entropy, effective rank, participation ratio and a power-law tail exponent.
- `spectrum_from_covariance` ties these together into a `SpectrumResult`; `windowed_descriptors` computes a few
  of them on consecutive token windows for streaming monitoring.

Conventions: eigenvalues are returned in descending order; the covariance uses the unbiased denominator n - 1,
so the degrees of freedom of a mean-removed covariance of n rows are n - 1, and that is the "n" the MP and TW
formulas see (q = d / (n - 1)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

_BLOCK_ROWS = 8192  # rows per float64 product: bounds the temporary copy of a large incoming block
# Rows per float32 product: the float32 rounding of a product grows ~sqrt(rows), so float32 blocks stay short.
_F32_BLOCK_ROWS = 1024
PRECISIONS = ("float64", "float32")
# Points of the tabulated MP CDF (trapezoid error ~1e-7 after the edge-smoothing substitution in _mp_table).
_MP_GRID = 4097


# --------------------------------------------------------------------------------------------------------------
# Streaming covariance
# --------------------------------------------------------------------------------------------------------------


class CovarianceAccumulator:
    """Streaming covariance of (rows, d) blocks, accumulated in float64 and exactly mergeable.

    State (all float64): `n` rows, `shift` c (the mean of the first block, an early mean estimate),
    `sum` = Σ(x - c) and `sxx` = Σ(x - c)(x - c)ᵀ. Shifting by c before squaring keeps the products of the
    order of the variance rather than of the mean², which is what makes float64 accumulation exact to ~1e-15
    even for offset float16 data. By default the products run in float64 (`precision="float64"`), which is what
    honours the 1e-6 per-eigenvalue contract. `precision="float32"` (opt-in, about twice as fast) shifts by the
    early mean rounded to the data's dtype (so x - c is exact in float32 for float16 data), multiplies blocks of
    `block_rows` rows in float32 and accumulates the blocks in float64; its eigenvalue error relative to λ_max
    stays ~1e-8, but small eigenvalues of an ill-conditioned covariance can be off by more than 1e-6 relative.
    """

    def __init__(self, d: int, precision: str = "float64", block_rows: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.d = int(d)
        self.precision = precision
        self.block_rows = int(block_rows or (_BLOCK_ROWS if precision == "float64" else _F32_BLOCK_ROWS))
        self.n = 0
        self.shift = np.zeros(self.d)
        self.sum = np.zeros(self.d)
        self.sxx = np.zeros((self.d, self.d))

    def update(self, block: np.ndarray, shift: np.ndarray | None = None) -> CovarianceAccumulator:
        """Add the rows of a (rows, d) float16/float32/float64 block; returns self.

        `shift` fixes the early mean estimate of an empty accumulator (so that partials computed in parallel
        share it and merge by plain addition); by default it is the mean of the first block.
        """
        x = np.asarray(block)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"block must have shape (rows, {self.d}), got {x.shape}")
        if self.n == 0 and x.shape[0]:
            self.shift = self._early_mean(x) if shift is None else np.asarray(shift, np.float64)
        for start in range(0, x.shape[0], self.block_rows):
            self._update_rows(x[start : start + self.block_rows])
        return self

    def _early_mean(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported by _update_rows
            m = x[: self.block_rows].mean(axis=0, dtype=np.float64)
        # float32 products: a shift on the data's own grid keeps x - shift exact in float32 (float16 input)
        return m.astype(x.dtype).astype(np.float64) if self.precision == "float32" and x.dtype.itemsize < 8 else m

    def _update_rows(self, x: np.ndarray) -> None:
        if self.precision == "float32":
            y = x.astype(np.float32)  # always a copy we may modify in place
            y -= self.shift.astype(np.float32)
            s = y.sum(axis=0, dtype=np.float64)
        else:
            y = x.astype(np.float64)  # exact for float16/32, contiguous: `y.T @ y` runs as one SYRK
            with np.errstate(invalid="ignore", over="ignore"):
                y -= self.shift
                s = y.sum(axis=0)
        if not np.all(np.isfinite(s)):  # an inf/nan would silently poison every later eigenvalue
            raise ValueError("block contains non-finite values")
        self.sum += s
        self.sxx += y.T @ y  # float32 products are widened here: blocks accumulate in float64
        self.n += y.shape[0]

    def _centred(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean - shift, scatter about the mean Σ(x - mean)(x - mean)ᵀ)."""
        m = self.sum / self.n
        return m, self.sxx - self.n * np.outer(m, m)

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Absorb `other` (any shift) into self exactly; returns self.

        Combines the mean-centred scatters (Chan et al. 1979): M = M1 + M2 + n1·n2/n·δδᵀ with δ the difference of
        the means, then re-expresses the result around self's shift. Going through the centred form avoids the
        cancellation that translating raw sums between two distant shifts would cause.
        """
        if other.d != self.d:
            raise ValueError(f"cannot merge d={other.d} into d={self.d}")
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.shift, self.sum, self.sxx = (
                other.n,
                other.shift.copy(),
                other.sum.copy(),
                other.sxx.copy(),
            )
            return self
        n1, n2 = self.n, other.n
        n = n1 + n2
        m1, c1 = self._centred()
        m2, c2 = other._centred()
        delta = (other.shift - self.shift) + (m2 - m1)  # difference of the two means, kept small-first
        scatter = c1 + c2 + (n1 * n2 / n) * np.outer(delta, delta)
        m = m1 + (n2 / n) * delta  # merged mean relative to self.shift
        self.n, self.sum, self.sxx = n, n * m, scatter + n * np.outer(m, m)
        return self

    def finalize(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(mean (d,), covariance (d, d) with denominator n - 1 (unbiased), n), all float64."""
        if self.n < 2:
            raise ValueError(f"need at least 2 rows for a covariance, have {self.n}")
        m, scatter = self._centred()
        cov = scatter / (self.n - 1)
        return self.shift + m, (cov + cov.T) / 2, self.n  # symmetrise away last-bit asymmetry of the sums

    def to_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no pickle of this class needed), e.g. as a Dask task's partial result."""
        return {
            "n": np.asarray(self.n, np.int64),
            "shift": self.shift.copy(),
            "sum": self.sum.copy(),
            "sxx": self.sxx.copy(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, np.ndarray]) -> CovarianceAccumulator:
        """Inverse of `to_dict`."""
        shift = np.asarray(state["shift"], np.float64)
        acc = cls(shift.shape[0])
        acc.n = int(state["n"])
        acc.shift = shift.copy()
        acc.sum = np.asarray(state["sum"], np.float64).copy()
        acc.sxx = np.asarray(state["sxx"], np.float64).copy()
        return acc


def merge_partials(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge `to_dict` partials into one (a ready-made combine step for a Dask tree reduction)."""
    if not parts:
        raise ValueError("nothing to merge")
    acc = CovarianceAccumulator.from_dict(parts[0])
    for p in parts[1:]:
        acc.merge(CovarianceAccumulator.from_dict(p))
    return acc.to_dict()


# --------------------------------------------------------------------------------------------------------------
# Marchenko–Pastur law
# --------------------------------------------------------------------------------------------------------------


def mp_edges(sigma2: float, q: float) -> tuple[float, float]:
    """(λ-, λ+) = σ²(1 ∓ √q)²; for q > 1 these bound the nonzero eigenvalues."""
    r = math.sqrt(q)
    return sigma2 * (1 - r) ** 2, sigma2 * (1 + r) ** 2


def mp_density(x: np.ndarray | float, sigma2: float, q: float) -> np.ndarray:
    """Density of the continuous part of the MP law, √((λ+ - x)(x - λ-)) / (2π σ² q x) on [λ-, λ+].

    It integrates to min(1, 1/q): for q > 1 the remaining 1 - 1/q is an atom at 0 (see `mp_cdf`).
    """
    x = np.asarray(x, np.float64)
    lo, hi = mp_edges(sigma2, q)
    inside = (x > lo) & (x < hi) & (x > 0)
    xs = np.where(inside, x, 1.0)  # placeholder keeps the formula finite outside the support
    dens = np.sqrt(np.clip((hi - xs) * (xs - lo), 0.0, None)) / (2 * math.pi * sigma2 * q * xs)
    return np.where(inside, dens, 0.0)


@lru_cache(maxsize=64)
def _mp_table(q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """θ grid, x(θ) and the CDF of the *normalised* continuous MP part at σ² = 1.

    Substituting x = (a+b)/2 - (b-a)/2·cos θ turns the square-root edges into sin²θ, a smooth integrand, so a
    plain cumulative trapezoid is accurate to ~1e-7 on 4097 points.
    """
    a, b = mp_edges(1.0, q)
    theta = np.linspace(0.0, math.pi, _MP_GRID)
    x = (a + b) / 2 - (b - a) / 2 * np.cos(theta)
    num = ((b - a) / 2) ** 2 * np.sin(theta) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(x > 0, num / (2 * math.pi * q * x), b / (2 * math.pi * q))  # x=0 only at q=1: the limit
    cdf = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(theta))])
    cdf /= cdf[-1]  # condition on the nonzero part; removes the (tiny) quadrature error in the total mass
    for arr in (theta, x, cdf):
        arr.setflags(write=False)
    return theta, x, cdf


def _mp_bulk_cdf(x: np.ndarray | float, sigma2: float, q: float) -> np.ndarray:
    """CDF of the continuous MP part normalised to 1 (the law of the nonzero eigenvalues)."""
    theta, _, cdf = _mp_table(float(q))
    a, b = mp_edges(1.0, q)
    t = np.clip(np.asarray(x, np.float64) / sigma2, a, b)
    cos_t = np.clip(((a + b) / 2 - t) / ((b - a) / 2), -1.0, 1.0)
    return np.interp(np.arccos(cos_t), theta, cdf)


def mp_cdf(x: np.ndarray | float, sigma2: float, q: float) -> np.ndarray:
    """Full MP CDF, including the atom of mass 1 - 1/q at 0 when q > 1 (numerical integration of the density)."""
    x = np.asarray(x, np.float64)
    atom = max(0.0, 1.0 - 1.0 / q)
    return np.where(x < 0, 0.0, atom + (1.0 - atom) * _mp_bulk_cdf(x, sigma2, q))


def _mp_median(q: float) -> float:
    """Median of the nonzero MP eigenvalues at σ² = 1."""
    _, x, cdf = _mp_table(float(q))
    return float(np.interp(0.5, cdf, x))


def tracy_widom_scale(sigma2: float, n_samples: int, d: int) -> float:
    """Std-scale of the largest noise eigenvalue of a white Wishart covariance XᵀX/n (Johnstone 2001).

    Johnstone: (ℓ1 - μ)/s → TW1 for ℓ1 the top eigenvalue of XᵀX with N(0,1) entries, s = (√n + √d)(1/√n +
    1/√d)^(1/3). Dividing XᵀX by n and scaling the entries to variance σ² gives s·σ²/n. Symmetric in (n, d).
    """
    rn, rd = math.sqrt(n_samples), math.sqrt(d)
    return sigma2 * (rn + rd) * (1 / rn + 1 / rd) ** (1 / 3) / n_samples


def _nonzero_part(eigenvalues: np.ndarray, n_samples: int, d: int) -> np.ndarray:
    """The min(d, n) largest eigenvalues, descending, clipped at 0: those the MP continuous part describes."""
    eig = np.sort(np.asarray(eigenvalues, np.float64))[::-1]
    eig = np.clip(eig[: min(d, n_samples)], 0.0, None)
    # Structural zeros (e.g. the direction a LayerNorm removes) are rank deficiency, not noise: left in,
    # the σ² iteration collapses onto them.
    return eig[eig > 1e-10 * eig[0]] if eig.size and eig[0] > 0 else eig


def mp_fit(
    eigenvalues: np.ndarray,
    n_samples: int,
    d: int,
    tw_margin: float = 4.0,
    max_iter: int = 200,
    tol: float = 1e-12,
) -> dict[str, float]:
    """Fit the MP noise level σ² to a covariance spectrum with q = d / n_samples.

    `n_samples` is the degrees of freedom (n - 1 for a mean-removed covariance). Robust two-stage estimate:
    start from median matching (median of the nonzero eigenvalues / MP median: insensitive to a few spikes),
    then iterate σ² = mean(bulk) / max(1, q), where the bulk is every nonzero eigenvalue at or below the outlier
    threshold λ+(σ²) + tw_margin·TW-scale(σ²) (the normalised continuous MP part has mean σ²·max(1, q)), until
    σ² is stable: with the spikes excluded the mean is far more efficient than the median.
    Returns sigma2, lambda_plus, lambda_minus, q, tw_scale, threshold, n_bulk, iterations, converged (0/1).
    """
    if n_samples < 1 or d < 1:
        raise ValueError(f"need n_samples >= 1 and d >= 1, got {n_samples}, {d}")
    q = d / n_samples
    x = _nonzero_part(eigenvalues, n_samples, d)
    sigma2 = float(np.median(x)) / _mp_median(q)
    it, converged = 0, False
    while sigma2 > 0 and it < max_iter and not converged:
        it += 1
        bulk = x[x <= _threshold(sigma2, n_samples, d, tw_margin)]  # never empty: threshold >= mean(bulk)
        new = float(bulk.mean()) / max(1.0, q)
        converged = abs(new - sigma2) <= tol * max(new, 1e-300)
        sigma2 = new
    lo, hi = mp_edges(sigma2, q)
    thr = _threshold(sigma2, n_samples, d, tw_margin)
    return {
        "sigma2": sigma2,
        "lambda_plus": hi,
        "lambda_minus": lo,
        "q": q,
        "tw_scale": tracy_widom_scale(sigma2, n_samples, d),
        "threshold": thr,
        "n_bulk": int(np.count_nonzero(x <= thr)),
        "iterations": it,
        "converged": int(converged),
    }


def _threshold(sigma2: float, n_samples: int, d: int, tw_margin: float) -> float:
    return mp_edges(sigma2, d / n_samples)[1] + tw_margin * tracy_widom_scale(sigma2, n_samples, d)


def find_outliers(eigenvalues: np.ndarray, fit: dict[str, float]) -> np.ndarray:
    """Eigenvalues strictly above the fit's threshold (λ+ plus the Tracy–Widom margin), descending."""
    eig = np.sort(np.asarray(eigenvalues, np.float64))[::-1]
    return eig[eig > fit["threshold"]]


def ks_distance(bulk_eigs: np.ndarray, sigma2: float, q: float) -> float:
    """Kolmogorov–Smirnov distance sup|F_emp - F_MP| between bulk eigenvalues and the MP law.

    `bulk_eigs` are nonzero eigenvalues (for q > 1 the zeros are left out), so they are compared with the MP
    continuous part normalised to 1. Uses both one-sided gaps at each jump of the empirical CDF.
    """
    x = np.sort(np.asarray(bulk_eigs, np.float64))
    m = x.shape[0]
    if m == 0 or sigma2 <= 0:
        return float("nan")
    f = _mp_bulk_cdf(x, sigma2, q)
    i = np.arange(1, m + 1)
    return float(max(np.max(i / m - f), np.max(f - (i - 1) / m)))


# --------------------------------------------------------------------------------------------------------------
# Summary statistics of a spectrum
# --------------------------------------------------------------------------------------------------------------


def _weights(eigenvalues: np.ndarray) -> np.ndarray | None:
    """p_i = λ_i / Σλ over λ clipped at 0 (eigvalsh returns -1e-16 for true zeros), or None if Σλ = 0."""
    lam = np.clip(np.asarray(eigenvalues, np.float64), 0.0, None)
    total = lam.sum()
    return lam / total if total > 0 else None


def spectral_entropy(eigenvalues: np.ndarray) -> float:
    """Shannon entropy -Σ p_i ln p_i of p_i = λ_i / Σλ (natural log; 0·ln 0 = 0); NaN for an all-zero spectrum."""
    p = _weights(eigenvalues)
    if p is None:
        return float("nan")
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def effective_rank(eigenvalues: np.ndarray) -> float:
    """exp(spectral entropy) (Roy & Vetterli 2007): d for a flat spectrum, 1 for rank one."""
    return float(math.exp(spectral_entropy(eigenvalues)))


def participation_ratio(eigenvalues: np.ndarray) -> float:
    """(Σλ)² / Σλ²: d for a flat spectrum, 1 for rank one; weights large eigenvalues more than the entropy."""
    p = _weights(eigenvalues)
    return float("nan") if p is None else float(1.0 / (p**2).sum())


def power_law_alpha(eigenvalues: np.ndarray, tail_fraction: float = 0.5, min_points: int = 3) -> float:
    """Rank-size exponent α of λ_i ∝ i^-α: least-squares slope of ln λ_i on ln i over the top ranks.

    Fits ranks 1..⌈tail_fraction·m⌉ of the m positive eigenvalues (descending). The bottom of a sample spectrum is
    distorted by finite-sample noise and numerical zeros, so it is left out. An exact power law gives α exactly;
    this is the eigenspectrum-decay exponent (Stringer et al. 2019), not the Hill/Clauset exponent of the density.
    NaN when fewer than `min_points` positive eigenvalues exist.
    """
    lam = np.sort(np.asarray(eigenvalues, np.float64))[::-1]
    lam = lam[lam > 0]
    k = max(min_points, math.ceil(tail_fraction * lam.shape[0]))
    if lam.shape[0] < min_points:
        return float("nan")
    lam = lam[:k]
    slope = np.polyfit(np.log(np.arange(1, lam.shape[0] + 1)), np.log(lam), 1)[0]
    return float(-slope)


# --------------------------------------------------------------------------------------------------------------
# Full spectrum result
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SpectrumResult:
    """Eigenvalues (descending), MP outliers (descending) and the metrics dict of one covariance."""

    eigenvalues: np.ndarray
    outliers: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-safe dict (lists and Python numbers; NaN/inf become None)."""
        return {
            "eigenvalues": [_json_num(v) for v in self.eigenvalues],
            "outliers": [_json_num(v) for v in self.outliers],
            "metrics": {k: _json_num(v) for k, v in self.metrics.items()},
        }


def _json_num(v: Any) -> Any:
    if isinstance(v, (int, np.integer)):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else None


def spectrum_from_covariance(
    cov: np.ndarray, n_samples: int, tw_margin: float = 4.0, centered: bool = True, tail_fraction: float = 0.5
) -> SpectrumResult:
    """Eigen-decompose a (d, d) covariance of `n_samples` rows and compute every spectral metric.

    `centered=True` (the covariance had its sample mean removed) uses n_samples - 1 degrees of freedom in the
    MP/TW formulas, matching the n - 1 denominator of `CovarianceAccumulator.finalize`. Metric `q` is d / dof.
    """
    cov = np.asarray(cov, np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be square, got {cov.shape}")
    d = cov.shape[0]
    dof = n_samples - 1 if centered else n_samples
    eig = np.linalg.eigvalsh((cov + cov.T) / 2)[::-1].copy()
    fit = mp_fit(eig, dof, d, tw_margin)
    outliers = find_outliers(eig, fit)
    nonzero = _nonzero_part(eig, dof, d)
    bulk = nonzero[nonzero <= fit["threshold"]]
    metrics: dict[str, Any] = {
        "n_outliers": int(outliers.shape[0]),
        "sigma2": fit["sigma2"],
        "lambda_plus": fit["lambda_plus"],
        "lambda_minus": fit["lambda_minus"],
        "q": fit["q"],
        "ks": ks_distance(bulk, fit["sigma2"], fit["q"]),
        "spectral_entropy": spectral_entropy(eig),
        "effective_rank": effective_rank(eig),
        "participation_ratio": participation_ratio(eig),
        "alpha": power_law_alpha(eig, tail_fraction),
        "n_samples": int(n_samples),
        "d": int(d),
        "trace": float(np.clip(eig, 0, None).sum()),
        "top_eigenvalue": float(eig[0]),
        "tw_scale": fit["tw_scale"],
        "outlier_threshold": fit["threshold"],
        "tw_margin": float(tw_margin),
    }
    return SpectrumResult(eigenvalues=eig, outliers=outliers, metrics=metrics)


# --------------------------------------------------------------------------------------------------------------
# Streaming monitoring
# --------------------------------------------------------------------------------------------------------------


def _iter_blocks(blocks: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(blocks, np.ndarray):
        yield blocks  # the accumulator sub-blocks large arrays itself
    else:
        for b in blocks:
            yield np.asarray(b)


def _describe(acc: CovarianceAccumulator, index: int, start: int, tw_margin: float) -> dict[str, Any]:
    _, cov, n = acc.finalize()
    res = spectrum_from_covariance(cov, n, tw_margin)
    m = res.metrics
    return {
        "window": index,
        "start_row": start,
        "n_rows": n,
        "total_variance": m["trace"],
        "spectral_entropy": m["spectral_entropy"],
        "effective_rank": m["effective_rank"],
        "ks": m["ks"],
        "sigma2": m["sigma2"],
        "n_outliers": m["n_outliers"],
        "top_eigenvalue": m["top_eigenvalue"],
    }


def windowed_descriptors(
    blocks: np.ndarray | Iterable[np.ndarray],
    window_rows: int,
    tw_margin: float = 4.0,
    drop_last: bool = False,
) -> list[dict[str, Any]]:
    """Spectral descriptors of consecutive, non-overlapping windows of `window_rows` token rows.

    `blocks` is one (n, d) array or an iterable of (rows, d) blocks of any sizes (windows may straddle blocks),
    so a store can be streamed without materialising it. Each window reports total variance (trace), spectral
    entropy, effective rank, MP deviation (KS of the bulk), σ², n_outliers and the top eigenvalue. A final
    partial window (>= 2 rows) is reported with its own n_rows unless `drop_last`.
    """
    if window_rows < 2:
        raise ValueError(f"window_rows must be >= 2, got {window_rows}")
    out: list[dict[str, Any]] = []
    acc: CovarianceAccumulator | None = None
    row = start = 0
    for block in _iter_blocks(blocks):
        pos = 0
        while pos < block.shape[0]:
            if acc is None:
                acc, start = CovarianceAccumulator(block.shape[1]), row
            take = min(window_rows - acc.n, block.shape[0] - pos)
            acc.update(block[pos : pos + take])
            pos, row = pos + take, row + take
            if acc.n == window_rows:
                out.append(_describe(acc, len(out), start, tw_margin))
                acc = None
    if acc is not None and acc.n >= 2 and not drop_last:
        out.append(_describe(acc, len(out), start, tw_margin))
    return out
