"""Span labels (`actstore.label`, `actstore label`): token-aligned tables checked against a brute-force oracle.

The oracle labels a token row when any span of its document overlaps its character span, span by span and row by
row in plain Python. Bad inputs are refused with one line before anything is written (every file of the store,
manifest included, keeps its bytes); `verify` checks the table's rows and checksum.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest

import actstore
from actstore.cli import main
from actstore.schemas.errors import LabelError
from actstore.schemas.manifest import identity_sha256
from tests.support import corpus_texts, extract_local

HOOK = "blocks.0.hook_resid_post"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus_texts(4, min_len=200)


@pytest.fixture(scope="module")
def packed(tiny, tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("labels") / "packed"
    extract_local(tiny("gpt2"), path, [HOOK], docs, packing=True)
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _oracle(tokens, spans: list[dict]) -> list:
    out = []
    for d, a, b in zip(tokens["doc_id"], tokens["char_start"], tokens["char_end"]):
        hit = [s["label"] for s in spans if s["doc_id"] == d and a >= 0 and a < s["end"] and s["start"] < b]
        out.append(hit[0] if hit else None)
    return out


def _spans(docs: list[str]) -> list[dict]:
    return [
        {"doc_id": 0, "start": 0, "end": 1, "label": "yes"},  # one character: part of the first token
        {"doc_id": 0, "start": 40, "end": 90, "label": "no"},
        {"doc_id": 0, "start": 85, "end": 120, "label": "no"},  # overlaps the previous one, same label
        {"doc_id": 2, "start": 10, "end": len(docs[2]), "label": "yes", "target": "text"},  # to the end of the text
        {"doc_id": 3, "start": 7, "end": 8, "label": "no"},
    ]


def test_labels_match_the_oracle_and_verify(packed, tmp_path, docs):
    root = _copy(packed, tmp_path / "s")
    spans = _spans(docs)
    info = actstore.label(str(root), spans, "truth")
    store = actstore.open_store(str(root))
    want = _oracle(store.tokens().to_pydict(), spans)
    got = store.labels("truth").column("label").to_pylist()
    assert got == want
    assert info.n_rows == store.n_tokens and info.n_labelled == sum(w is not None for w in want) > 0
    assert store.manifest.label("truth") == info
    assert store.verify().ok
    schema = json.loads((Path(actstore.schemas.__file__).with_name("manifest.schema.json")).read_text())
    jsonschema.validate(json.loads((root / "manifest.json").read_text()), schema)
    # the label file is the only new file; every other file keeps its bytes
    before = _digest(packed)
    after = _digest(root)
    assert set(after) - set(before) == {"labels/truth.parquet"}
    assert all(after[k] == v for k, v in before.items() if k != "manifest.json")


def test_unpacked_bert_and_integer_labels(tiny, tmp_path, docs):
    store = extract_local(tiny("bert"), tmp_path / "s", [HOOK], docs, packing=False)
    spans = [{"doc_id": d, "start": 3, "end": 20, "label": d % 2} for d in range(4)]
    before = store.manifest_sha256
    actstore.label(store, spans, "parity")
    table = store.labels("parity")  # the Store object sees the label it was given
    assert store.manifest_sha256 == before == identity_sha256((tmp_path / "s" / "manifest.json").read_bytes())
    assert str(table.schema.field("label").type) == "int64"
    assert table.column("label").to_pylist() == _oracle(store.tokens().to_pydict(), spans)


def test_unlabelled_manifest_has_no_labels_key(packed):
    assert "labels" not in json.loads((packed / "manifest.json").read_text())


def test_verify_finds_a_changed_label_file(packed, tmp_path, docs):
    root = _copy(packed, tmp_path / "s")
    actstore.label(str(root), _spans(docs), "truth")
    table = pq.read_table(root / "labels" / "truth.parquet")
    pq.write_table(table.slice(1), root / "labels" / "truth.parquet")
    problems = actstore.open_store(str(root)).verify().problems
    assert any("checksum mismatch" in p for p in problems) and any("rows for" in p for p in problems)
    (root / "labels" / "truth.parquet").unlink()
    assert actstore.open_store(str(root)).verify().problems == ["label truth: labels/truth.parquet is missing"]


def test_overwrite_replaces_only_that_label(packed, tmp_path, docs):
    root = _copy(packed, tmp_path / "s")
    actstore.label(str(root), _spans(docs), "a")
    actstore.label(str(root), _spans(docs)[:1], "b")
    with pytest.raises(LabelError, match="already exists"):
        actstore.label(str(root), _spans(docs)[:2], "b")
    info = actstore.label(str(root), _spans(docs)[:2], "b", overwrite=True)
    store = actstore.open_store(str(root))
    assert [lab.name for lab in store.manifest.labels] == ["a", "b"] and store.manifest.label("b") == info
    assert store.verify().ok


BAD = {
    "past the end": ([{"doc_id": 1, "start": 0, "end": 10**6, "label": "x"}], "outside its text"),
    "empty span": ([{"doc_id": 1, "start": 5, "end": 5, "label": "x"}], "outside its text"),
    "negative start": ([{"doc_id": 1, "start": -1, "end": 5, "label": "x"}], "outside its text"),
    "overlap, different labels": ([{"doc_id": 1, "start": 0, "end": 10, "label": "x"},
                                   {"doc_id": 1, "start": 9, "end": 12, "label": "y"}], "overlap with different"),
    "unknown doc": ([{"doc_id": 99, "start": 0, "end": 1, "label": "x"}], "not in the store"),
    "response target": ([{"doc_id": 1, "start": 0, "end": 1, "label": "x", "target": "response"}],
                        "spans target generated responses, but the store .* has none"),
    "missing field": ([{"doc_id": 1, "start": 0, "label": "x"}], "lacks end"),
    "mixed label types": ([{"doc_id": 1, "start": 0, "end": 1, "label": "x"},
                           {"doc_id": 2, "start": 0, "end": 1, "label": 1}], "mix strings and integers"),
    "float offset": ([{"doc_id": 1, "start": 0.5, "end": 1, "label": "x"}], "must be an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spans_are_refused_before_any_write(packed, tmp_path, case):
    root = _copy(packed, tmp_path / "s")
    before = _digest(root)
    spans, msg = BAD[case]
    with pytest.raises(LabelError, match=msg) as e:
        actstore.label(str(root), spans, "bad")
    assert "\n" not in str(e.value)
    assert _digest(root) == before


def test_bad_name_and_old_store(tiny, tmp_path, packed, docs, monkeypatch):
    root = _copy(packed, tmp_path / "s")
    with pytest.raises(LabelError, match="label name"):
        actstore.label(str(root), _spans(docs), "../escape")
    from tests.extract.test_char_spans import _old_format

    with monkeypatch.context() as m:
        _old_format(m)
        extract_local(tiny("gpt2"), tmp_path / "old", [HOOK], docs)
    before = _digest(tmp_path / "old")
    with pytest.raises(LabelError, match="no character spans"):
        actstore.label(str(tmp_path / "old"), _spans(docs), "truth")
    assert _digest(tmp_path / "old") == before


def test_append_tokens_refused_on_a_labelled_store(tiny, packed, tmp_path, docs):
    root = _copy(packed, tmp_path / "s")
    actstore.label(str(root), _spans(docs), "truth")
    with pytest.raises(actstore.AppendError, match="token labels"):
        extract_local(tiny("gpt2"), root, [HOOK], corpus_texts(6)[4:], append="tokens")


def test_cli_label(packed, tmp_path, docs, capsys):
    root = _copy(packed, tmp_path / "s")
    good = tmp_path / "spans.jsonl"
    good.write_text("\n".join(json.dumps(s) for s in _spans(docs)) + "\n")
    assert main(["label", str(root), "--spans", str(good), "--name", "truth", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "truth" and out["n_rows"] == actstore.open_store(str(root)).n_tokens
    before = _digest(root)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"doc_id": 0, "start": 0, "end": 3, "label": "a"}\n{"doc_id": 0, "start": 0,\n')
    assert main(["label", str(root), "--spans", str(bad), "--name", "other"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actstore: error:") and err.count("\n") == 1 and "bad.jsonl:2" in err
    assert main(["label", str(root), "--spans", str(good), "--name", "truth"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _digest(root) == before


def test_multistore_view_concatenates_labels(packed, tmp_path, docs):
    """A view of two labelled stores returns both tables in row order; a member without the label is named."""
    from actstore.pipeline.store.multistore import open_stores
    from actstore.schemas.errors import StoreError

    a, b, c = (_copy(packed, tmp_path / n) for n in "abc")
    actstore.label(str(a), _spans(docs), "truth")
    actstore.label(str(b), [{"doc_id": 1, "start": 0, "end": 30, "label": "b"}], "truth")
    view = open_stores([str(a), str(b)])
    got = view.labels("truth").column("label").to_pylist()
    want = (actstore.open_store(str(a)).labels("truth").column("label").to_pylist()
            + actstore.open_store(str(b)).labels("truth").column("label").to_pylist())
    assert got == want and len(got) == view.tokens().num_rows and "b" in got and "yes" in got
    with pytest.raises(StoreError, match=f"missing in {c}"):
        open_stores([str(a), str(c)]).labels("truth")


def test_labels_keep_the_store_identity_results_record(tiny, tmp_path, docs, monkeypatch):
    """`actstore label` rewrites only the manifest's labels list: the identity results record is unchanged, a
    spectrum saved before labelling is still this store's in the report, and a store whose shard list lives in the
    Parquet index keeps it there."""
    from actstore.pipeline.analysis.report import scan_results
    from actstore.pipeline.analysis.spectra import save_spectrum, spectrum
    from actstore.pipeline.extract import commit

    monkeypatch.setattr(commit, "INDEX_MIN_SHARDS", 2)
    root = tmp_path / "s"
    store = extract_local(tiny("gpt2"), root, [HOOK], docs, packing=True, shard_tokens=64)
    raw = json.loads((root / "manifest.json").read_text())
    assert raw["shards"] == [] and raw["shard_index"] is not None
    before = store.manifest_sha256
    assert before == hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    save_spectrum(spectrum(store, HOOK), str(tmp_path / "res" / "spectrum.json"), HOOK, store)
    actstore.label(str(root), _spans(docs), "truth")
    labelled = actstore.open_store(str(root))
    raw = json.loads((root / "manifest.json").read_text())
    assert raw["shards"] == [] and [lab["name"] for lab in raw["labels"]] == ["truth"]
    assert labelled.manifest_sha256 == before and labelled.labels("truth").num_rows == labelled.n_tokens
    assert HOOK in scan_results(tmp_path / "res", labelled.manifest_sha256).spectra
    assert labelled.verify().ok
