"""Span labels carried by corpus records (config `span_field`), mapped onto tokens when a run commits.

The driver reads the records' span fields once before anything is written (a bad span stops the run with
nothing on disk); the workers hash the field with the document and leave it out of docs.parquet. At commit the
spans are aligned with the committed token index exactly as `actstore label` aligns them, so both paths write
the same `labels/<span_field>.parquet`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from actstore.pipeline.extract.labels import LabelError, Span, align, check_spans, parse_span, write_table
from actstore.schemas import layout
from actstore.schemas.errors import CorpusError
from actstore.schemas.manifest import LabelInfo, ShardInfo
from actstore.workers import storage
from actstore.workers.corpus import Document
from actstore.workers.parts import PART_SHIFT, CorpusSpec, Part, read_part


def read_record_spans(field: str, parts: list[Part], spec: CorpusSpec, tok: Any) -> list[Span]:
    """Every record's spans with the doc ids the run gives its documents, checked against their texts."""
    spans: list[Span] = []
    n_chars: dict[int, int] = {}
    for part in parts:
        for i, doc in enumerate(read_part(part, spec)):
            doc_id = part.index << PART_SHIFT | i
            n_chars[doc_id] = len(doc.text)
            spans.extend(doc_spans(doc, doc_id, field))
    if spans and not getattr(tok, "is_fast", False):
        raise CorpusError(f"span_field {field!r}: the tokenizer gives no character offsets (a slow tokenizer), so "
                          "spans cannot be mapped onto tokens")
    check_spans(spans, n_chars)
    return spans


def doc_spans(doc: Document, doc_id: int, field: str) -> list[Span]:
    """The span labels a corpus record holds in `field` (none when it lacks the field)."""
    raw = doc.meta.get(field)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise CorpusError(f"{doc.where or f'document {doc_id}'}: span_field {field!r} must hold a list of "
                          f"{{start, end, label}} objects, got {type(raw).__name__}")
    try:
        return [parse_span(f"{field}[{i}] of document {doc_id}", {**s, "doc_id": doc_id} if isinstance(s, dict)
                           else s) for i, s in enumerate(raw)]
    except LabelError as e:
        raise CorpusError(f"{doc.where or f'document {doc_id}'}: {e}") from None


def write_record_labels(fs: Any, root: str, name: str, shards: list[ShardInfo], spans: list[Span]) -> LabelInfo:
    """labels/<name>.parquet over the committed shards' token rows, in store order."""
    cols = ["doc_id", "char_start", "char_end"]
    tables = []
    for s in shards:
        path = layout.shard_file(root, s.id, layout.TOKENS)
        raw = storage.with_retries(lambda p=path: fs.cat_file(p), f"reading {path}")
        table = pq.read_table(pa.BufferReader(raw))  # with `response` in generated stores: text spans skip those
        tables.append(table.select(cols + (["response"] if "response" in table.column_names else [])))
    return write_table(fs, root, name, align(pa.concat_tables(tables), spans))
