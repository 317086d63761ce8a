"""Random-matrix-theory (RMT) building blocks: the Marchenko–Pastur (MP) law, its fit, Tracy–Widom margins, the
two nulls' outlier thresholds, and summary statistics of a spectrum (pure numpy, no scipy).

- MP law for the aspect ratio q = d/n: edges λ± = σ²(1 ∓ √q)², density, CDF (with the atom of mass 1 - 1/q at 0
  for q > 1), the Kolmogorov–Smirnov (KS) distance of a bulk to it.
- `mp_fit`: the self-consistent σ² fit (bulk = eigenvalues under the outlier threshold of σ², σ² = the bulk's
  mean), used when σ² of the noise is unknown (covariance basis). In the correlation basis the null is known
  exactly: independent standardised columns have population correlation I, i.e. σ² = 1 (`mp_null`).
- Outlier thresholds are the null's edge plus `tw_margin` Tracy–Widom scales (Johnstone 2001): the top
  eigenvalue of pure noise fluctuates around λ+ on that scale (TW1: mean −1.21, sd 1.27, P(TW1 > 0) ≈ 0.17), so
  the plain edge reports false outliers; P(TW1 > 4) is below 1e-3. `permutation_null` takes the edge from the
  spectra of column-permuted data instead of from the MP law.
- Summary statistics: spectral entropy, effective rank, participation ratio and a power-law tail exponent.

Conventions: eigenvalues are handled in descending order; "n_samples" is the degrees of freedom (n - 1 for a
mean-removed covariance).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from actstore.schemas.errors import AnalysisError

# Points of the tabulated MP CDF (trapezoid error ~1e-7 after the edge-smoothing substitution in _mp_table).
_MP_GRID = 4097


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
        raise AnalysisError(f"need n_samples >= 1 and d >= 1, got {n_samples}, {d}")
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


def mp_null(eigenvalues: np.ndarray, n_samples: int, d: int, tw_margin: float = 4.0,
            sigma2: float | None = None) -> dict[str, float]:
    """Outlier threshold of the MP null: its edge λ+(σ²) plus `tw_margin` Tracy–Widom scales.

    With `sigma2` given the null is fully specified (correlation basis: σ² = 1, the correlation of independent
    columns); with None, σ² comes from the self-consistent fit `mp_fit` (covariance basis: the noise level is
    unknown). Returns null_sigma2, edge, tw_scale, threshold.
    """
    s2 = mp_fit(eigenvalues, n_samples, d, tw_margin)["sigma2"] if sigma2 is None else float(sigma2)
    scale = tracy_widom_scale(s2, n_samples, d)
    edge = mp_edges(s2, d / n_samples)[1]
    return {"null_sigma2": s2, "edge": edge, "tw_scale": scale, "threshold": edge + tw_margin * scale}


def permutation_null(null_eigenvalues: list[np.ndarray], n_samples: int, d: int, tw_margin: float = 4.0,
                     null_n_samples: int | None = None, translate: bool = False) -> dict[str, Any]:
    """Outlier threshold of the permutation null: the largest top eigenvalue of the permuted spectra, plus
    `tw_margin` Tracy–Widom scales.

    The spectra come from the data with every column permuted independently (same marginals, no
    cross-column dependence), so no MP assumption sets the edge: heavy-tailed or anisotropic columns raise it
    as they raise the data's own noise eigenvalues. The margin's unit is the larger of the TW scale of an MP
    law with the same edge (σ² = edge / (1 + √q)²; in the correlation basis with light tails σ² ≈ 1, the MP
    null's own scale) and the spread (sd) of the permutations' top eigenvalues: with heavy, sparse tails the
    top noise eigenvalue fluctuates far more than TW says. One permuted spectrum's top eigenvalue is one TW
    draw (mean −1.21 scales), so the largest of a few permutations is used: with 3, light-tailed pure noise
    exceeds the threshold with probability ~1e-3 (1.5% with 1, from simulation).

    `null_n_samples` (degrees of freedom of the permuted rows; default `n_samples`) may be smaller when the
    null ran on a row sample: its edge then belongs to the larger aspect ratio d / null_n_samples. With
    `translate` (correlation basis, where the independent-columns population is exactly I) the edge moves by
    the MP edge difference λ+(1, q_sample) - λ+(1, q_data), keeping the sample's excess over MP (from the
    marginals' tails, which only shrinks with more rows); without it the sample's edge is kept (conservative).
    Returns null_sigma2, edge, tw_scale (the margin's unit), spread, threshold, tops (each permutation's top).
    """
    if not null_eigenvalues:
        raise AnalysisError("the permutation null needs at least one permuted spectrum")
    tops = [float(np.max(e)) for e in null_eigenvalues]
    m = null_n_samples or n_samples
    edge = max(tops)
    if translate and m < n_samples:
        edge -= mp_edges(1.0, d / m)[1] - mp_edges(1.0, d / n_samples)[1]
    s2 = edge / (1 + math.sqrt(d / n_samples)) ** 2
    spread = float(np.std(tops, ddof=1)) if len(tops) > 1 else 0.0
    scale = max(tracy_widom_scale(s2, n_samples, d), spread)
    return {"null_sigma2": s2, "edge": edge, "tw_scale": scale, "spread": spread,
            "threshold": edge + tw_margin * scale, "tops": tops}


def bulk_fit(eigenvalues: np.ndarray, n_samples: int, d: int, threshold: float) -> dict[str, float]:
    """MP fit of the bulk, the nonzero eigenvalues at or below `threshold`: σ² = mean(bulk) / max(1, q) (the
    normalised continuous MP part has mean σ²·max(1, q)), its edges and the bulk's KS distance to that law."""
    x = _nonzero_part(eigenvalues, n_samples, d)
    bulk = x[x <= threshold]
    q = d / n_samples
    s2 = float(bulk.mean()) / max(1.0, q) if bulk.size else float("nan")
    lo, hi = mp_edges(s2, q)
    return {"sigma2": s2, "lambda_plus": hi, "lambda_minus": lo, "q": q, "n_bulk": int(bulk.size),
            "ks": ks_distance(bulk, s2, q)}


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
