"""Tests of the RMT spectra kernels: streaming covariance, Marchenko–Pastur fit, outliers and spectral metrics."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from actstore.schemas.errors import AnalysisError
from actstore.workers.spectra import (
    CovarianceAccumulator,
    SpectrumResult,
    effective_rank,
    ks_distance,
    merge_partials,
    mp_cdf,
    mp_density,
    mp_edges,
    mp_fit,
    participation_ratio,
    power_law_alpha,
    spectral_entropy,
    spectrum_from_covariance,
    tracy_widom_scale,
    windowed_descriptors,
)

SIGMA = 1.7


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Max-norm relative error (elementwise relative is meaningless for near-zero off-diagonal entries)."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _correlated(rng: np.random.Generator, n: int, d: int, offset: float = 5.0) -> np.ndarray:
    return rng.standard_normal((n, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d))) + offset


def _feed(x: np.ndarray, sizes: list[int]) -> CovarianceAccumulator:
    acc = CovarianceAccumulator(x.shape[1])
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == x.shape[0]
    for a, b in itertools.pairwise(bounds):
        acc.update(x[a:b])
    return acc


def _assert_matches_numpy(acc: CovarianceAccumulator, x: np.ndarray) -> None:
    mean, cov, n = acc.finalize()
    ref = np.cov(x.astype(np.float64), rowvar=False)
    assert n == x.shape[0]
    assert mean.dtype == np.float64 and cov.dtype == np.float64
    assert _rel(mean, x.astype(np.float64).mean(axis=0)) < 1e-12
    assert _rel(cov, ref) < 1e-10
    ev, ev_ref = np.linalg.eigvalsh(cov), np.linalg.eigvalsh(ref)
    assert np.max(np.abs(ev - ev_ref) / np.abs(ev_ref)) < 1e-6


# ----------------------------------------------------------------------------------------------- accumulator


def test_accumulator_uneven_blocks_equal_np_cov():
    x = _correlated(np.random.default_rng(0), 3000, 37)
    _assert_matches_numpy(_feed(x, [1, 7, 300, 13, 0, 1000, 1679]), x)


def test_accumulator_merge_with_different_shifts_and_dict_roundtrip():
    rng = np.random.default_rng(1)
    # The two halves come from different distributions, so the accumulators' shifts differ by ~+40.
    x = np.concatenate([_correlated(rng, 1200, 16, offset=-20.0), _correlated(rng, 900, 16, offset=20.0)])
    a, b = _feed(x[:1200], [500, 700]), _feed(x[1200:], [3, 897])
    assert np.all(np.abs(a.shift - b.shift) > 10)
    # Ship both through the plain-array dict form, as Dask tasks would.
    da, db = a.to_dict(), b.to_dict()
    assert all(isinstance(v, np.ndarray) for v in (*da.values(), *db.values()))
    merged = CovarianceAccumulator.from_dict(da).merge(CovarianceAccumulator.from_dict(db))
    _assert_matches_numpy(merged, x)
    _assert_matches_numpy(CovarianceAccumulator.from_dict(merge_partials(da, db)), x)
    # Merge order and empty partners do not matter.
    rev = (
        CovarianceAccumulator(16)
        .merge(CovarianceAccumulator.from_dict(db))
        .merge(CovarianceAccumulator.from_dict(da))
    )
    _assert_matches_numpy(rev.merge(CovarianceAccumulator(16)), x)


def test_accumulator_float16_with_large_offset():
    rng = np.random.default_rng(2)
    x16 = (0.5 * rng.standard_normal((5000, 24)) + 100.0).astype(np.float16)
    acc = _feed(x16, [17, 2000, 2983])
    _assert_matches_numpy(acc, x16)
    # And through a merge of float16 and float32 pieces.
    acc2 = _feed(x16[:2500], [2500]).merge(_feed(x16[2500:].astype(np.float32), [2500]))
    _assert_matches_numpy(acc2, x16)


def test_accumulator_rejects_bad_input():
    acc = CovarianceAccumulator(4)
    with pytest.raises(ValueError):
        acc.update(np.zeros((3, 5)))
    with pytest.raises(ValueError):
        acc.update(np.array([[1.0, 2.0, np.inf, 0.0]]))
    with pytest.raises(ValueError):
        acc.finalize()  # fewer than 2 rows
    with pytest.raises(ValueError):
        acc.merge(CovarianceAccumulator(3))


# ------------------------------------------------------------------------------------------ Marchenko–Pastur


@pytest.mark.parametrize("q", [0.01, 0.3, 2.5])
def test_mp_density_mass_and_cdf_agree(q):
    lo, hi = mp_edges(2.0, q)
    x = np.linspace(lo, hi, 400_001)
    f = mp_density(x, 2.0, q)
    cum = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(x))])
    assert cum[-1] == pytest.approx(min(1.0, 1.0 / q), abs=1e-5)
    atom = max(0.0, 1.0 - 1.0 / q)
    assert np.max(np.abs(mp_cdf(x[::997], 2.0, q) - (atom + cum[::997]))) < 1e-5
    assert mp_cdf(-1.0, 2.0, q) == 0.0 and mp_cdf(hi * 1.01, 2.0, q) == pytest.approx(1.0)


def _gaussian_cov(seed: int, n: int, d: int) -> tuple[np.ndarray, int]:
    x = SIGMA * np.random.default_rng(seed).standard_normal((n, d))
    _, cov, n_rows = CovarianceAccumulator(d).update(x).finalize()
    return cov, n_rows


@pytest.mark.parametrize(("seed", "basis"), [(0, "covariance"), (1, "covariance"), (2, "covariance"),
                                           (0, "correlation"), (1, "correlation")])
def test_pure_gaussian_has_no_outliers(seed, basis):
    cov, n = _gaussian_cov(seed, 20_000, 200)
    res = spectrum_from_covariance(cov, n, basis=basis)
    m = res.metrics
    assert m["n_outliers"] == 0 and res.outliers.shape == (0,)
    assert m["ks"] < 0.05
    # The correlation matrix of independent columns is MP with σ² = 1, whatever the columns' scale.
    assert m["sigma2"] == pytest.approx(SIGMA**2 if basis == "covariance" else 1.0, rel=0.02)
    assert m["lambda_plus"] == pytest.approx(m["sigma2"] * (1 + math.sqrt(m["q"])) ** 2, rel=1e-12)
    # The top noise eigenvalue sits within a few Tracy–Widom scales of λ+: checks the TW normalisation.
    z = (res.eigenvalues[0] - m["null_edge"]) / tracy_widom_scale(m["null_sigma2"], n - 1, 200)
    assert -5.0 < z < 4.0
    if basis == "correlation":
        assert m["null_sigma2"] == 1.0 and m["null_edge"] == pytest.approx((1 + math.sqrt(m["q"])) ** 2)


@pytest.mark.parametrize("basis", ["covariance", "correlation"])
def test_pure_gaussian_wide_matrix_d_greater_than_n(basis):
    cov, n = _gaussian_cov(3, 150, 300)
    m = spectrum_from_covariance(cov, n, basis=basis).metrics
    assert m["q"] > 1
    assert m["n_outliers"] == 0
    assert m["sigma2"] == pytest.approx(SIGMA**2 if basis == "covariance" else 1.0, rel=0.03)
    assert m["ks"] < 0.05


@pytest.mark.parametrize("basis", ["covariance", "correlation"])
def test_tracy_widom_margin_removes_false_outliers_of_the_plain_edge(basis):
    z, plain, margin = [], 0, 0
    for seed in range(40):
        cov, n = _gaussian_cov(100 + seed, 2000, 50)
        plain += spectrum_from_covariance(cov, n, tw_margin=0.0, basis=basis).metrics["n_outliers"] > 0
        m = spectrum_from_covariance(cov, n, basis=basis).metrics
        margin += m["n_outliers"] > 0
        z.append((m["top_eigenvalue"] - m["null_edge"]) / m["tw_scale"])
    assert plain >= 1  # P(TW1 > 0) ~ 0.17: the plain edge flags pure noise
    assert margin == 0
    # Standardised top eigenvalues follow TW1 (mean -1.21, sd 1.27) up to finite-size effects.
    assert -2.0 < np.mean(z) < -0.6 and 0.8 < np.std(z) < 1.7


def _spiked_cov(seed: int, n: int, d: int, ells: np.ndarray) -> tuple[np.ndarray, int]:
    """Population covariance σ²(I + Σ ℓ_j u_j u_jᵀ) with orthonormal u_j."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, len(ells))))
    x = (
        SIGMA * rng.standard_normal((n, d))
        + (SIGMA * np.sqrt(ells) * rng.standard_normal((n, len(ells)))) @ u.T
    )
    _, cov, n_rows = CovarianceAccumulator(d).update(x).finalize()
    return cov, n_rows


# Sample spike eigenvalues fluctuate with relative sd ~ sqrt(2/n): 1% at n = 20000 (5% tolerance, as the
# contract asks), 8% at n = 300 (the d > n case, kept small for speed, so a looser 20%).
@pytest.mark.parametrize(
    ("n", "d", "ells", "rtol"), [(20_000, 200, (0.8, 2.0, 5.0), 0.05), (300, 600, (4.0, 8.0, 16.0), 0.2)]
)
def test_planted_spikes_match_bbp(n, d, ells, rtol):
    ells = np.array(ells)
    cov, n_rows = _spiked_cov(7, n, d, ells)
    res = spectrum_from_covariance(cov, n_rows, basis="covariance")
    q = res.metrics["q"]
    assert np.all(ells > math.sqrt(q))  # all above the BBP threshold
    assert res.metrics["n_outliers"] == len(ells)
    predicted = np.sort((1 + ells) * (1 + q / ells) * SIGMA**2)[::-1]
    np.testing.assert_allclose(res.outliers, predicted, rtol=rtol)
    assert res.metrics["sigma2"] == pytest.approx(SIGMA**2, rel=0.03)


def test_spike_below_bbp_threshold_is_not_an_outlier():
    cov, n = _spiked_cov(8, 5000, 200, np.array([0.05]))  # √q = 0.2 > ℓ
    for basis in ("covariance", "correlation"):
        assert spectrum_from_covariance(cov, n, basis=basis).metrics["n_outliers"] == 0


def test_mp_fit_ignores_huge_spikes_and_ks_detects_a_wrong_law():
    cov, n = _gaussian_cov(4, 4000, 100)
    eig = np.linalg.eigvalsh(cov)[::-1].copy()
    eig[:5] *= 50.0  # five gross outliers must not drag σ²
    fit = mp_fit(eig, n - 1, 100)
    assert fit["converged"] and fit["sigma2"] == pytest.approx(SIGMA**2, rel=0.03)
    assert fit["n_bulk"] == 95
    bulk = eig[5:]
    assert ks_distance(bulk, fit["sigma2"], fit["q"]) < 0.08
    assert ks_distance(bulk, 1.5 * fit["sigma2"], fit["q"]) > 0.3


# -------------------------------------------------------------------------------------------- summary metrics


def test_flat_spectrum_metrics():
    lam = np.full(10, 3.0)
    assert spectral_entropy(lam) == pytest.approx(math.log(10))
    assert effective_rank(lam) == pytest.approx(10)
    assert participation_ratio(lam) == pytest.approx(10)


def test_hand_spectrum_metrics_against_direct_formulas():
    lam = np.array([3.0, 1.0, 0.0, -1e-17])  # a true zero and an eigvalsh-style negative zero
    p = np.array([3.0, 1.0]) / 4.0
    h = -float(np.sum(p * np.log(p)))
    assert spectral_entropy(lam) == pytest.approx(h)
    assert effective_rank(lam) == pytest.approx(math.exp(h))
    assert participation_ratio(lam) == pytest.approx(16.0 / 10.0)
    assert effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert math.isnan(spectral_entropy(np.zeros(3)))


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_power_law_alpha_exact(a):
    lam = np.arange(1, 501, dtype=np.float64) ** -a
    np.random.default_rng(0).shuffle(lam)  # order must not matter
    assert power_law_alpha(lam) == pytest.approx(a, abs=1e-9)


def test_power_law_alpha_from_sampled_covariance():
    a, d = 1.2, 200
    x = np.random.default_rng(5).standard_normal((20_000, d)) * np.arange(1, d + 1) ** (-a / 2)
    _, cov, n = CovarianceAccumulator(d).update(x).finalize()
    assert spectrum_from_covariance(cov, n, basis="covariance").metrics["alpha"] == pytest.approx(a, abs=0.05)


# --------------------------------------------------------------------------------------- result and windows


def test_spectrum_result_shape_and_json():
    cov, n = _spiked_cov(9, 3000, 50, np.array([6.0]))
    res = spectrum_from_covariance(cov, n, basis="covariance")
    assert isinstance(res, SpectrumResult) and res.basis == "covariance" and res.null == "mp"
    assert res.eigenvalues.dtype == np.float64 and np.all(np.diff(res.eigenvalues) <= 0)
    np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh(cov)[::-1], rtol=1e-10, atol=1e-12)
    keys = {
        "n_outliers",
        "sigma2",
        "lambda_plus",
        "lambda_minus",
        "q",
        "ks",
        "spectral_entropy",
        "effective_rank",
        "participation_ratio",
        "alpha",
        "n_samples",
        "d",
        "trace",
        "top_eigenvalue",
    }
    assert keys <= res.metrics.keys()
    assert res.metrics["trace"] == pytest.approx(np.trace(cov)) == res.metrics["total_variance"]
    assert res.metrics["n_samples"] == 3000 and res.metrics["d"] == 50
    doc = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert doc["outliers"] == pytest.approx(list(res.outliers)) and len(doc["eigenvalues"]) == 50
    assert doc["basis"] == doc["metrics"]["basis"] == "covariance" and doc["null"] == doc["metrics"]["null"] == "mp"
    # The default basis is the correlation matrix: its eigenvalues are those of np.corrcoef.
    corr = spectrum_from_covariance(cov, n)
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(corr.eigenvalues, np.linalg.eigvalsh(cov / np.outer(sd, sd))[::-1], atol=1e-12)
    assert corr.basis == "correlation" and corr.metrics["trace"] == pytest.approx(50)


def test_windowed_descriptors_stream_equals_array_and_tracks_variance():
    rng = np.random.default_rng(10)
    d, w = 20, 1000
    x = np.concatenate([rng.standard_normal((2000, d)), 2.0 * rng.standard_normal((2500, d))])
    whole = windowed_descriptors(x, w)
    sizes = [1, 333, 999, 1500, 1667]
    bounds = np.cumsum([0, *sizes])
    streamed = windowed_descriptors((x[a:b].astype(np.float32) for a, b in itertools.pairwise(bounds)), w)
    assert [r["n_rows"] for r in whole] == [1000, 1000, 1000, 1000, 500]
    assert [r["start_row"] for r in whole] == [0, 1000, 2000, 3000, 4000]
    for r, s in zip(whole, streamed):
        assert s["total_variance"] == pytest.approx(r["total_variance"], rel=1e-6)
    for r in whole:
        seg = x[r["start_row"] : r["start_row"] + r["n_rows"]]
        assert r["total_variance"] == pytest.approx(np.trace(np.cov(seg, rowvar=False)), rel=1e-10)
        assert r["spectral_entropy"] <= math.log(d) and r["ks"] < 0.3
    assert whole[3]["total_variance"] / whole[0]["total_variance"] == pytest.approx(4.0, rel=0.15)
    assert len(windowed_descriptors(x, w, drop_last=True)) == 4


def test_module_does_not_import_ray_or_dask():
    code = (
        "import sys, actstore.workers.spectra; "
        "print([m for m in sys.modules if m.split('.')[0] in ('ray', 'dask', 'distributed', 'scipy')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_accumulators_sharing_a_threads_work_array_stay_exact():
    """Accumulators of different widths and precisions, updated interleaved on one thread and from parallel
    threads (they share one work array per thread), equal each one computed alone in float64."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    blocks = {d: [(rng.standard_normal((700, d)) * 3 + 1).astype(np.float16) for _ in range(4)] for d in (8, 24)}
    alone = {d: CovarianceAccumulator(d).update(np.concatenate(b)).finalize()[1] for d, b in blocks.items()}

    def run(precision: str) -> dict[int, np.ndarray]:
        accs = {d: CovarianceAccumulator(d, precision, block_rows=300) for d in blocks}
        for i in range(4):
            for d, acc in accs.items():  # alternate widths: the shared array is re-shaped every block
                acc.update(blocks[d][i])
        return {d: acc.finalize()[1] for d, acc in accs.items()}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, ["float32", "float64"] * 4))
    for precision, got in zip(["float32", "float64"] * 4, results):
        for d in blocks:
            np.testing.assert_allclose(got[d], alone[d], rtol=1e-6 if precision == "float32" else 1e-12,
                                       atol=1e-6 if precision == "float32" else 1e-12)


def test_float32_precision_accumulator_close_and_shift_option():
    """Float32 block products with float64 accumulation: near the float64 result; a given shift is used."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((5000, 16)) * np.linspace(0.5, 2, 16) + 40).astype(np.float16)
    _, c64, _ = CovarianceAccumulator(16).update(x).finalize()
    acc = CovarianceAccumulator(16, precision="float32", block_rows=256).update(x)
    _, c32, _ = acc.finalize()
    # The shift is what the float32 products subtract (float32-rounded), and not on the float16 grid, whose
    # few-bit differences make float32 sums round with a systematic bias.
    assert np.all(acc.shift == acc.shift.astype(np.float32)) and not np.all(acc.shift == acc.shift.astype(np.float16))
    np.testing.assert_allclose(acc.finalize()[0], x.astype(np.float64).mean(0), rtol=1e-12)
    ev32, ev64 = np.linalg.eigvalsh(c32), np.linalg.eigvalsh(c64)
    assert np.max(np.abs(ev32 - ev64)) <= 1e-7 * ev64[-1]
    fixed = CovarianceAccumulator(16).update(x, shift=np.full(16, 40.0))
    np.testing.assert_array_equal(fixed.shift, np.full(16, 40.0))
    np.testing.assert_allclose(fixed.finalize()[1], c64, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        CovarianceAccumulator(16, precision="half")
    with pytest.raises(AnalysisError, match="at least one column"):
        CovarianceAccumulator(0)
