"""actstore.train_probe on stores: labels from docs.parquet, document-level split, layer sweep."""

from __future__ import annotations

import numpy as np
import pytest

import actstore
from actstore.pipeline.analysis.pooling import pooled
from actstore.pipeline.analysis.probes import probe_sweep


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    n_docs, per = 120, 12
    doc = np.repeat(np.arange(n_docs), per)
    label = rng.integers(0, 2, n_docs)
    signal = np.where(label[doc][:, None] == 1, 1.0, -1.0) * np.eye(8)[0]
    l0 = rng.standard_normal((len(doc), 8)) + 2 * signal  # layer 0: separable along dim 0
    l1 = rng.standard_normal((len(doc), 8))  # layer 1: no information
    special = np.zeros(len(doc), bool)
    special[::per] = True
    l0[special] = 1e3  # special tokens must not leak into pooling
    docs = {"doc_id": np.arange(n_docs), "label": label, "shuffled": rng.permutation(label)}
    return actstore.from_arrays({"blocks.0.hook_resid_post": l0.astype(np.float32),
                                 "blocks.1.hook_resid_post": l1.astype(np.float32)},
                                str(tmp_path_factory.mktemp("p") / "s"), tokens={"doc_id": doc, "special": special},
                                docs=docs, shard_tokens=500)


def test_pooling_matches_numpy(store):
    ids, x = pooled(store, "blocks.0.hook_resid_post", "mean")
    tok = store.tokens().to_pandas()
    acts = store.activations("blocks.0.hook_resid_post").compute()
    for d in (0, 7, 119):
        rows = tok.index[(tok.doc_id == d) & ~tok.special]
        np.testing.assert_allclose(x[list(ids).index(d)], acts[rows].mean(0), rtol=1e-6)


def test_probe_separable_and_shuffled(store):
    res = actstore.train_probe(store, "blocks.0.hook_resid_post", "label", threads=1)
    assert res.metrics["auroc"] == 1.0
    assert not set(res.split["train"]) & set(res.split["test"])
    bad = actstore.train_probe(store, "blocks.0.hook_resid_post", "shuffled", threads=1)
    assert abs(bad.metrics["auroc"] - 0.5) < 0.2


def test_unknown_label(store):
    with pytest.raises(ValueError, match="not a document field.*label"):
        actstore.train_probe(store, "blocks.0.hook_resid_post", "sentiment")


@pytest.mark.dask
def test_layer_sweep_on_local_dask_cluster(store, tmp_path):
    from actstore.pipeline.analysis.dask_client import dask_client

    with dask_client():
        sweep = probe_sweep(store, "label", threads=1)
    assert [r["hook"] for r in sweep.table] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert sweep.table[0]["auroc"] == 1.0 and sweep.table[1]["auroc"] < 0.8
    sweep.plot(str(tmp_path), "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
