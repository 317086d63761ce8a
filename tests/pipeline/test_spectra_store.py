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


def _offset_store(tmp_path, n=6000, d=32):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((n, d)) * np.linspace(0.2, 2, d) + 3 + rng.standard_normal(d)).astype(np.float16)
    special = np.zeros(n, bool)
    special[::13] = True
    store = actstore.from_arrays({"blocks.0.hook_resid_post": x}, str(tmp_path / "o"), shard_tokens=2500,
                                 tokens={"special": special})
    ref = np.linalg.eigvalsh(np.cov(x[~special].astype(np.float64), rowvar=False))[::-1]
    return store, ref


def test_many_small_tasks_add_up_exactly(tmp_path, monkeypatch):
    """Several blocks per shard (flat reduction of partials around one shift) give the same covariance."""
    from actstore.pipeline import spectra

    store, ref = _offset_store(tmp_path)
    monkeypatch.setattr(spectra, "_TASK_BYTES", 1)  # one Zarr chunk per task
    res = actstore.spectrum(store, "blocks.0.hook_resid_post")
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-9)
    _, _, n = spectra.covariance(store, "blocks.0.hook_resid_post", max_tokens=3000)
    assert n == int((~store.special_mask()[:3000]).sum())


def test_float32_precision_close_to_float64(tmp_path):
    """precision="float32": float32 block products, float64 accumulation; eigenvalues stay close."""
    store, ref = _offset_store(tmp_path)
    res = actstore.spectrum(store, "blocks.0.hook_resid_post", precision="float32")
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-4, atol=1e-6 * ref[0])
    with pytest.raises(ValueError, match="precision"):
        actstore.spectrum(store, "blocks.0.hook_resid_post", precision="float16")


def test_cli_precision_flag(tmp_path, capsys):
    import json

    from actstore.cli import main

    store, ref = _offset_store(tmp_path)
    out = {}
    for p in ("float64", "float32"):
        assert main(["spectra", store.url, "--precision", p, "--json", "--out", str(tmp_path / p)]) == 0
        out[p] = json.loads(capsys.readouterr().out)[0]
        ev = np.array(json.loads((tmp_path / p / "spectrum-blocks.0.hook_resid_post.json").read_text())["eigenvalues"])
        np.testing.assert_allclose(ev, ref, rtol=1e-9 if p == "float64" else 1e-4, atol=1e-6 * ref[0])
    assert out["float32"]["n_samples"] == out["float64"]["n_samples"]


def test_special_mask_matches_token_index(tmp_path):
    store, _ = _offset_store(tmp_path)
    want = store.tokens().column("special").to_numpy(zero_copy_only=False).astype(bool)
    np.testing.assert_array_equal(store.special_mask(), want)


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
