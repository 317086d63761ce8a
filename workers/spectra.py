"""Random-matrix-theory (RMT) spectra of activations: the numpy kernels behind `actstore.spectrum`.

Activations are strongly anisotropic: a few dimensions carry variances orders of magnitude above the median
("massive activations"). The covariance spectrum of *independent* columns with different variances is the set of
those variances, not a Marchenko–Pastur (MP) law, so an MP fit to the raw covariance calls nearly every
eigenvalue an outlier. Hence two choices, each named in the result:

- basis: "correlation" (default) analyses the correlation matrix (standardised columns, from the same one-pass
  covariance); the null of independent columns is then exactly MP with σ² = 1, whatever the column scales.
  Constant columns have no correlation and are dropped (and counted). "covariance" analyses the raw
  covariance, where MP (with a fitted σ²) describes isotropic noise only.
- null: "mp" (default) puts the outlier threshold at the MP edge (σ² = 1 in the correlation basis, the
  self-consistent fit in the covariance basis) plus a Tracy–Widom margin; "permutation" takes the edge from the
  spectra of the same data with every column permuted independently (same marginals, no correlations: no MP
  assumption, robust to heavy tails and to anisotropy in either basis) and reports the MP count beside it.

Either way the bulk (eigenvalues under the threshold) gets its own MP fit (σ², edges) and KS distance, which
say how MP-like the rest of the spectrum is, and the dimensions that dominate the raw covariance are named.
The math lives in `actstore.workers.rmt` and the streaming accumulation in `actstore.workers.covariance`; both
are re-exported here. Eigenvalues are returned in descending order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actstore.schemas.errors import AnalysisError, ConfigError
from actstore.workers.covariance import (
    PRECISIONS,
    CovarianceAccumulator,
    merge_partials,
    permute_columns,
    permuted_covariances,
)
from actstore.workers.rmt import (
    bulk_fit,
    effective_rank,
    find_outliers,
    ks_distance,
    mp_cdf,
    mp_density,
    mp_edges,
    mp_fit,
    mp_null,
    participation_ratio,
    permutation_null,
    power_law_alpha,
    spectral_entropy,
    tracy_widom_scale,
)

__all__ = [
    "BASES", "NULLS", "PRECISIONS", "CovarianceAccumulator", "SpectrumResult", "bulk_fit", "correlation",
    "effective_rank", "find_outliers", "ks_distance", "massive_dimensions", "merge_partials", "mp_cdf",
    "mp_density", "mp_edges", "mp_fit", "mp_null", "participation_ratio", "permutation_null", "permute_columns", "permuted_covariances",
    "power_law_alpha", "spectral_entropy", "spectrum_from_covariance", "spectrum_from_rows", "tracy_widom_scale",
    "window_descriptors", "windowed_descriptors",
]

BASES = ("correlation", "covariance")
NULLS = ("mp", "permutation")
# A column whose variance is below this fraction of the largest is numerically constant: dropped from the
# correlation matrix (dividing by its ~0 standard deviation would amplify rounding noise into ±1 correlations).
CONSTANT_RTOL = 1e-12
MASSIVE_FACTOR = 10.0  # a dimension is "massive" when its variance is at least this many times the median's
_MASSIVE_LISTED = 16


def check_choices(basis: str, null: str, permutations: int | None = None) -> None:
    """ConfigError naming the bad argument (basis, null, or a permutation null without permutations)."""
    if basis not in BASES:
        raise ConfigError(f"basis must be one of {BASES}, got {basis!r}")
    if null not in NULLS:
        raise ConfigError(f"null must be one of {NULLS}, got {null!r}")
    if null == "permutation" and permutations is not None and permutations < 1:
        raise ConfigError(f"null='permutation' needs permutations >= 1, got {permutations}")


# --------------------------------------------------------------------------------------------------------------
# Basis and dominant dimensions
# --------------------------------------------------------------------------------------------------------------


def _symmetric(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2


def correlation(cov: np.ndarray, rtol: float = CONSTANT_RTOL) -> tuple[np.ndarray, np.ndarray]:
    """(correlation matrix of the non-constant columns, their indices) of a covariance matrix.

    Columns with variance <= rtol * the largest variance are dropped; an all-constant matrix is an error.
    """
    var = np.diag(cov)
    top = float(var.max(initial=0.0))
    kept = np.flatnonzero(var > rtol * top) if top > 0 else np.zeros(0, np.int64)
    if kept.size == 0:
        raise AnalysisError("every column is constant: there is no correlation matrix (use basis='covariance')")
    return _standardised(cov, kept, np.sqrt(var[kept])), kept


def _standardised(cov: np.ndarray, kept: np.ndarray, sd: np.ndarray) -> np.ndarray:
    corr = cov[np.ix_(kept, kept)] / np.outer(sd, sd)
    np.fill_diagonal(corr, 1.0)  # exact by definition (a permuted copy has the same variances too)
    return _symmetric(corr)


def massive_dimensions(variances: np.ndarray, mean: np.ndarray | None = None, factor: float = MASSIVE_FACTOR,
                       limit: int | None = _MASSIVE_LISTED) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The dimensions whose variance is >= `factor` x the median variance, largest first (at most `limit`
    listed), each with its variance, ratio to the median, share of the total variance and mean; plus counts
    (n_massive_dims, massive_variance_share: the share of the total variance they carry, all of them)."""
    v = np.clip(np.asarray(variances, np.float64), 0.0, None)
    pos = v[v > 0]
    med, total = (float(np.median(pos)), float(v.sum())) if pos.size else (0.0, 0.0)
    idx = np.flatnonzero(v >= factor * med) if med > 0 else np.zeros(0, np.int64)
    idx = idx[np.argsort(-v[idx], kind="stable")]
    rows = [{"dim": int(i), "variance": float(v[i]), "variance_ratio": float(v[i] / med),
             "variance_share": float(v[i] / total),
             **({"mean": float(mean[i])} if mean is not None else {})} for i in idx[:limit]]
    share = float(v[idx].sum() / total) if total > 0 else 0.0
    return rows, {"n_massive_dims": int(idx.size), "massive_variance_share": share, "median_variance": med}


# --------------------------------------------------------------------------------------------------------------
# Full spectrum result
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SpectrumResult:
    """Eigenvalues (descending) of the chosen basis, outliers under the chosen null (descending) and metrics.

    `basis` and `null` name what was analysed; `massive_dims` lists the dimensions that dominate the raw
    covariance (see `massive_dimensions`); `dropped_dims` the constant columns left out of a correlation matrix.
    """

    eigenvalues: np.ndarray
    outliers: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)
    basis: str = "covariance"
    null: str = "mp"
    massive_dims: list[dict[str, float]] = field(default_factory=list)
    dropped_dims: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-safe dict (lists, strings and Python numbers; NaN/inf become None)."""
        return {
            "basis": self.basis,
            "null": self.null,
            "eigenvalues": [_json_num(v) for v in self.eigenvalues],
            "outliers": [_json_num(v) for v in self.outliers],
            "metrics": {k: _json_num(v) for k, v in self.metrics.items()},
            "massive_dims": [{k: _json_num(v) for k, v in row.items()} for row in self.massive_dims],
            "dropped_dims": [int(i) for i in self.dropped_dims],
        }


def _json_num(v: Any) -> Any:
    if isinstance(v, str) or v is None:
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    v = float(v)
    return v if np.isfinite(v) else None


def _eigvalsh_desc(mat: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(_symmetric(mat))[::-1].copy()


def spectrum_from_covariance(
    cov: np.ndarray,
    n_samples: int,
    tw_margin: float = 4.0,
    centered: bool = True,
    tail_fraction: float = 0.5,
    *,
    basis: str = "correlation",
    null: str = "mp",
    null_covariances: Sequence[np.ndarray] | None = None,
    null_n_samples: int | None = None,
    mean: np.ndarray | None = None,
    massive_factor: float = MASSIVE_FACTOR,
) -> SpectrumResult:
    """Eigen-decompose a (d, d) covariance of `n_samples` rows in the chosen basis and compute every metric.

    `null="permutation"` needs `null_covariances`: covariances of the rows (or of a row sample of
    `null_n_samples` rows) with every column permuted independently (`permuted_covariances`); in the
    correlation basis each is standardised by its own variances, which a permutation keeps. `centered=True`
    (the covariance had its sample mean removed) uses n_samples - 1 degrees of freedom in the MP/TW formulas,
    matching the n - 1 denominator of `CovarianceAccumulator.finalize`. `mean` (optional) is reported beside
    the massive dimensions.
    """
    check_choices(basis, null)
    cov = np.asarray(cov, np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise AnalysisError(f"covariance must be square, got {cov.shape}")
    dof = n_samples - 1 if centered else n_samples
    mat, kept = correlation(cov) if basis == "correlation" else (_symmetric(cov), np.arange(cov.shape[0]))
    eig, d = _eigvalsh_desc(mat), mat.shape[0]
    nulls = {"mp": mp_null(eig, dof, d, tw_margin, sigma2=1.0 if basis == "correlation" else None)}
    if null == "permutation":
        if not null_covariances:
            raise AnalysisError("null='permutation' needs the covariances of column-permuted rows (permutations >= 1)")
        spectra = [_eigvalsh_desc(_null_in_basis(np.asarray(c, np.float64), kept, basis)) for c in null_covariances]
        null_dof = (null_n_samples or n_samples) - (1 if centered else 0)
        nulls["permutation"] = permutation_null(spectra, dof, d, tw_margin, null_dof, translate=basis == "correlation")
        nulls["permutation"]["rows"] = null_n_samples or n_samples
    chosen = nulls[null]
    outliers = eig[eig > chosen["threshold"]]
    massive, counts = massive_dimensions(np.diag(cov), mean, massive_factor)
    metrics = {"basis": basis, "null": null, "n_outliers": int(outliers.shape[0]),
               **_null_metrics(eig, nulls, chosen, tw_margin), **bulk_fit(eig, dof, d, chosen["threshold"]),
               **_shape_metrics(eig, tail_fraction), "n_samples": int(n_samples), "d": int(d),
               "d_total": int(cov.shape[0]), "n_dropped_dims": int(cov.shape[0] - d),
               "total_variance": float(np.clip(np.diag(cov), 0, None).sum()), **counts}
    dropped = np.setdiff1d(np.arange(cov.shape[0]), kept)
    return SpectrumResult(eigenvalues=eig, outliers=outliers, metrics=metrics, basis=basis, null=null,
                          massive_dims=massive, dropped_dims=dropped)


def _null_in_basis(null_cov: np.ndarray, kept: np.ndarray, basis: str) -> np.ndarray:
    """A permuted copy's covariance in the basis: standardised by its own variances (those of the rows it was
    permuted from); a column constant in a row sample gets correlation 0 with the rest."""
    if basis == "covariance":
        return null_cov
    sd = np.sqrt(np.clip(np.diag(null_cov)[kept], 0.0, None))
    return _standardised(null_cov, kept, np.where(sd > 0, sd, np.inf))


def _null_metrics(eig: np.ndarray, nulls: dict[str, dict[str, Any]], chosen: dict[str, Any],
                  tw_margin: float) -> dict[str, Any]:
    """The chosen null's edge, σ², TW scale and threshold, plus the outlier count and threshold of each null."""
    out: dict[str, Any] = {"null_edge": chosen["edge"], "null_sigma2": chosen["null_sigma2"],
                           "tw_scale": chosen["tw_scale"], "outlier_threshold": chosen["threshold"],
                           "tw_margin": float(tw_margin)}
    for name, fit in nulls.items():
        out[f"n_outliers_{name}"] = int(np.count_nonzero(eig > fit["threshold"]))
        out[f"{name}_edge"] = fit["edge"]
        out[f"{name}_sigma2"] = fit["null_sigma2"]
        out[f"{name}_threshold"] = fit["threshold"]
    if "permutation" in nulls:
        out["n_permutations"] = len(nulls["permutation"]["tops"])
        out["permutation_spread"] = nulls["permutation"]["spread"]
        out["permutation_rows"] = nulls["permutation"]["rows"]
    return out


def _shape_metrics(eig: np.ndarray, tail_fraction: float) -> dict[str, float]:
    return {"spectral_entropy": spectral_entropy(eig), "effective_rank": effective_rank(eig),
            "participation_ratio": participation_ratio(eig), "alpha": power_law_alpha(eig, tail_fraction),
            "trace": float(np.clip(eig, 0, None).sum()), "top_eigenvalue": float(eig[0])}


def spectrum_from_rows(
    x: np.ndarray,
    *,
    basis: str = "correlation",
    null: str = "mp",
    permutations: int = 3,
    seed: int = 0,
    null_rows: int | None = None,
    precision: str = "float64",
    tw_margin: float = 4.0,
) -> SpectrumResult:
    """`spectrum_from_covariance` of in-memory (n, d) rows; with `null="permutation"` the permuted copies are
    of all rows, or of a uniform random sample of `null_rows` of them (seeded by `seed`)."""
    check_choices(basis, null, permutations)
    x = np.asarray(x)
    mean, cov, n = CovarianceAccumulator(x.shape[1], precision).update(x).finalize()
    nulls, m = None, None
    if null == "permutation":
        rng = np.random.default_rng(seed)
        sample = x if null_rows is None or null_rows >= n else x[np.sort(rng.choice(n, null_rows, replace=False))]
        nulls, m = permuted_covariances(sample, permutations, seed, precision), sample.shape[0]
    return spectrum_from_covariance(cov, n, tw_margin, basis=basis, null=null, null_covariances=nulls,
                                    null_n_samples=m, mean=mean)


# --------------------------------------------------------------------------------------------------------------
# Streaming monitoring
# --------------------------------------------------------------------------------------------------------------


def _iter_blocks(blocks: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(blocks, np.ndarray):
        yield blocks  # the accumulator sub-blocks large arrays itself
    else:
        for b in blocks:
            yield np.asarray(b)


def _describe(acc: CovarianceAccumulator, index: int, start: int, tw_margin: float, basis: str) -> dict[str, Any]:
    return {"window": index, "start_row": start, **accumulated_descriptors(acc, tw_margin, basis)}


def window_descriptors(rows: np.ndarray, tw_margin: float = 4.0, basis: str = "correlation") -> dict[str, Any]:
    """The descriptors `windowed_descriptors` reports for one (n, d) window of rows (n >= 2), in `basis`.

    A window of fewer rows than columns goes through its (n, n) Gram matrix: the (d, d) matrix then has rank
    < n and the same nonzero eigenvalues, so the numbers agree (to rounding) at a fraction of a (d, d)
    eigendecomposition's cost, which dominates a sliding-window series over wide hooks.
    """
    rows = np.asarray(rows, np.float64)
    if rows.shape[0] >= rows.shape[1]:
        return accumulated_descriptors(CovarianceAccumulator(rows.shape[1]).update(rows), tw_margin, basis)
    return _gram_descriptors(rows, tw_margin, basis)


def _gram_descriptors(rows: np.ndarray, tw_margin: float, basis: str) -> dict[str, Any]:
    check_choices(basis, "mp")
    n = rows.shape[0]
    if n < 2:
        raise AnalysisError(f"need at least 2 rows for a covariance, have {n}")
    xc = rows - rows.mean(axis=0)
    var = (xc * xc).sum(axis=0) / (n - 1)
    total = float(np.clip(var, 0, None).sum())
    if basis == "correlation":  # the columns `correlation` keeps, standardised
        top = float(var.max(initial=0.0))
        kept = np.flatnonzero(var > CONSTANT_RTOL * top) if top > 0 else np.zeros(0, np.int64)
        if kept.size == 0:
            raise AnalysisError("every column is constant: there is no correlation matrix (use basis='covariance')")
        xc = xc[:, kept] / np.sqrt(var[kept])
    d = xc.shape[1]
    if d <= n:
        eig = _eigvalsh_desc(xc.T @ xc / (n - 1))
    else:
        eig = np.zeros(d)
        eig[:n] = _eigvalsh_desc(xc @ xc.T / (n - 1))
    null = mp_null(eig, n - 1, d, tw_margin, sigma2=1.0 if basis == "correlation" else None)
    shape = _shape_metrics(eig, 0.5)
    fit = bulk_fit(eig, n - 1, d, null["threshold"])
    return {"n_rows": n, "total_variance": total, "spectral_entropy": shape["spectral_entropy"],
            "effective_rank": shape["effective_rank"], "ks": fit["ks"], "sigma2": fit["sigma2"],
            "n_outliers": int(np.count_nonzero(eig > null["threshold"])), "top_eigenvalue": shape["top_eigenvalue"]}


def accumulated_descriptors(acc: CovarianceAccumulator, tw_margin: float, basis: str) -> dict[str, Any]:
    """n_rows, total variance and the spectral descriptors of the rows an accumulator has seen."""
    _, cov, n = acc.finalize()
    m = spectrum_from_covariance(cov, n, tw_margin, basis=basis).metrics
    return {
        "n_rows": n,
        "total_variance": m["total_variance"],
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
    basis: str = "correlation",
) -> list[dict[str, Any]]:
    """Spectral descriptors of consecutive, non-overlapping windows of `window_rows` token rows.

    `blocks` is one (n, d) array or an iterable of (rows, d) blocks of any sizes (windows may straddle blocks),
    so a store can be streamed without materialising it. Each window reports total variance (trace of the
    covariance, whatever the basis), and in `basis`: spectral entropy, effective rank, MP deviation (KS of the
    bulk), bulk σ², n_outliers (MP null) and the top eigenvalue. A final partial window (>= 2 rows) is reported
    with its own n_rows unless `drop_last`.
    """
    check_choices(basis, "mp")
    if window_rows < 2:
        raise AnalysisError(f"window_rows must be >= 2, got {window_rows}")
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
                out.append(_describe(acc, len(out), start, tw_margin, basis))
                acc = None
    if acc is not None and acc.n >= 2 and not drop_last:
        out.append(_describe(acc, len(out), start, tw_margin, basis))
    return out
