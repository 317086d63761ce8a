"""Spectra on anisotropic data: correlation vs covariance basis, MP vs permutation null, the permuted copies the
accumulator keeps, constant columns, massive dimensions, and the float32 products' error on massive activations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from actstore.workers.spectra import (
    CovarianceAccumulator,
    correlation,
    massive_dimensions,
    permute_columns,
    permuted_covariances,
    spectrum_from_covariance,
    spectrum_from_rows,
)

N, D = 20_000, 200
BOTH = [("correlation", "mp"), ("correlation", "permutation"), ("covariance", "mp"), ("covariance", "permutation")]


def _noise(seed: int, n: int = N, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def _scales(seed: int, d: int = D) -> np.ndarray:
    """Log-normal column scales: variances spread over ~5 orders of magnitude."""
    s = np.exp(np.random.default_rng(seed).normal(0.0, 1.5, d))
    assert (s.max() / s.min()) ** 2 > 1e4
    return s


def _planted(seed: int, ells: tuple[float, ...], n: int = N, d: int = D) -> np.ndarray:
    """k correlated directions (orthonormal u_j) of strength ℓ_j (in units of the unit noise variance)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((d, len(ells))))[0]
    return (rng.standard_normal((n, len(ells))) * np.sqrt(ells)) @ u.T


def _outliers(x: np.ndarray, basis: str, null: str) -> dict:
    res = spectrum_from_rows(x, basis=basis, null=null, seed=1)
    assert res.basis == res.metrics["basis"] == basis and res.null == res.metrics["null"] == null
    assert res.metrics["n_outliers"] == res.outliers.shape[0] == res.metrics[f"n_outliers_{null}"]
    return res.metrics


# ------------------------------------------------------------------------------------------------ nulls


@pytest.mark.parametrize(("basis", "null"), BOTH)
def test_isotropic_gaussian_has_no_outliers(basis, null):
    m = _outliers(_noise(0), basis, null)
    assert m["n_outliers"] == 0 and m["n_outliers_mp"] == 0
    assert m["ks"] < 0.05 and m["n_massive_dims"] == 0


@pytest.mark.parametrize(("basis", "null"), BOTH)
def test_anisotropic_independent_columns(basis, null):
    """Independent columns with scales spread over orders of magnitude have no correlated direction at all."""
    m = _outliers(_noise(1) * _scales(2), basis, null)
    if (basis, null) == ("covariance", "mp"):
        # The failure the defaults avoid: the raw spectrum is the set of column variances, not MP.
        assert m["n_outliers"] > D // 2
    else:
        assert m["n_outliers"] == 0
    assert m["n_massive_dims"] > 0


@pytest.mark.parametrize("null", ["mp", "permutation"])
@pytest.mark.parametrize("anisotropic", [False, True])
def test_planted_correlated_directions_give_exactly_k_in_the_correlation_basis(null, anisotropic):
    ells = (0.6, 1.5, 4.0)
    assert min(ells) > 3 * math.sqrt(D / N)  # well above the BBP threshold √q
    x = _noise(3) + _planted(4, ells)
    m = _outliers(x * _scales(5) if anisotropic else x, "correlation", null)
    assert m["n_outliers"] == 3 and m["n_outliers_mp"] == 3
    # The bulk shrinks by the planted variance (trace = d): σ² ≈ 1 - Σℓ/d, and it is MP-shaped.
    assert m["sigma2"] == pytest.approx(1 - sum(ells) / D, abs=0.01) and m["ks"] < 0.05


def test_planted_directions_below_bbp_are_not_outliers():
    x = _noise(6) + _planted(7, (0.05,))  # √q = 0.1 > ℓ
    for null in ("mp", "permutation"):
        assert _outliers(x * _scales(8), "correlation", null)["n_outliers"] == 0


def test_covariance_basis_permutation_null_finds_planted_directions_on_anisotropic_columns():
    s = _scales(9)
    top = float((s**2).max())
    x = _noise(10) * s + _planted(11, (3 * top, 6 * top, 12 * top))
    m = _outliers(x, "covariance", "permutation")
    assert m["n_outliers"] == 3
    assert m["n_outliers_mp"] > D // 2  # MP on the raw covariance: meaningless here
    # The null's edge is the largest column variance (plus the planted directions' share of each column).
    assert top < m["permutation_edge"] < 1.1 * float(np.var(x, axis=0).max())


def test_permutation_null_absorbs_sparse_heavy_tails_that_fool_mp():
    """Independent columns with rare huge values (massive-activation-like tails): coincidences of spikes in a
    row push noise eigenvalues past the MP edge; the permuted copies show such coincidences too. The top noise
    eigenvalue then fluctuates far beyond TW, so the permutation null is not infallible either: over 6 data
    sets MP flags >= 1 false outlier on every one, the permutation null at most one in total (0 with 6
    permutations, measured)."""
    mp, perm = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, 100)) + (rng.random((N, 100)) < 1e-3) * rng.standard_normal((N, 100)) * 300
        m = _outliers(x, "correlation", "permutation")
        mp.append(m["n_outliers_mp"])
        perm.append(m["n_outliers"])
        assert m["permutation_edge"] > m["mp_edge"]
    assert min(mp) >= 1 and sum(perm) <= 1, (mp, perm)


def test_spectrum_from_rows_rejects_bad_choices():
    x = _noise(0, 100, 5)
    for kw in ({"basis": "cov"}, {"null": "shuffle"}, {"null": "permutation", "permutations": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            spectrum_from_rows(x, **kw)
    _, cov, n = CovarianceAccumulator(5).update(x).finalize()
    with pytest.raises(ValueError, match="permuted"):
        spectrum_from_covariance(cov, n, null="permutation")


# ------------------------------------------------------------------------------------- permuted copies


def test_permute_columns_keeps_each_column_and_breaks_pairing():
    x = np.arange(40.0).reshape(10, 4)
    y = permute_columns(x, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(y, axis=0), x)  # every column keeps its values
    assert not np.array_equal(y, x) and y.flags.c_contiguous


def test_permuted_covariances_equal_numpy_on_the_same_permutations():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3000, 8)) @ rng.standard_normal((8, 8)) + 4
    got = permuted_covariances(x, 2, seed=5, precision="float64")
    oracle = np.random.default_rng(5)
    assert len(got) == 2
    for g in got:
        np.testing.assert_allclose(g, np.cov(permute_columns(x, oracle), rowvar=False), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.diag(g), np.var(x, axis=0, ddof=1), rtol=1e-10)  # same marginals
    with pytest.raises(ValueError, match="permutations"):
        permuted_covariances(x, 0)


def test_permutation_null_on_a_row_sample_is_moved_to_the_data_aspect_ratio():
    """A null from m < n rows has the edge of q = d/m; in the correlation basis it is moved to q = d/n."""
    x = _noise(17, 40_000, 100)
    full = spectrum_from_rows(x, null="permutation").metrics
    part = spectrum_from_rows(x, null="permutation", null_rows=5000).metrics
    assert part["permutation_rows"] == 5000 and full["permutation_rows"] == 40_000
    sample_edge = (1 + math.sqrt(100 / 4999)) ** 2
    assert part["permutation_edge"] < sample_edge - 0.1  # moved, not the sample's own edge (~1.30)
    for m in (full, part):
        assert m["n_outliers"] == 0
        assert m["permutation_edge"] == pytest.approx(m["mp_edge"], abs=0.03)
    cov = spectrum_from_rows(x * _scales(18, 100), basis="covariance", null="permutation", null_rows=5000).metrics
    assert cov["n_outliers"] == 0  # the covariance basis keeps the sample's (larger) edge: conservative


# ------------------------------------------------------------------------- constant and massive columns


def test_constant_columns_are_dropped_from_the_correlation_basis_and_counted():
    x = _noise(14, 5000, 20)
    x[:, [3, 11]] = 7.25  # exactly constant
    for basis in ("correlation", "covariance"):
        res = spectrum_from_rows(x, basis=basis, null="permutation")
        assert np.all(np.isfinite(res.eigenvalues)) and res.metrics["n_outliers"] == 0
        assert all(v is None or isinstance(v, str) or np.isfinite(v) for v in res.metrics.values())
    corr = spectrum_from_rows(x)
    assert corr.metrics["d"] == 18 and corr.metrics["n_dropped_dims"] == 2 and corr.metrics["d_total"] == 20
    assert corr.dropped_dims.tolist() == [3, 11] and corr.eigenvalues.shape == (18,)
    assert json.loads(json.dumps(corr.to_json(), allow_nan=False))["dropped_dims"] == [3, 11]
    with pytest.raises(ValueError, match="constant"):
        correlation(np.zeros((3, 3)))


def test_massive_dimensions_are_named_with_their_share():
    x = _noise(15, 4000, 50)
    x[:, 42] *= 10.0  # variance 100x the median
    x[:, 7] = x[:, 7] * math.sqrt(30) + 5  # 30x, with a mean
    res = spectrum_from_rows(x)
    var = np.var(x, axis=0, ddof=1)
    assert [r["dim"] for r in res.massive_dims] == [42, 7] and res.metrics["n_massive_dims"] == 2
    top = res.massive_dims[0]
    assert top["variance"] == pytest.approx(var[42]) and top["variance_share"] == pytest.approx(var[42] / var.sum())
    assert top["variance_ratio"] == pytest.approx(var[42] / np.median(var))
    assert res.massive_dims[1]["mean"] == pytest.approx(x[:, 7].mean())
    assert res.metrics["massive_variance_share"] == pytest.approx((var[42] + var[7]) / var.sum())
    rows, counts = massive_dimensions(var, factor=1e9)
    assert rows == [] and counts["n_massive_dims"] == 0


# ------------------------------------------------------------------------------- float32 products


def _massive_activations(seed: int, n: int = 60_000, d: int = 96) -> np.ndarray:
    """float16 rows with an offset mean, correlated structure, three dimensions ~300x the typical scale and
    rare huge values on another (as on delimiter tokens)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ (np.eye(d) + 0.2 * rng.standard_normal((d, d))) + 3 * rng.standard_normal(d)
    x[:, [5, 17, 60]] = x[:, [5, 17, 60]] * 300 + 1000
    x[rng.random(n) < 2e-3, 33] += 2000
    return x.astype(np.float16)


@pytest.mark.parametrize("basis", ["correlation", "covariance"])
def test_float32_products_within_1e6_of_the_largest_eigenvalue_on_massive_activations(basis):
    x = _massive_activations(16)
    ref = spectrum_from_covariance(np.cov(x.astype(np.float64), rowvar=False), x.shape[0], basis=basis)
    got = spectrum_from_rows(x, basis=basis, precision="float32")
    err = np.max(np.abs(got.eigenvalues - ref.eigenvalues)) / ref.eigenvalues[0]
    assert err <= 1e-6, err
    assert got.metrics["n_outliers"] == ref.metrics["n_outliers"]
