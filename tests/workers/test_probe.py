"""Probe metrics (against scikit-learn), pooling, document splits and probe training on planted data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from actstore.workers.probe import (
    PoolAccumulator,
    ProbeConfig,
    pool,
    split_by_document,
    train_probe_arrays,
)
from actstore.workers.probe_metrics import binary_metrics, multiclass_metrics

# Probe matrices are tiny; one thread avoids OpenMP spin-waiting on the shared 2-core test machines.
FAST = {"threads": 1}


# ------------------------------------------------------------------------------------------- metrics


def _sk_recall_at_fpr(y, s, target):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return tpr[fpr <= target].max()


@pytest.mark.parametrize("n, levels, seed", [(50, 3, 0), (400, 10, 1), (1000, None, 2), (3000, 40, 3)])
def test_binary_metrics_match_sklearn(n, levels, seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.random(n) + 0.3 * y  # informative but imperfect
    if levels is not None:  # quantise to force many ties, across and within classes
        s = np.round(s * levels) / levels
    got = binary_metrics(y.astype(int), s, threshold=0.55)
    pred = s >= 0.55
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred), abs=1e-12)
    assert got["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0), abs=1e-12)
    assert got["recall"] == pytest.approx(skm.recall_score(y, pred), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert got["recall_at_1pct_fpr"] == pytest.approx(_sk_recall_at_fpr(y, s, 0.01), abs=1e-12)
    assert got["recall_at_5pct_fpr"] == pytest.approx(_sk_recall_at_fpr(y, s, 0.05), abs=1e-12)


def test_binary_metrics_edge_cases():
    y = np.array([True, True, False, False])
    assert binary_metrics(y, [0.9, 0.8, 0.1, 0.2])["recall_at_1pct_fpr"] == 1.0
    # Every score tied: the only thresholds are "nothing" and "everything", so recall at a 1% FPR budget is 0.
    tied = binary_metrics(y, [0.5, 0.5, 0.5, 0.5])
    assert tied["auroc"] == 0.5 and tied["recall_at_1pct_fpr"] == 0.0
    single = binary_metrics([1, 1, 1], [0.2, 0.4, 0.9])
    assert np.isnan(single["auroc"]) and np.isnan(single["recall_at_5pct_fpr"])
    with pytest.raises(ValueError, match="y_true"):
        binary_metrics([0, 2, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("k, seed", [(3, 0), (5, 1)])
def test_multiclass_metrics_match_sklearn(k, seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 600
    y = rng.integers(0, k, n)
    # Small integer weights normalised per row: many exactly-equal probabilities (ties) and rows summing to 1.
    w = rng.integers(1, 4, (n, k)).astype(float)
    w[np.arange(n), y] += rng.integers(0, 3, n)  # some signal
    probs = w / w.sum(1, keepdims=True)
    got = multiclass_metrics(y, probs)
    pred = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"),
                                         abs=1e-12)
    for name, t in (("recall_at_1pct_fpr", 0.01), ("recall_at_5pct_fpr", 0.05)):
        ref = np.mean([_sk_recall_at_fpr(y == c, probs[:, c], t) for c in range(k)])
        assert got[name] == pytest.approx(ref, abs=1e-12)


# ------------------------------------------------------------------------------------------- pooling


def _loop_pool(acts, doc_ids, special, how):
    """The obvious reference: gather each document's non-special rows in row order and reduce them."""
    out = {}
    for doc in sorted(set(doc_ids.tolist())):
        rows = [i for i in range(len(doc_ids)) if doc_ids[i] == doc and not special[i]]
        if not rows:
            continue
        block = acts[rows].astype(np.float64)
        out[doc] = {"mean": block.mean(0), "max": block.max(0), "last": block[-1]}[how]
    return out


def _token_table(rng, n_docs=25, d=6, dtype=np.float32):
    """Tokens of variable-length documents, rows shuffled so documents are not contiguous; BOS marked special."""
    lengths = rng.integers(1, 12, n_docs)
    doc_ids = np.repeat(rng.permutation(np.arange(100, 100 + n_docs) * 7), lengths)
    special = np.r_[[i == 0 for n in lengths for i in range(n)]]
    special |= rng.random(len(doc_ids)) < 0.1
    order = rng.permutation(len(doc_ids))
    acts = rng.normal(size=(len(doc_ids), d)).astype(dtype)
    return acts, doc_ids[order], special[order]


@pytest.mark.parametrize("how", ["mean", "last", "max"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pool_matches_python_loop(how, dtype):
    rng = np.random.default_rng(5)
    acts, doc_ids, special = _token_table(rng, dtype=dtype)
    docs, pooled = pool(acts, doc_ids, special, how=how)
    ref = _loop_pool(acts, doc_ids, special, how)
    assert docs.tolist() == sorted(ref)  # documents with only special tokens are absent
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, np.stack([ref[d] for d in docs]), rtol=1e-6, atol=1e-6)


def test_pool_without_mask_and_sorted_input():
    rng = np.random.default_rng(6)
    doc_ids = np.repeat(np.arange(10), 4)
    acts = rng.normal(size=(40, 3))
    docs, pooled = pool(acts, doc_ids, None, how="last")
    np.testing.assert_array_equal(pooled, acts[3::4])
    assert pooled.dtype == np.float64 and docs.tolist() == list(range(10))


@pytest.mark.parametrize("how", ["mean", "last", "max"])
def test_pool_accumulator_over_chunks_equals_one_shot(how):
    rng = np.random.default_rng(7)
    acts, doc_ids, special = _token_table(rng, n_docs=200)
    cuts = np.sort(rng.choice(np.arange(1, len(acts)), size=40, replace=False))
    acc = PoolAccumulator(how)
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(acts)], strict=True):
        acc.update(acts[lo:hi], doc_ids[lo:hi], special[lo:hi])
    docs, pooled = acc.result()
    ref_docs, ref = pool(acts, doc_ids, special, how=how)
    np.testing.assert_array_equal(docs, ref_docs)
    np.testing.assert_allclose(pooled, ref, rtol=1e-6, atol=1e-7)


def test_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="how"):
        pool(np.zeros((3, 2)), [0, 0, 1], how="median")
    with pytest.raises(ValueError, match="doc_ids"):
        pool(np.zeros((3, 2)), [0, 1])


# ------------------------------------------------------------------------------------------- splits


def test_split_by_document_disjoint_deterministic_stratified():
    rng = np.random.default_rng(8)
    docs = rng.permutation(np.arange(1000, 1300))
    labels_per_doc = rng.random(300) < 0.2
    reps = rng.integers(1, 5, 300)  # token-level: each doc id repeated
    doc_ids, labels = np.repeat(docs, reps), np.repeat(labels_per_doc, reps)
    a = split_by_document(doc_ids, seed=3, labels=labels)
    assert set(a) == {"train", "val", "test"}
    sets = [set(a[k].tolist()) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(docs.tolist())
    assert [len(s) for s in sets] == pytest.approx([180, 60, 60], abs=2)
    label_of = dict(zip(docs.tolist(), labels_per_doc.tolist(), strict=True))
    for s in sets:  # stratified: each split keeps the overall positive rate
        assert np.mean([label_of[d] for d in s]) == pytest.approx(labels_per_doc.mean(), abs=0.02)
    b = split_by_document(doc_ids, seed=3, labels=labels)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = split_by_document(doc_ids, seed=4, labels=labels)
    assert not np.array_equal(a["test"], c["test"])


def test_split_rare_class_and_unlabelled():
    doc_ids = np.arange(50)
    labels = np.r_[np.zeros(48, int), 1, 1]  # class 1 too rare for three splits: falls back to a shared stratum
    parts = split_by_document(doc_ids, seed=0, labels=labels)
    assert sum(len(v) for v in parts.values()) == 50
    plain = split_by_document(doc_ids, seed=0, fractions=(0.5, 0.0, 0.5))
    assert len(plain["val"]) == 0 and len(plain["train"]) == len(plain["test"]) == 25


# ------------------------------------------------------------------------------------------- probes


def _planted_binary(rng, n=1000, d=16, margin=0.5):
    w = rng.normal(size=d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, d) + rng.normal(0, 5, d)  # unequal scales and offsets
    m = (x - x.mean(0)) / x.std(0) @ w
    keep = np.abs(m) > margin * np.linalg.norm(w)
    return x[keep], m[keep] > 0


def _check_split(res, doc_ids):
    sets = [set(res.split[k].tolist()) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[2] or sets[1] & sets[2] or sets[0] & sets[1])
    assert set().union(*sets) == set(np.unique(doc_ids).tolist())
    assert res.metrics["n_docs"] == len(sets[2])


def test_logistic_probe_separable_and_shuffled():
    rng = np.random.default_rng(9)
    x, y = _planted_binary(rng)
    doc_ids = rng.permutation(len(y)) + 10_000
    res = train_probe_arrays(x, y, doc_ids, ProbeConfig(seed=1, **FAST))
    _check_split(res, doc_ids)
    assert res.metrics["auroc"] == 1.0 and res.metrics["accuracy"] >= 0.97
    assert res.metrics["recall_at_1pct_fpr"] >= 0.9
    assert set(res.val_metrics) >= {"auroc", "accuracy", "f1", "recall_at_1pct_fpr", "recall_at_5pct_fpr"}
    shuffled = train_probe_arrays(x, rng.permutation(y), doc_ids, ProbeConfig(seed=1, **FAST))
    assert abs(shuffled.metrics["auroc"] - 0.5) < 0.15


def test_token_level_probe_keeps_documents_whole():
    rng = np.random.default_rng(10)
    x_doc, y_doc = _planted_binary(rng, n=500)
    reps = rng.integers(2, 6, len(y_doc))
    doc_ids = np.repeat(np.arange(len(y_doc)), reps)
    x = np.repeat(x_doc, reps, axis=0) + rng.normal(0, 0.05, (reps.sum(), x_doc.shape[1]))
    res = train_probe_arrays(x, np.repeat(y_doc, reps), doc_ids, ProbeConfig(**FAST))
    _check_split(res, doc_ids)
    assert res.metrics["n"] == np.isin(doc_ids, res.split["test"]).sum()
    assert res.metrics["auroc"] > 0.99


def test_pool_then_probe_ignores_special_tokens():
    """Document label planted in ordinary tokens; BOS rows carry huge label-free noise that pooling must skip."""
    rng = np.random.default_rng(11)
    n_docs, d = 400, 12
    labels = rng.random(n_docs) < 0.5
    direction = rng.normal(size=d)
    lengths = rng.integers(3, 9, n_docs)
    doc_ids = np.repeat(np.arange(n_docs), lengths)
    acts = rng.normal(size=(len(doc_ids), d)) + np.outer(np.repeat(labels, lengths) * 2.0 - 1.0, direction)
    bos = np.r_[0, np.cumsum(lengths)[:-1]]
    acts[bos] = rng.normal(0, 1000, (n_docs, d))
    special = np.zeros(len(doc_ids), bool)
    special[bos] = True
    docs, pooled = pool(acts, doc_ids, special, how="mean")
    res = train_probe_arrays(pooled, labels[docs], docs, ProbeConfig(**FAST))
    assert res.metrics["auroc"] > 0.99


def test_multiclass_string_labels():
    rng = np.random.default_rng(12)
    centres = rng.normal(0, 6, (3, 10))
    y_idx = rng.integers(0, 3, 600)
    x = centres[y_idx] + rng.normal(size=(600, 10))
    names = np.array(["cat", "dog", "eel"], dtype=object)
    res = train_probe_arrays(x, names[y_idx], np.arange(600), ProbeConfig(**FAST))
    assert res.classes.tolist() == ["cat", "dog", "eel"]
    assert res.metrics["accuracy"] >= 0.97 and res.metrics["auroc"] >= 0.99
    proba = res.predict_proba(x[:50])
    assert proba.shape == (50, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert (res.predict(x) == names[y_idx]).mean() >= 0.97


def test_bool_labels_positive_label_and_determinism():
    rng = np.random.default_rng(13)
    x, y = _planted_binary(rng, n=400, margin=0.2)
    a = train_probe_arrays(x, y, None, ProbeConfig(**FAST))
    b = train_probe_arrays(x, y, None, ProbeConfig(**FAST))
    assert a.metrics == b.metrics
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values(),
                                                 strict=True))
    assert a.classes.tolist() == [False, True] and a.predict(x).dtype == bool
    flipped = train_probe_arrays(x, y, None, ProbeConfig(positive_label=False, **FAST))
    assert flipped.classes.tolist() == [True, False]
    # Same documents, same fit up to the sign of the logit: the ranking metric is unchanged.
    assert flipped.metrics["auroc"] == pytest.approx(a.metrics["auroc"], abs=1e-6)
    np.testing.assert_allclose(flipped.predict_proba(x)[:, 1], a.predict_proba(x)[:, 0], atol=1e-6)


def test_mlp_solves_xor_where_logistic_fails():
    rng = np.random.default_rng(14)
    x = rng.uniform(-1, 1, (800, 2))
    x = x[np.abs(x).min(1) > 0.05]  # a thin margin around the axes keeps the task learnable in few epochs
    y = x[:, 0] * x[:, 1] > 0
    x = np.c_[x, rng.normal(size=(len(x), 3))]  # plus irrelevant features
    logistic = train_probe_arrays(x, y, None, ProbeConfig(**FAST))
    mlp = train_probe_arrays(x, y, None, ProbeConfig(kind="mlp", lr=1e-2, epochs=150, **FAST))
    assert logistic.metrics["auroc"] < 0.7
    assert mlp.metrics["auroc"] > 0.97 and mlp.metrics["accuracy"] > 0.9
    assert 0 <= mlp.info["best_epoch"] < mlp.info["epochs_run"] <= 150


@pytest.mark.parametrize("bad, field", [
    ({"kind": "svm"}, "kind"), ({"hidden": 0}, "hidden"), ({"l2": -1.0}, "l2"), ({"l2": ()}, "l2"),
    ({"fractions": (0.5, 0.5, 0.0)}, "fractions"), ({"threads": 0}, "threads"), ({"lr": 0.0}, "lr"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"ProbeConfig.{field}"):
        ProbeConfig(**bad)


def test_bad_labels_are_refused():
    x = np.zeros((6, 2))
    with pytest.raises(ValueError, match="missing labels"):
        train_probe_arrays(x, np.array(["a", None, "b", "a", "b", "a"], dtype=object), None, ProbeConfig(**FAST))
    with pytest.raises(ValueError, match="2 classes"):
        train_probe_arrays(x, np.ones(6), None, ProbeConfig(**FAST))


def test_library_imports_neither_sklearn_nor_ray_nor_dask():
    code = ("import sys, actstore.workers.probe, actstore.workers.probe_metrics; "
            "bad = [m for m in ('sklearn', 'ray', 'dask') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
