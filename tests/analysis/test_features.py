"""Feature stores: `encode` equals the SAE's own dense encode, resumes byte-identically and reads without actstore;
`features` equals numpy over the dense codes; the top-N merge equals a brute-force sort."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

import actstore
from actstore.pipeline.analysis.feature_stats import TopN, features
from actstore.pipeline.analysis.features import encode, open_features, pooled_features
from actstore.workers.sae.model import SAEConfig, SparseAutoencoder
from actstore.workers.sae.saelens import save_saelens
from tests.support import corpus_texts, extract_local, tree_digest

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("feat")
    model = tiny_lm("gpt2")
    docs = [{"text": t[:250], "label": i % 2, "score": float(i)} for i, t in enumerate(corpus_texts(24))]
    store = extract_local(model, root / "s", [HOOK], docs, context_length=32, shard_tokens=256)
    sae = SparseAutoencoder(SAEConfig(d_in=32, expansion=4, k=6), seed=1)
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    save_saelens(sae, root / "sae", HOOK, extra_metadata={"model_name": model})
    return root, store, sae


def _dense(store, sae) -> np.ndarray:
    with torch.no_grad():
        return sae.encode(torch.as_tensor(store.to_numpy(HOOK))).numpy()


def test_encode_equals_the_sae_and_reads_without_actstore(world):
    root, store, sae = world
    fs = encode(store, root / "sae", str(root / "f"), progress=False)
    assert (fs.hook, fs.k, fs.d_sae, fs.n_tokens) == (HOOK, 6, 128, store.n_tokens)
    dense = _dense(store, sae)
    ids = np.concatenate([fs.codes(i)[0] for i in range(len(fs.shards))])
    vals = np.concatenate([fs.codes(i)[1] for i in range(len(fs.shards))])
    assert ids.dtype == np.int32 and vals.dtype == np.float16
    mine = np.zeros_like(dense)
    rows, cols = np.nonzero(ids >= 0)
    mine[rows, ids[rows, cols]] = vals[rows, cols]
    np.testing.assert_allclose(mine, dense.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-3)
    assert ((ids >= 0) == (vals > 0)).all() and (np.diff(vals.astype(np.float32), axis=1) <= 0).all()
    # plain zarr + pyarrow, no actstore: the same arrays and the source's token index bytes
    sid = store.manifest.shards[1].id
    g = zarr.open_group(str(root / "f" / "shards" / sid / "codes.zarr"), mode="r")
    np.testing.assert_array_equal(g["latent_ids"][:], fs.codes(1)[0])
    assert (root / "f" / "shards" / sid / "tokens.parquet").read_bytes() == \
        (root / "s" / "shards" / sid / "tokens.parquet").read_bytes()
    man = json.loads((root / "f" / "features.json").read_text())
    assert man["source"]["store_manifest_sha256"] == store.manifest_sha256 and len(man["shards"]) == len(store.manifest.shards) > 1


def test_encode_resumes_byte_identically(world, tmp_path, monkeypatch):
    root, store, _ = world
    whole = encode(store, root / "sae", str(tmp_path / "whole"), progress=False, k=4)
    from actstore.workers import feature_store

    real = feature_store.write_codes_shard
    calls = []

    def flaky(fs, r, shard_id, *a, **k):
        calls.append(shard_id)
        if len(calls) == 3:
            raise RuntimeError("stopped")
        return real(fs, r, shard_id, *a, **k)

    monkeypatch.setattr(feature_store, "write_codes_shard", flaky)
    with pytest.raises(RuntimeError, match="stopped"):
        encode(store, root / "sae", str(tmp_path / "part"), progress=False, k=4, scheduler=None)
    assert not (tmp_path / "part" / "features.json").exists()
    with pytest.raises(actstore.StoreError, match="interrupted"):
        open_features(str(tmp_path / "part"))
    monkeypatch.setattr(feature_store, "write_codes_shard", real)
    done = encode(store, root / "sae", str(tmp_path / "part"), progress=False, k=4)
    digest = {k: v for k, v in tree_digest(tmp_path / "part").items() if not k.startswith("features")}
    assert digest == {k: v for k, v in tree_digest(tmp_path / "whole").items() if not k.startswith("features")}
    assert done.manifest["shards"] == whole.manifest["shards"]


def test_features_equal_numpy(world):
    root, store, sae = world
    fs = encode(store, root / "sae", str(root / "f"), progress=False)
    res = features(fs, top_n=3, window=2, label="score", out=str(root / "f" / "summary"))
    dense = np.zeros((fs.n_tokens, fs.d_sae))
    for i, s in enumerate(fs.shards):
        dense[s["token_start"]:s["token_end"]] = fs.dense(i)
    keep = ~store.special_mask()
    x = dense[keep]
    lat = res.latents
    np.testing.assert_array_equal(lat.column("count").to_numpy(), (x > 0).sum(0))
    np.testing.assert_allclose(lat.column("density").to_numpy(), (x > 0).mean(0))
    np.testing.assert_allclose(lat.column("max_activation").to_numpy(), x.max(0), rtol=1e-6)
    np.testing.assert_allclose(lat.column("mean_all").to_numpy(), x.mean(0), rtol=1e-6)
    # top contexts: the 3 largest values per latent (ties: earlier row), among non-special rows
    ctx = res.contexts
    rows = np.flatnonzero(keep)
    for j in np.flatnonzero((x > 0).sum(0) >= 3)[:20]:
        order = np.lexsort((rows, -x[:, j]))[:3]
        got = ctx.filter(np.asarray(ctx.column("latent").to_numpy() == j)).sort_by("rank")
        assert got.column("row").to_pylist() == rows[order].tolist()
    # per-document counts and the label correlation
    doc = store.tokens().column("doc_id").to_numpy()[keep]
    dc = res.doc_counts
    for d_id, l_id, c in zip(*(dc.column(k).to_numpy()[:50] for k in ("doc_id", "latent", "count"))):
        assert c == (x[doc == d_id, l_id] > 0).sum()
    per_doc = np.stack([x[doc == d].mean(0) for d in range(24)])
    ref = [np.corrcoef(per_doc[:, j], np.arange(24.0))[0, 1] if per_doc[:, j].std() > 0 else np.nan
           for j in range(fs.d_sae)]
    np.testing.assert_allclose(lat.column("label_correlation").to_numpy(zero_copy_only=False), ref, atol=1e-9)
    # text windows: the highlighted span is the token's own text
    for r in ctx.slice(0, 30).to_pylist():
        assert r["text"][r["highlight_start"]:r["highlight_end"]] == r["token"]
    summary = json.loads((root / "f" / "summary" / "features-summary.json").read_text())
    assert summary["provenance"]["store_manifest_sha256"] == store.manifest_sha256
    assert len(summary["lists"]["most_frequent"]) == 12


def test_top_n_merge_equals_brute_force():
    rng = np.random.default_rng(0)
    top = TopN(7, 4)
    lat_all, val_all, row_all = [], [], []
    for b in range(6):
        n = 50
        lat = rng.integers(0, 7, n)
        val = rng.integers(0, 5, n).astype(np.float32)  # many ties
        row = b * 100 + np.arange(n)
        top.update(lat, val, row)
        lat_all.append(lat), val_all.append(val), row_all.append(row)
    lat, val, row = (np.concatenate(a) for a in (lat_all, val_all, row_all))
    for j in range(7):
        m = lat == j
        order = np.lexsort((row[m], -val[m]))[:4]
        assert top.row[j].tolist() == row[m][order].tolist()
        assert top.value[j].tolist() == val[m][order].tolist()


def test_probe_on_latents(world):
    root, store, _ = world
    fs = encode(store, root / "sae", str(root / "f"), progress=False)
    ids, x = pooled_features(fs, "mean", block_bytes=4096)
    dense = np.concatenate([fs.dense(i) for i in range(len(fs.shards))])
    tok = store.tokens()
    doc, keep = tok.column("doc_id").to_numpy(), ~store.special_mask()
    np.testing.assert_allclose(x, np.stack([dense[(doc == d) & keep].mean(0) for d in ids]), rtol=1e-5, atol=1e-7)
    res = actstore.train_probe(store, label="label", features=f"sae:{fs.url}")
    assert res.info["hook"] == HOOK and res.info["features"] == f"sae:{fs.url}" and 0 <= res.metrics["auroc"] <= 1
    other = extract_local(store.manifest.model.id, root / "other", [HOOK],
                          [{"text": "a different corpus entirely", "label": i % 2} for i in range(4)], context_length=32)
    with pytest.raises(actstore.ConfigError, match="was encoded from"):
        actstore.train_probe(other, label="label", features=f"sae:{fs.url}")


def test_written_summary_matches(world):
    root, store, _ = world
    fs = encode(store, root / "sae", str(root / "f"), progress=False)
    features(fs, top_n=2, out=str(root / "f" / "summary"))
    lat = pq.read_table(root / "f" / "summary" / "latents.parquet")
    assert lat.num_rows == fs.d_sae and "label_correlation" not in lat.column_names
