"""Token-level probes on span labels (`train_probe(..., label="span:NAME", pooling="token")`).

Planted labels: in even documents every "the" is positive and every "and" negative; odd documents label only
their "and"s (negative). A token probe must separate them, its rows must be exactly the labelled tokens (the same
numbers as `train_probe_arrays` on rows gathered independently from `to_numpy` and a brute-force span oracle),
no document may sit in two splits, and the per-document score (max over tokens) must rank the even documents,
which hold a positive token, above the odd ones (scikit-learn's AUROC as the oracle).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import actstore
from actstore.cli import main
from actstore.schemas.errors import AnalysisError, ConfigError, StoreError
from actstore.schemas.probe import ProbeConfig
from actstore.workers.probe import train_probe_arrays
from tests.support import corpus_texts, extract_local

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _spans(texts: list[str]) -> list[dict]:
    spans = []
    for i, t in enumerate(texts):
        words = [("the", 1), ("and", 0)] if i % 2 == 0 else [("and", 0)]
        spans += [{"doc_id": i, "start": m.start(), "end": m.end(), "label": lab}
                  for word, lab in words for m in re.finditer(rf"\b{word}\b", t)]
    return spans


@pytest.fixture(scope="module")
def labelled(tiny, tmp_path_factory):
    texts = corpus_texts(40, min_len=300)
    path = tmp_path_factory.mktemp("tokprobe") / "s"
    store = extract_local(tiny("gpt2"), path, HOOKS, texts, packing=True)
    spans = _spans(texts)
    actstore.label(store, spans, "the")
    actstore.label(store, [{**s, "label": 1} for s in spans[:1]], "one")  # a single class
    return actstore.open_store(str(path)), spans


def _oracle_rows(store, spans: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    t = store.tokens().to_pydict()
    rows, y = [], []
    for r, (d, a, b) in enumerate(zip(t["doc_id"], t["char_start"], t["char_end"])):
        hit = [s["label"] for s in spans if s["doc_id"] == d and a >= 0 and a < s["end"] and s["start"] < b]
        if hit:
            rows.append(r)
            y.append(hit[0])
    return np.array(rows), np.array(y)


def test_token_probe_equals_the_probe_on_oracle_rows(labelled):
    store, spans = labelled
    res = actstore.train_probe(store, HOOKS[1], label="span:the", pooling="token", seed=3)
    rows, y = _oracle_rows(store, spans)
    x = store.activations(HOOKS[1]).compute()[rows]
    docs = store.tokens().column("doc_id").to_numpy()[rows]
    want = train_probe_arrays(x, y, docs, ProbeConfig(seed=3))
    assert res.info["n_tokens_labelled"] == len(rows)
    for k in ("auroc", "accuracy", "f1", "recall_at_1pct_fpr", "recall_at_5pct_fpr", "log_loss"):
        assert res.metrics[k] == want.metrics[k], k
    for a in ("train", "val", "test"):
        assert np.array_equal(res.split[a], want.split[a])
    assert not set(res.split["train"]) & set(res.split["test"]) and not set(res.split["val"]) & set(res.split["test"])
    assert res.metrics["auroc"] > 0.95  # token identity is linearly readable from the residual stream


def test_document_aggregation_is_max_over_tokens(labelled):
    store, spans = labelled
    res = actstore.train_probe(store, HOOKS[1], label="span:the", pooling="token")
    rows, y = _oracle_rows(store, spans)
    docs = store.tokens().column("doc_id").to_numpy()[rows]
    test = np.isin(docs, res.split["test"])
    p = res.predict_proba(store.activations(HOOKS[1]).compute()[rows[test]])[:, 1]
    ids = np.unique(docs[test])
    score = [p[docs[test] == d].max() for d in ids]
    label = [bool((y[test][docs[test] == d] == 1).any()) for d in ids]
    assert res.metrics["doc_n_docs"] == len(ids) and res.metrics["doc_n_positive"] == sum(label)
    assert 0 < sum(label) < len(ids)
    assert res.metrics["doc_auroc"] == pytest.approx(roc_auc_score(label, score), abs=1e-12)
    assert res.metrics["doc_auroc"] > 0.9


def test_mlp_token_probe(labelled):
    store, _ = labelled
    res = actstore.train_probe(store, HOOKS[0], label="span:the", pooling="token", kind="mlp", epochs=20,
                               hidden=16)
    assert res.config.kind == "mlp" and 0.5 < res.metrics["auroc"] <= 1 and "doc_auroc" in res.metrics


@pytest.mark.parametrize("kw, err, msg", [
    ({"label": "span:the", "pooling": "mean"}, ConfigError, "use pooling: token"),
    ({"label": "label", "pooling": "token"}, ConfigError, "needs token-aligned labels"),
    ({"label": "span:", "pooling": "token"}, ConfigError, "needs a label name"),
    ({"label": "span:nope", "pooling": "token"}, StoreError, "label 'nope' is not in this store"),
    ({"label": "span:one", "pooling": "token"}, AnalysisError, "1 class"),
])
def test_bad_token_probe_requests(labelled, kw, err, msg):
    store, _ = labelled
    with pytest.raises(err, match=msg) as e:
        actstore.train_probe(store, HOOKS[0], **kw)
    assert "\n" not in str(e.value)


def test_cli_token_probe_sweep(labelled, tmp_path, capsys):
    store, _ = labelled
    out = tmp_path / "out"
    assert main(["train", "probe", "--store", store.url, "--label", "span:the", "--pooling", "token", "--json",
                 "--out", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["hook"] for r in rows] == HOOKS
    assert all(r["auroc"] > 0.9 and "doc_auroc" in r and r["n_tokens"] > 0 for r in rows)
    assert json.loads((out / "probes-span-the.json").read_text())["label"] == "span:the"
    assert (out / "probes-span-the" / f"{HOOKS[0]}.safetensors").exists()
    assert main(["train", "probe", "--store", store.url, "--label", "span:the"]) == 2
    err = capsys.readouterr().err
    assert "pooling: token" in err and err.count("\n") == 1


def test_report_shows_token_and_document_auroc(labelled, tmp_path):
    """The report's probe panel draws token AUROC and per-document AUROC and tabulates the document metrics."""
    from actstore.pipeline.analysis.report import write_report

    store, _ = labelled
    out = tmp_path / "out"
    assert main(["train", "probe", "--store", store.url, "--label", "span:the", "--pooling", "token",
                 "--out", str(out)]) == 0
    html = Path(write_report(store, out / "report.html", results_dir=out)).read_text()
    header = html.split('id="probe-results"')[1].split("</thead>")[0]
    assert "<th>doc_auroc</th>" in header and "<th>n_tokens</th>" in header
    rows = json.loads((out / "probes-span-the.json").read_text())["rows"]
    assert f"{rows[0]['doc_auroc']:.4g}" in html
