"""Corpus parts: every way of cutting a corpus reads each document exactly once, in the whole-corpus order.

The oracle is the whole-corpus reader (`corpus.iter_documents`, what format v1 read): the parts' documents,
concatenated in part order, must equal its documents (text and metadata) for every `part_bytes` / `part_docs`,
including cuts that fall inside a line, on a line break, or at every byte.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actstore.schemas.errors import CorpusError
from actstore.workers.corpus import iter_documents
from actstore.workers.parts import CorpusSpec, list_parts, read_part


def _docs(spec: CorpusSpec) -> list[tuple[str, dict]]:
    return [(d.text, d.meta) for p in list_parts(spec) for d in read_part(p, spec)]


def _oracle(corpus: str | list, **kw) -> list[tuple[str, dict]]:
    return [(d.text, d.meta) for d in iter_documents(corpus, **kw)]


def _jsonl(path, n: int) -> str:
    # uneven line lengths (one much longer), a blank line and non-ASCII text: cuts land everywhere
    rows = [{"text": f"doc {i} " + "é" * (i % 7) + "x" * (3 if i != 5 else 200), "i": i} for i in range(n)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(4, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("part_bytes", [1, 7, 40, 41, 97, 300, 10**6])
def test_jsonl_byte_ranges_read_every_line_once(tmp_path, part_bytes):
    path = _jsonl(tmp_path / "c.jsonl", 12)
    spec = CorpusSpec(path, part_bytes=part_bytes)
    parts = list_parts(spec)
    size = (tmp_path / "c.jsonl").stat().st_size
    if part_bytes < size:
        assert [p.kind for p in parts] == ["bytes"] * len(parts) and len(parts) == -(-size // part_bytes)
        assert [(p.start, p.stop) for p in parts] == [(a, min(size, a + part_bytes)) for a in range(0, size, part_bytes)]
    else:
        assert [p.kind for p in parts] == ["files"]
    assert [p.index for p in parts] == list(range(len(parts)))
    assert _docs(spec) == _oracle(path)


def test_txt_lines_are_cut_but_a_txt_document_never_is(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"line number {i}\n" for i in range(30)))
    lines = CorpusSpec(str(path), split="lines", part_bytes=50)
    assert len(list_parts(lines)) > 1 and _docs(lines) == _oracle(str(path), split="lines")
    whole = CorpusSpec(str(path), split="document", part_bytes=50)
    assert len(list_parts(whole)) == 1 and _docs(whole) == _oracle(str(path), split="document")


def test_parquet_is_cut_at_row_groups(tmp_path):
    path = tmp_path / "c.parquet"
    table = pa.table({"text": [f"row {i} " * (1 + i % 4) for i in range(40)], "k": list(range(40))})
    pq.write_table(table, path, row_group_size=5)
    meta = pq.ParquetFile(path).metadata
    one = sum(meta.row_group(0).column(c).total_compressed_size for c in range(meta.num_columns))
    spec = CorpusSpec(str(path), part_bytes=2 * one + 1)
    parts = list_parts(spec)
    assert {p.kind for p in parts} == {"rowgroups"} and len(parts) > 1
    assert [g for p in parts for g in range(p.start, p.stop)] == list(range(8))  # every row group exactly once
    assert _docs(spec) == _oracle(str(path))


def test_small_files_are_grouped_up_to_part_bytes(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(6):
        (folder / f"f{i}.jsonl").write_text(json.dumps({"text": f"file {i}"}) + "\n")
    size = (folder / "f0.jsonl").stat().st_size
    spec = CorpusSpec(str(folder), part_bytes=2 * size)
    parts = list_parts(spec)
    assert [len(p.files) for p in parts] == [2, 2, 2] and [p.kind for p in parts] == ["files"] * 3
    assert _docs(spec) == _oracle(str(folder))


def test_lists_are_cut_every_part_docs_and_ids_are_numbered_from_first():
    items = [{"text": f"t{i}", "m": i} for i in range(7)]
    spec = CorpusSpec(items, part_docs=3)
    parts = list_parts(spec, first=5)
    assert [(p.index, p.start, p.stop) for p in parts] == [(5, 0, 3), (6, 3, 6), (7, 6, 7)]
    assert _docs(spec) == _oracle(items)


@pytest.mark.parametrize("max_docs", [1, 3, 4, 9, 11, 100])
def test_max_docs_across_parts(tmp_path, max_docs):
    path = _jsonl(tmp_path / "c.jsonl", 11)
    spec = CorpusSpec(path, part_bytes=60, max_docs=max_docs)
    assert _docs(spec) == _oracle(path, max_docs=max_docs)


def test_listing_changes_with_the_input_only(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", 12)
    a = [p.fingerprint() for p in list_parts(CorpusSpec(path, part_bytes=100))]
    assert a == [p.fingerprint() for p in list_parts(CorpusSpec(path, part_bytes=100))]
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    b = [p.fingerprint() for p in list_parts(CorpusSpec(path, part_bytes=100))]
    assert b[-1] != a[-1] and len(set(a) & set(b)) == 0  # every range records the file's size


def test_a_bad_line_names_its_part_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    good = [json.dumps({"text": f"document {i}"}) for i in range(8)]
    path.write_text("\n".join(good[:6] + ["{not json"] + good[6:]) + "\n")
    spec = CorpusSpec(str(path), part_bytes=60)
    parts = list_parts(spec)
    bad = next(p for p in parts if p.start <= path.read_text().index("{not json") < p.stop)
    for p in parts:
        if p is not bad:
            list(read_part(p, spec))
    with pytest.raises(CorpusError, match=rf"corpus part {bad.index} \(.*c.jsonl bytes {bad.start}-{bad.stop}\).*line"):
        list(read_part(bad, spec))
