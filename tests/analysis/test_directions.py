"""Direction files: each maker against numbers computed here from the stored arrays (numpy float64)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

import actstore
from actstore.pipeline.analysis import directions
from actstore.pipeline.analysis.directions import Direction

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """60 documents of 20 tokens, 8 dims; label 1 documents are shifted along a planted direction."""
    rng = np.random.default_rng(0)
    n_docs, per, d = 60, 20, 8
    labels = np.arange(n_docs) % 2
    doc = np.repeat(np.arange(n_docs), per)
    x = rng.standard_normal((n_docs * per, d)) * np.linspace(0.5, 3, d)
    x[labels[doc] == 1] += np.array([2, -1, 0, 0, 0, 0, 0, 1.0])
    tokens = {"doc_id": doc, "position": np.tile(np.arange(per), n_docs), "special": np.tile(np.arange(per), n_docs) == 0}
    docs = {"doc_id": np.arange(n_docs), "label": labels, "topic": np.array(["a", "b", "c"] * 20)}
    root = tmp_path_factory.mktemp("dirs") / "s"
    return actstore.from_arrays({HOOK: x.astype(np.float32)}, str(root), tokens=tokens, docs=docs, shard_tokens=300)


def _doc_means(store):
    x = store.to_numpy(HOOK).astype(np.float64)
    tok = store.tokens()
    doc, special = tok.column("doc_id").to_numpy(), store.special_mask()
    return np.stack([x[(doc == i) & ~special].mean(0) for i in range(60)])


def test_mean_difference_equals_numpy_and_round_trips(store, tmp_path):
    m = _doc_means(store)
    y = np.arange(60) % 2
    ref = m[y == 1].mean(0) - m[y == 0].mean(0)
    d = directions.mean_difference(store, HOOK, "label")
    np.testing.assert_allclose(d.vectors[0], ref, rtol=1e-5, atol=1e-6)
    assert (d.hook, d.method, d.params["positive"]) == (HOOK, "mean_difference", 1)
    path = d.save(tmp_path / "md.safetensors")
    back = directions.load(path)
    np.testing.assert_array_equal(back.vectors, d.vectors)
    assert back.hook == HOOK and back.source["store_manifest_sha256"] == store.manifest_sha256
    with safe_open(path, "np") as f:  # readable by any safetensors reader, metadata as JSON
        meta = json.loads(f.metadata()["actstore"])
        assert f.get_tensor("vectors").shape == (1, 8)
    assert meta["method"] == "mean_difference" and meta["norm"][0] == pytest.approx(np.linalg.norm(ref), rel=1e-5)
    flipped = directions.mean_difference(store, HOOK, "label", positive=0)
    np.testing.assert_allclose(flipped.vectors, -d.vectors, rtol=1e-6)


def test_whitened_mean_difference_is_the_lda_direction(store):
    m = _doc_means(store)
    y = np.arange(60) % 2
    delta = m[y == 1].mean(0) - m[y == 0].mean(0)
    c = np.concatenate([m[y == 1] - m[y == 1].mean(0), m[y == 0] - m[y == 0].mean(0)])
    s_w = c.T @ c / 58
    ref = np.linalg.solve(s_w + 0.01 * np.trace(s_w) / 8 * np.eye(8), delta)
    d = directions.mean_difference(store, HOOK, "label", whiten=True)
    np.testing.assert_allclose(d.vectors[0], ref, rtol=1e-4)
    with pytest.raises(actstore.ConfigError, match="3 classes; name the positive"):
        directions.mean_difference(store, HOOK, "topic")
    assert directions.mean_difference(store, HOOK, "topic", positive="a").params["n_positive"] == 20


def test_from_probe_is_the_logit_gradient_in_raw_units(store):
    import torch

    res = actstore.train_probe(store, HOOK, label="label")
    d = directions.from_probe(res)
    x = torch.as_tensor(_doc_means(store)[:3], dtype=torch.float64).requires_grad_(True)
    res.model(x)[:, 0].sum().backward()  # a linear probe's logit gradient: the same direction for every row
    grad = x.grad[0].numpy()
    np.testing.assert_allclose(d.vectors[0], grad / np.linalg.norm(grad), atol=1e-6)
    assert d.hook == HOOK and d.params["label"] == "label"
    assert float(d.vectors[0] @ np.array([2, -1, 0, 0, 0, 0, 0, 1]) / np.sqrt(6)) > 0.8


def test_from_spectrum_gives_the_top_eigenvectors(store, tmp_path):
    from actstore.pipeline.analysis.spectra import save_spectrum

    res = actstore.spectrum(store, HOOK, basis="covariance")
    d = directions.from_spectrum(res, k=2, store=store, hook=HOOK)
    x = store.to_numpy(HOOK)[~store.special_mask()].astype(np.float64)
    vals, vecs = np.linalg.eigh(np.cov(x.T))
    for i in range(2):
        assert abs(float(d.vectors[i] @ vecs[:, -1 - i])) == pytest.approx(1.0, abs=1e-5)
    assert d.params["eigenvalues"] == pytest.approx(vals[::-1][:2].tolist(), rel=1e-6)
    # the default correlation basis: eigenvectors u of corrcoef, mapped back to activation space as D^1/2 u
    corr = directions.from_spectrum(actstore.spectrum(store, HOOK), k=2, store=store, hook=HOOK)
    cvals, cvecs = np.linalg.eigh(np.corrcoef(x.T))
    for i in range(2):
        back = cvecs[:, -1 - i] * x.std(0, ddof=1)
        assert abs(float(corr.vectors[i] @ back / np.linalg.norm(back))) == pytest.approx(1.0, abs=1e-5)
    assert corr.params["basis"] == "correlation"
    assert corr.params["eigenvalues"] == pytest.approx(cvals[::-1][:2].tolist(), rel=1e-5)
    path = save_spectrum(res, str(tmp_path / f"spectrum-{HOOK}.json"), HOOK, store)
    np.testing.assert_allclose(directions.from_spectrum(path, k=2).vectors, d.vectors, atol=1e-6)
    with pytest.raises(actstore.AnalysisError, match="does not match"):
        directions.from_spectrum(res, k=1, store=store, hook=HOOK, max_tokens=100)


def test_from_sae_takes_decoder_rows_and_its_hook(tmp_path):
    from actstore.workers.sae.model import SAEConfig, SparseAutoencoder
    from actstore.workers.sae.saelens import save_saelens

    sae = SparseAutoencoder(SAEConfig(d_in=8, expansion=4, k=4), seed=3)
    save_saelens(sae, tmp_path / "sae", HOOK, extra_metadata={"model_name": "m"})
    d = directions.from_sae(tmp_path / "sae", [5, 0])
    np.testing.assert_array_equal(d.vectors, sae.W_dec.detach().numpy()[[5, 0]])
    assert d.hook == HOOK and d.source["model"] == "m" and d.params["latents"] == [5, 0]
    with pytest.raises(actstore.ConfigError, match="not in \\[0, d_sae=32\\)"):
        directions.from_sae(tmp_path / "sae", [32])


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(actstore.ConfigError, match="does not exist"):
        directions.load(tmp_path / "none.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(actstore.ConfigError, match="not an actstore direction file"):
        directions.load(tmp_path / "x.safetensors")
    with pytest.raises(actstore.AnalysisError, match="NaN"):
        Direction(np.array([np.nan, 1.0]), None, "manual")
