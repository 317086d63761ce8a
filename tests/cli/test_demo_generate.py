"""`actstore demo --generate`: the offline hallucination-detection example end to end (train the adder, extract its
answers with `generate`, label them by rule, probes, uncertainty, spectral series, report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import actstore
from actstore.cli import main
from actstore.demo_generate import VOCAB, answer_spans, char_tokenizer, sum_prompts


def test_char_tokenizer_offsets_are_characters():
    tok = char_tokenizer()
    enc = tok("37+45=", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc.input_ids) == list("37+45=")
    assert enc.offset_mapping == [(i, i + 1) for i in range(6)]
    assert tok.decode(tok.convert_tokens_to_ids(list("82")) + [VOCAB.index("<eos>")], skip_special_tokens=True) == "82"


def test_prompts_are_distinct_sums():
    ps = sum_prompts(50)
    assert len({p["text"] for p in ps}) == 50
    assert all(eval(p["text"][:-1]) == int(p["answer"]) for p in ps)  # noqa: S307 (our own "a+b" strings)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("gdemo")
    assert main(["demo", "--generate", "--quick", "--executor", "local", "--out", str(out)]) == 0
    return out, json.loads((out / "generate-summary.json").read_text())


def test_answers_are_labelled_by_the_rule(demo):
    """Every answer token carries correct/incorrect exactly when the response's leading digits equal the sum."""
    out, summary = demo
    store = actstore.open_store(summary["store"])
    docs = store.docs().to_pydict()
    want = {d: ("correct" if r[:len(r) - len(r.lstrip("0123456789"))] == a else "incorrect")
            for d, a, r in zip(docs["doc_id"], docs["answer"], docs["response"])}
    assert 0.2 < summary["correct_fraction"] < 0.98  # both classes present
    assert summary["correct_fraction"] == pytest.approx(sum(v == "correct" for v in want.values()) / len(want))
    tok = store.tokens().to_pydict()
    labels = store.labels("answer").column("label").to_pylist()
    digit_ids = set(char_tokenizer().convert_tokens_to_ids(list("0123456789")))
    seen_response_digit = False
    for d, t, resp, lab in zip(tok["doc_id"], tok["token_id"], tok["response"], labels):
        if resp and t in digit_ids and lab is not None:
            seen_response_digit = True
            assert lab == want[d]
        if not resp:
            assert lab is None  # prompts are never labelled
    assert seen_response_digit and set(docs["finish_reason"]) <= {"eos", "length", "stop"}
    spans, correct = answer_spans(store)
    assert {s["doc_id"] for s in spans} <= set(correct)


def test_scores_and_report(demo):
    """The output-only baseline finds the model's errors (surprisal is higher on wrong answers); every score is a
    valid AUROC; the report shows the probes and the spectral series."""
    out, summary = demo
    assert summary["uncertainty_auroc"] > 0.6
    for row in summary["token_probes"].values():
        assert 0 <= row["auroc"] <= 1 and 0 <= row["doc_auroc"] <= 1
    assert np.isfinite(summary["spectral_auroc"])
    html = (out / "generate-report.html").read_text()
    assert 'id="probes"' in html and 'id="spectral-series"' in html and "doc_auroc" in html


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("mine")
    assert main(["demo", "--generate", "--quick", "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and f.read_text() == "mine"
