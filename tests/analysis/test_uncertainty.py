"""Uncertainty features: stored `entropy`/`chosen_prob` equal an independent HF forward (softmax of the model's
logits, float64); `actstore.uncertainty` aggregates them per document like a hand computation; a probe on them
reads a planted label on the same split as the activation probe; older stores and bad inputs; the CLI verb."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers as T

import actstore
from actstore.cli import main
from tests.support import corpus_texts, extract_local

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def lm_store(tiny_lm, tmp_path_factory):
    corpus = [{"text": t[:160], "parity": i % 2} for i, t in enumerate(corpus_texts(40, min_len=60))]
    path = tiny_lm("gpt2")
    store = extract_local(path, tmp_path_factory.mktemp("u") / "s", [HOOK], corpus, packing=True,
                          token_outputs={"topk": 3})
    return path, store


@pytest.fixture(scope="module")
def oracle(lm_store):
    """Per stored row, from each sequence run alone through a fresh *ForCausalLM: entropy, chosen_prob, surprisal
    (NaN at a sequence's last row) and the top-1 minus top-2 log-probability."""
    path, store = lm_store
    lm = T.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = store.tokens()
    seq, ids = tok.column("seq_id").to_numpy(), tok.column("token_id").to_numpy()
    parts: dict[str, list[np.ndarray]] = {"entropy": [], "chosen_prob": [], "surprisal": [], "margin": []}
    for s in np.unique(seq):  # rows of one sequence are contiguous and in position order
        x = torch.as_tensor(ids[seq == s], dtype=torch.long)[None]
        with torch.no_grad():
            p = torch.softmax(lm(input_ids=x).logits[0].double(), -1).numpy()
        parts["entropy"].append(-(p * np.log(p)).sum(-1))
        chosen = np.append(p[np.arange(len(p) - 1), x[0, 1:].numpy()], np.nan)
        parts["chosen_prob"].append(chosen)
        parts["surprisal"].append(-np.log(chosen))
        top = np.sort(np.log(p), -1)
        parts["margin"].append(top[:, -1] - top[:, -2])
    return {k: np.concatenate(v) for k, v in parts.items()}


def test_stored_entropy_and_chosen_prob_equal_hf_softmax(lm_store, oracle):
    _, store = lm_store
    out = store.token_outputs()
    assert {"entropy", "chosen_prob"} <= set(out.column_names)
    chosen = out.column("chosen_prob").to_numpy(zero_copy_only=False)
    assert np.array_equal(np.isnan(chosen), np.isnan(oracle["chosen_prob"]))  # null exactly at sequence ends
    ok = ~np.isnan(chosen)
    np.testing.assert_allclose(chosen[ok], oracle["chosen_prob"][ok], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out.column("entropy").to_numpy(), oracle["entropy"], rtol=1e-5, atol=1e-5)


def _hand_doc_features(store, oracle) -> dict[str, np.ndarray]:
    tok = store.tokens()
    doc, seq = tok.column("doc_id").to_numpy(), tok.column("seq_id").to_numpy()
    ids = np.unique(doc)
    feats: dict[str, list[float]] = {k: [] for k in ("mean_surprisal", "max_surprisal", "mean_entropy",
                                                      "max_entropy", "mean_margin")}
    for d in ids:
        rows = [i for i in range(len(doc) - 1) if doc[i] == d and doc[i + 1] == d and seq[i + 1] == seq[i]]
        for name in ("surprisal", "entropy", "margin"):
            v = oracle[name][rows]
            feats[f"mean_{name}"].append(v.mean())
            if name != "margin":
                feats[f"max_{name}"].append(v.max())
    return {"doc_id": ids, **{k: np.array(v) for k, v in feats.items()}}


def test_document_features_equal_a_hand_computation(lm_store, oracle):
    _, store = lm_store
    res = actstore.uncertainty(store)
    assert res.tokens.num_rows == store.n_tokens
    hand = _hand_doc_features(store, oracle)
    assert res.docs.column("doc_id").to_pylist() == hand["doc_id"].tolist()
    for k in ("mean_surprisal", "max_surprisal", "mean_entropy", "max_entropy", "mean_margin"):
        np.testing.assert_allclose(res.docs.column(k).to_numpy(), hand[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # with packing, a document's last row predicts the next document's first token: not counted
    tok = store.tokens()
    doc, seq = tok.column("doc_id").to_numpy(), tok.column("seq_id").to_numpy()
    cross = np.flatnonzero((doc[:-1] != doc[1:]) & (seq[:-1] == seq[1:]))
    assert len(cross) > 0 and not res.tokens.column("counted").to_numpy(zero_copy_only=False)[cross].any()


def test_uncertainty_probe_reads_a_planted_label_on_the_hook_probes_split(lm_store, oracle, monkeypatch):
    _, store = lm_store
    hand = _hand_doc_features(store, oracle)
    planted = hand["mean_surprisal"] > np.median(hand["mean_surprisal"])  # from the oracle, not from actstore
    docs = store.docs()
    lookup = dict(zip(hand["doc_id"].tolist(), planted.tolist(), strict=True))
    labelled = docs.append_column("planted", pa.array([lookup[d] for d in docs.column("doc_id").to_pylist()]))
    monkeypatch.setattr(store, "docs", lambda: labelled)
    alone = actstore.train_probe(store, label="planted", features="uncertainty")
    assert alone.metrics["auroc"] >= 0.9  # chance is 0.5
    assert alone.info["n_features"] == 5 and alone.info["hook"] is None
    joined = actstore.train_probe(store, HOOK, label="planted", features="uncertainty+hook")
    assert joined.info["n_features"] == 5 + store.manifest.hook(HOOK).d
    plain = actstore.train_probe(store, HOOK, label="planted")
    for k in ("train", "val", "test"):
        assert np.array_equal(alone.split[k], plain.split[k]) and np.array_equal(joined.split[k], plain.split[k])


def test_store_written_before_entropy_stays_readable(lm_store, tmp_path):
    _, store = lm_store
    old = tmp_path / "old"
    shutil.copytree(store.url.removeprefix("file://"), old)
    for f in old.glob("shards/*/outputs.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["chosen_prob", "entropy"]), f)
    res = actstore.uncertainty(str(old))
    new = actstore.uncertainty(store)
    assert "mean_entropy" not in res.docs.column_names
    for k in ("mean_surprisal", "max_surprisal", "mean_margin"):
        np.testing.assert_array_equal(res.docs.column(k).to_numpy(), new.docs.column(k).to_numpy())
    np.testing.assert_allclose(res.tokens.column("chosen_prob").to_numpy(zero_copy_only=False),
                               new.tokens.column("chosen_prob").to_numpy(zero_copy_only=False), rtol=1e-5)


def test_bad_input(lm_store, tmp_path):
    _, store = lm_store
    plain = actstore.from_arrays({HOOK: np.ones((4, 3), np.float32)}, str(tmp_path / "plain"))
    cases = [
        (lambda: actstore.uncertainty(plain), actstore.StoreError, "no per-token outputs"),
        (lambda: actstore.uncertainty(store, rows="response"), actstore.ConfigError, "no `response` column"),
        (lambda: actstore.train_probe(store, HOOK, label="x", features="entropy"), actstore.ConfigError,
         "expected sae:URL.*got 'entropy'"),
        (lambda: actstore.train_probe(store, label="x", features="uncertainty+hook"), actstore.ConfigError,
         "give hook="),
    ]
    for call, err, pattern in cases:
        with pytest.raises(err, match=pattern) as e:
            call()
        assert "\n" not in str(e.value)


def test_cli(lm_store, tmp_path, capsys):
    _, store = lm_store
    out = tmp_path / "u.parquet"
    assert main(["uncertainty", store.url, "-o", str(out)]) == 0
    assert "documents" in capsys.readouterr().out
    written = pq.read_table(out)
    assert written.replace_schema_metadata(None).equals(actstore.uncertainty(store).docs)
    assert json.loads(written.schema.metadata[b"actstore"])["store_manifest_sha256"] == store.manifest_sha256
    assert main(["uncertainty", store.url, "--level", "token", "-o", str(out)]) == 0
    assert pq.read_table(out).num_rows == store.n_tokens
    assert main(["uncertainty", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("actstore: error:")


def test_cli_probe_on_uncertainty_features(lm_store, tmp_path, capsys):
    _, store = lm_store
    assert main(["train", "probe", "--store", store.url, "--label", "parity", "--features", "uncertainty",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["hook"] for r in rows] == ["uncertainty"] and 0 <= rows[0]["auroc"] <= 1
    plain = actstore.from_arrays({HOOK: np.ones((4, 3), np.float32)}, str(tmp_path / "plain"),
                                 docs={"doc_id": np.arange(4), "parity": [0, 1, 0, 1]})
    assert main(["train", "probe", "--store", plain.url, "--label", "parity", "--features", "uncertainty"]) == 2
    err = capsys.readouterr().err
    assert "need per-token outputs" in err and err.count("\n") == 1


def test_response_rows_count_only_predictions_of_response_tokens(lm_store, oracle, monkeypatch):
    _, store = lm_store
    tok = store.tokens()
    doc, seq = tok.column("doc_id").to_numpy(), tok.column("seq_id").to_numpy()
    resp = tok.column("position").to_numpy() >= 5
    monkeypatch.setattr(store, "tokens", lambda: tok.append_column("response", pa.array(resp)))
    res = actstore.uncertainty(store, rows="response")
    counted = res.tokens.column("counted").to_numpy(zero_copy_only=False)
    expect = np.zeros(len(doc), bool)
    expect[:-1] = (doc[1:] == doc[:-1]) & (seq[1:] == seq[:-1]) & resp[1:]
    np.testing.assert_array_equal(counted, expect)
    d0 = int(res.docs.column("doc_id")[0].as_py())
    np.testing.assert_allclose(res.docs.column("mean_entropy")[0].as_py(),
                               oracle["entropy"][expect & (doc == d0)].mean(), rtol=1e-5)
