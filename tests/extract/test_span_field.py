"""Span labels carried by corpus records (`span_field`): written at extraction as `labels/<span_field>.parquet`.

The oracle is the after-the-fact path: the same corpus extracted without `span_field`, then labelled with
`actstore.label` from the same spans, must give the same table bytes. Bad spans stop the run before anything
is written.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import actstore
from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import ActstoreError
from tests.support import corpus_texts, extract_local

HOOK = "blocks.0.hook_resid_post"


def _records() -> list[dict]:
    texts = corpus_texts(5, min_len=200)
    recs: list[dict] = [{"text": t, "topic": i} for i, t in enumerate(texts)]
    recs[0]["spans"] = [{"start": 0, "end": 12, "label": "bad"}, {"start": 50, "end": 70, "label": "ok"}]
    recs[2]["spans"] = [{"start": 5, "end": len(texts[2]), "label": "bad"}]
    recs[3]["spans"] = []
    return recs


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_record_spans_equal_labelling_after_the_fact(tiny, tmp_path, packing):
    recs = _records()
    store = extract_local(tiny("gpt2"), tmp_path / "a", [HOOK], recs, packing=packing, span_field="spans")
    plain = extract_local(tiny("gpt2"), tmp_path / "b", [HOOK], [{k: v for k, v in r.items() if k != "spans"}
                                                                  for r in recs], packing=packing)
    spans = [{**s, "doc_id": i} for i, r in enumerate(recs) for s in r.get("spans", [])]
    info = actstore.label(plain, spans, "spans")
    assert store.manifest.labels == [info]
    assert (tmp_path / "a" / "labels" / "spans.parquet").read_bytes() == (
        tmp_path / "b" / "labels" / "spans.parquet").read_bytes()
    assert "spans" not in store.docs().column_names and "topic" in store.docs().column_names
    assert store.verify().ok


def test_span_field_default_keeps_the_config_hash():
    base = dict(model="m", corpus=["x"], hooks=[HOOK], output="o")
    assert ExtractConfig(**base).config_hash() == ExtractConfig(**base, span_field=None).config_hash()
    assert ExtractConfig(**base).config_hash() != ExtractConfig(**base, span_field="spans").config_hash()


@pytest.mark.parametrize("change, msg", [
    (lambda r: r[1].update(spans=[{"start": 0, "end": 10**6, "label": "x"}]), "outside its text"),
    (lambda r: r[1].update(spans=[{"start": 0, "end": 9, "label": "x"}, {"start": 8, "end": 20, "label": "y"}]),
     "overlap with different labels"),
    (lambda r: r[1].update(spans="bad"), "must hold a list"),
    (lambda r: r[1].update(spans=[{"start": 0, "label": "x"}]), "lacks end"),
])
def test_bad_record_spans_stop_before_any_write(tiny, tmp_path, change, msg):
    recs = _records()
    change(recs)
    with pytest.raises(ActstoreError, match=msg) as e:
        extract_local(tiny("gpt2"), tmp_path / "s", [HOOK], recs, span_field="spans")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_span_labels_across_corpus_parts(tiny, tmp_path):
    """A store of several corpus parts has sparse doc ids (part << 32 | index): span_field and `label` agree."""
    recs = _records()
    store = extract_local(tiny("gpt2"), tmp_path / "a", [HOOK], recs, span_field="spans", part_docs=2)
    assert len(store.manifest.parts) == 3
    plain = extract_local(tiny("gpt2"), tmp_path / "b", [HOOK], [{k: v for k, v in r.items() if k != "spans"}
                                                                  for r in recs], part_docs=2)
    doc_ids = plain.docs().column("doc_id").to_pylist()
    assert doc_ids[2] == 1 << 32  # the first document of the second part
    spans = [{**s, "doc_id": doc_ids[i]} for i, r in enumerate(recs) for s in r.get("spans", [])]
    info = actstore.label(plain, spans, "spans")
    assert store.manifest.labels == [info]
    assert (tmp_path / "a" / "labels" / "spans.parquet").read_bytes() == (
        tmp_path / "b" / "labels" / "spans.parquet").read_bytes()
    # the oracle for the alignment: a token is labelled exactly when its characters overlap a span of its doc
    toks = plain.tokens().to_pydict()
    by_doc: dict[int, list] = {}
    for s in spans:
        by_doc.setdefault(s["doc_id"], []).append(s)
    want = [next((s["label"] for s in by_doc.get(d, []) if a >= 0 and a < s["end"] and s["start"] < b), None)
            for d, a, b in zip(toks["doc_id"], toks["char_start"], toks["char_end"])]
    assert info.n_labelled == sum(w is not None for w in want) > 0
    assert pq.read_table(tmp_path / "a" / "labels" / "spans.parquet").column("label").to_pylist() == want
    assert store.verify().ok
