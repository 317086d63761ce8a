"""actstore.spectrum on stores: equals numpy on the stored data in both bases and precisions; noise and
anisotropic independent columns have no outliers under either null; planted directions are found; the
permutation null is reproducible; and on real MiniLM activations the correlation basis says something true."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import actstore
from actstore.pipeline.analysis.spectra import windowed

HOOK = "blocks.0.hook_resid_post"


def _corr_eigs(x: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(np.corrcoef(x.astype(np.float64), rowvar=False))[::-1]


def _cov_eigs(x: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False))[::-1]


def _within_contract(got: np.ndarray, ref: np.ndarray, tol: float = 1e-6) -> None:
    """|λᵢ - λᵢʳᵉᶠ| <= tol·λ₁ʳᵉᶠ for every eigenvalue (the float32 products' contract)."""
    assert got.shape == ref.shape
    err = float(np.max(np.abs(got - ref)) / ref[0])
    assert err <= tol, err


def test_eigenvalues_equal_numpy(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 24)) @ rng.standard_normal((24, 24)) + 50).astype(np.float16)
    special = np.zeros(3000, bool)
    special[::10] = True
    x[special] = 1000  # special rows are extreme: they must not leak into the covariance
    store = actstore.from_arrays({HOOK: x}, str(tmp_path / "s"), shard_tokens=700, tokens={"special": special})
    res = actstore.spectrum(store, HOOK)  # defaults: correlation basis, MP null, float32 products
    assert res.basis == "correlation" and res.null == "mp" and res.metrics["n_samples"] == int((~special).sum())
    _within_contract(res.eigenvalues, _corr_eigs(x[~special]))
    cov = actstore.spectrum(store, HOOK, basis="covariance", precision="float64")
    ref = _cov_eigs(x[~special])
    np.testing.assert_allclose(cov.eigenvalues, ref, rtol=1e-6, atol=1e-9 * ref[0])


def _offset_store(tmp_path, n=6000, d=32):
    """Independent float16 columns with scales 0.2..2 and offsets, every 13th row special."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((n, d)) * np.linspace(0.2, 2, d) + 3 + rng.standard_normal(d)).astype(np.float16)
    special = np.zeros(n, bool)
    special[::13] = True
    store = actstore.from_arrays({HOOK: x}, str(tmp_path / "o"), shard_tokens=2500, tokens={"special": special})
    return store, x[~special]


def test_many_small_tasks_add_up_exactly(tmp_path, monkeypatch):
    """Several blocks per shard (a tree of additions of partials around one shift) give the same covariance."""
    from actstore.pipeline.analysis import spectra

    store, kept = _offset_store(tmp_path)
    monkeypatch.setattr(spectra, "_TASK_BYTES", 1)  # one Zarr chunk per task
    monkeypatch.setattr(spectra, "_FAN_IN", 3)  # a reduction tree several levels deep
    res = actstore.spectrum(store, HOOK, basis="covariance", precision="float64")
    np.testing.assert_allclose(res.eigenvalues, _cov_eigs(kept), rtol=1e-9)
    _, _, n = spectra.covariance(store, HOOK, max_tokens=3000)
    assert n == int((~store.special_mask()[:3000]).sum())
    # Permuted within each small task, the null still keeps every column's values: independent columns stay
    # free of outliers in both bases; MP on the raw covariance of these anisotropic columns is not.
    for basis in ("correlation", "covariance"):
        perm = actstore.spectrum(store, HOOK, basis=basis, null="permutation")
        assert perm.metrics["n_outliers"] == 0 and perm.metrics["n_permutations"] == 3
    assert actstore.spectrum(store, HOOK, basis="covariance").metrics["n_outliers"] > 16


@pytest.mark.parametrize("basis", ["correlation", "covariance"])
def test_float32_precision_within_contract_of_float64(tmp_path, basis):
    store, kept = _offset_store(tmp_path)
    r32 = actstore.spectrum(store, HOOK, basis=basis, precision="float32")
    r64 = actstore.spectrum(store, HOOK, basis=basis, precision="float64")
    ref = _corr_eigs(kept) if basis == "correlation" else _cov_eigs(kept)
    np.testing.assert_allclose(r64.eigenvalues, ref, rtol=1e-9)
    _within_contract(r32.eigenvalues, ref)
    with pytest.raises(ValueError, match="precision"):
        actstore.spectrum(store, HOOK, precision="float16")


def test_bad_basis_null_and_permutations_fail_before_reading(tmp_path):
    store, _ = _offset_store(tmp_path)
    for kw, word in (({"basis": "raw"}, "basis"), ({"null": "bootstrap"}, "null"),
                     ({"null": "permutation", "permutations": 0}, "permutations")):
        with pytest.raises(actstore.ConfigError, match=word):
            actstore.spectrum(store, HOOK, **kw)


def test_cli_precision_flag(tmp_path, capsys):
    from actstore.cli import main

    store, kept = _offset_store(tmp_path)
    ref = _corr_eigs(kept)
    out = {}
    for p in ("float64", "float32"):
        assert main(["spectra", store.url, "--precision", p, "--json", "--out", str(tmp_path / p)]) == 0
        out[p] = json.loads(capsys.readouterr().out)[0]
        doc = json.loads((tmp_path / p / f"spectrum-{HOOK}.json").read_text())
        assert doc["basis"] == "correlation" and doc["null"] == "mp" and doc["hook"] == HOOK
        _within_contract(np.array(doc["eigenvalues"]), ref, 1e-9 if p == "float64" else 1e-6)
    assert out["float32"]["n_samples"] == out["float64"]["n_samples"]


def test_special_mask_matches_token_index(tmp_path):
    store, _ = _offset_store(tmp_path)
    want = store.tokens().column("special").to_numpy(zero_copy_only=False).astype(bool)
    np.testing.assert_array_equal(store.special_mask(), want)


def test_gaussian_has_no_outliers_and_spikes_are_found(tmp_path):
    rng = np.random.default_rng(1)
    n, d, sigma = 20000, 64, 1.3
    noise = rng.standard_normal((n, d)) * sigma
    store = actstore.from_arrays({HOOK: noise.astype(np.float32)}, str(tmp_path / "g"), shard_tokens=6000)
    for basis in ("correlation", "covariance"):
        for null in ("mp", "permutation"):
            m = actstore.spectrum(store, HOOK, basis=basis, null=null).metrics
            assert m["n_outliers"] == 0 and m["ks"] < 0.05, (basis, null)
            assert m["sigma2"] == pytest.approx(sigma**2 if basis == "covariance" else 1.0, rel=0.02)
    u = np.linalg.qr(rng.standard_normal((d, 2)))[0]
    ell = np.array([6.0, 3.0])  # spike strengths in units of sigma^2, far above sqrt(q)
    spiked = noise + (rng.standard_normal((n, 2)) * np.sqrt(ell) * sigma) @ u.T
    scales = np.exp(rng.normal(0, 1.5, d))  # anisotropic columns: the correlation basis does not care
    store2 = actstore.from_arrays({HOOK: (spiked * scales).astype(np.float32)}, str(tmp_path / "k"))
    for null in ("mp", "permutation"):
        assert actstore.spectrum(store2, HOOK, null=null).metrics["n_outliers"] == 2
    store3 = actstore.from_arrays({HOOK: spiked.astype(np.float32)}, str(tmp_path / "k3"))
    res = actstore.spectrum(store3, HOOK, basis="covariance")
    q = d / n
    assert res.metrics["n_outliers"] == 2
    np.testing.assert_allclose(res.outliers, (1 + ell) * (1 + q / ell) * sigma**2, rtol=0.05)


def test_permutation_null_is_reproducible_and_seeded(tmp_path, monkeypatch):
    from actstore.pipeline.analysis import spectra

    store, _ = _offset_store(tmp_path)
    monkeypatch.setattr(spectra, "_TASK_BYTES", 1)
    runs = [actstore.spectrum(store, HOOK, null="permutation", scheduler=s, seed=7) for s in ("sync", "threads")]
    assert runs[0].metrics["permutation_edge"] == runs[1].metrics["permutation_edge"]
    other = actstore.spectrum(store, HOOK, null="permutation", seed=8)
    assert other.metrics["permutation_edge"] != runs[0].metrics["permutation_edge"]
    # The data's own spectrum does not depend on the seed (up to the float32 products' summation order, which
    # the number of BLAS threads changes).
    np.testing.assert_allclose(other.eigenvalues, runs[0].eigenvalues, rtol=1e-7)


def test_permutation_null_permutes_across_blocks_so_block_drift_stays_structure(tmp_path, monkeypatch):
    """Rows stored in order drift: here every 1,000-row block has its own offset along one direction u, a real
    correlated direction of the data. A null permuted within each block would keep that drift and hide it; the
    null permutes a sample drawn from the whole store, so the drift direction is one outlier under both nulls."""
    from actstore.pipeline.analysis import spectra

    rng = np.random.default_rng(4)
    n, d = 16_000, 40
    u = rng.standard_normal(d) / math.sqrt(d)
    offsets = np.repeat(rng.standard_normal(n // 1000) * 6.0, 1000)
    x = (rng.standard_normal((n, d)) + offsets[:, None] * u).astype(np.float32)
    store = actstore.from_arrays({HOOK: x}, str(tmp_path / "d"), shard_tokens=1000)
    monkeypatch.setattr(spectra, "_TASK_BYTES", 1)  # one task per 1,000-row block
    for null_rows in (100_000, 4000):  # all rows, and a sample
        m = actstore.spectrum(store, HOOK, null="permutation", null_rows=null_rows).metrics
        assert m["n_outliers_mp"] == 1 and m["n_outliers"] == 1, m
        assert m["permutation_edge"] == pytest.approx(m["mp_edge"], abs=0.05)


def test_spectrum_json_names_basis_null_and_massive_dims(tmp_path):
    from actstore.pipeline.analysis.spectra import save_spectrum

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 16)).astype(np.float32)
    x[:, 9] *= 20  # a massive dimension: 400x the median variance
    store = actstore.from_arrays({HOOK: x}, str(tmp_path / "m"))
    res = actstore.spectrum(store, HOOK, null="permutation")
    save_spectrum(res, str(tmp_path / "s.json"), HOOK)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["basis"] == "correlation" and doc["null"] == "permutation"
    assert doc["massive_dims"][0]["dim"] == 9 and doc["metrics"]["n_massive_dims"] == 1
    assert doc["metrics"]["n_outliers"] == doc["metrics"]["n_outliers_permutation"] == 0
    assert doc["metrics"]["n_outliers_mp"] == 0


def test_windowed_descriptors_track_a_variance_change(tmp_path):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal((2000, 16)), 3 * rng.standard_normal((2000, 16))]).astype(np.float32)
    store = actstore.from_arrays({HOOK: x}, str(tmp_path / "w"), shard_tokens=1500)
    rows = windowed(store, HOOK, 1000)
    assert len(rows) == 4
    var = [r["total_variance"] for r in rows]
    assert var[2] / var[1] == pytest.approx(9, rel=0.2)
    assert all(r["n_outliers"] == 0 for r in rows)


def test_real_minilm_correlation_spectrum_is_meaningful(tmp_path, minilm):
    """Real activations (MiniLM-L6 over stdlib help texts): the raw covariance makes MP call nearly every
    eigenvalue an outlier; the correlation basis finds a minority of correlated directions, the permutation
    null (same marginals) agrees or is stricter, and the dimension that dominates the raw covariance (63, a
    known outlier dimension of this model's residual stream) is named."""
    from actstore.demo import demo_corpus
    from tests.support import extract_local

    hook = "blocks.1.hook_resid_post"
    store = extract_local(minilm, tmp_path / "s", [hook], demo_corpus(150), context_length=128, packing=False,
                          shard_tokens=4096, batch_size=32, dtype="float16")
    d = 384
    raw = actstore.spectrum(store, hook, basis="covariance")
    corr = actstore.spectrum(store, hook, null="permutation")
    m = corr.metrics
    assert m["n_samples"] > 10 * d and m["d"] == d
    assert raw.metrics["n_outliers"] > 0.75 * d
    assert 10 <= m["n_outliers_mp"] < d // 3
    assert 1 <= m["n_outliers_permutation"] <= m["n_outliers_mp"] + 2
    assert m["permutation_edge"] > 1.0 and m["mp_edge"] == pytest.approx((1 + math.sqrt(m["q"])) ** 2)
    assert corr.massive_dims[0]["dim"] == 63 and corr.massive_dims[0]["variance_ratio"] > 5
    r64 = actstore.spectrum(store, hook, precision="float64")
    _within_contract(corr.eigenvalues, r64.eigenvalues)
