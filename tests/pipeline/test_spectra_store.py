"""actstore.spectrum on stores: equals numpy on the stored data; noise has no outliers; spikes are found."""

from __future__ import annotations

import numpy as np
import pytest

import actstore
from actstore.pipeline.spectra import windowed


def test_eigenvalues_equal_numpy(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 24)) @ rng.standard_normal((24, 24)) + 50).astype(np.float16)
    special = np.zeros(3000, bool)
    special[::10] = True
    x[special] = 1000  # special rows are extreme: they must not leak into the covariance
    store = actstore.from_arrays({"blocks.0.hook_resid_post": x}, str(tmp_path / "s"), shard_tokens=700,
                                 tokens={"special": special})
    res = actstore.spectrum(store, "blocks.0.hook_resid_post")
    ref = np.linalg.eigvalsh(np.cov(x[~special].astype(np.float64), rowvar=False))[::-1]
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-6, atol=1e-9 * ref[0])
    assert res.metrics["n_samples"] == int((~special).sum())


def test_gaussian_has_no_outliers_and_spike_is_found(tmp_path):
    rng = np.random.default_rng(1)
    n, d, sigma = 20000, 64, 1.3
    noise = rng.standard_normal((n, d)) * sigma
    store = actstore.from_arrays({"blocks.0.hook_resid_post": noise.astype(np.float32)}, str(tmp_path / "g"),
                                 shard_tokens=6000)
    res = actstore.spectrum(store, "blocks.0.hook_resid_post")
    assert res.metrics["n_outliers"] == 0 and res.metrics["ks"] < 0.05
    assert res.metrics["sigma2"] == pytest.approx(sigma**2, rel=0.02)
    u = np.linalg.qr(rng.standard_normal((d, 2)))[0]
    ell = np.array([6.0, 3.0])  # spike strengths in units of sigma^2, far above sqrt(q)
    spiked = noise + (rng.standard_normal((n, 2)) * np.sqrt(ell) * sigma) @ u.T
    store2 = actstore.from_arrays({"blocks.0.hook_resid_post": spiked.astype(np.float32)}, str(tmp_path / "k"))
    res2 = actstore.spectrum(store2, "blocks.0.hook_resid_post")
    q = d / n
    assert res2.metrics["n_outliers"] == 2
    np.testing.assert_allclose(res2.outliers, (1 + ell) * (1 + q / ell) * sigma**2, rtol=0.05)


def test_windowed_descriptors_track_a_variance_change(tmp_path):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal((2000, 16)), 3 * rng.standard_normal((2000, 16))]).astype(np.float32)
    store = actstore.from_arrays({"blocks.0.hook_resid_post": x}, str(tmp_path / "w"), shard_tokens=1500)
    rows = windowed(store, "blocks.0.hook_resid_post", 1000)
    assert len(rows) == 4
    var = [r["total_variance"] for r in rows]
    assert var[2] / var[1] == pytest.approx(9, rel=0.2)
