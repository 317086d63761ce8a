"""Corpus reading: .txt/.jsonl/.parquet files, directories and globs of them (local or fsspec URLs), or lists.

Yields `Document`s in a deterministic order (sorted paths, then file order). Every non-text field of a record
becomes document metadata (a docs.parquet column). Bad input fails with a one-line error naming file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq

SUFFIXES = (".txt", ".jsonl", ".parquet")
MAX_JSON_LINE = 64 << 20  # a single JSON record above 64 MiB is refused (JSON inputs have size limits)


class CorpusError(ValueError):
    """The corpus cannot be read; the message names the file (and line) and the fix."""


@dataclass
class Document:
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def iter_documents(
    corpus: str | list, text_field: str = "text", split: str = "document",
    storage_options: dict | None = None, max_docs: int | None = None,
) -> Iterator[Document]:
    """All documents of a corpus spec, in a stable order, at most `max_docs`."""
    it = _iter_list(corpus, text_field) if isinstance(corpus, list) else _iter_files(
        corpus, text_field, split, storage_options or {})
    for i, doc in enumerate(it):
        if max_docs is not None and i >= max_docs:
            return
        yield doc


def corpus_files(spec: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Expand a file, directory or glob to the sorted list of readable files."""
    fs, path = fsspec.core.url_to_fs(spec, **storage_options)
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(SUFFIXES))
    elif fs.exists(path):
        files = [path]
    else:
        raise CorpusError(f"corpus {spec!r} does not exist")
    files = [f for f in files if not fs.isdir(f)]
    bad = [f for f in files if not f.endswith(SUFFIXES)]
    if bad:
        raise CorpusError(f"corpus file {bad[0]!r} has an unsupported type; use .txt, .jsonl or .parquet")
    if not files:
        raise CorpusError(f"corpus {spec!r} matches no .txt/.jsonl/.parquet files")
    return fs, files


def _iter_files(spec: str, text_field: str, split: str, storage_options: dict) -> Iterator[Document]:
    fs, files = corpus_files(spec, storage_options)
    for path in files:
        if path.endswith(".txt"):
            yield from _read_txt(fs, path, split)
        elif path.endswith(".jsonl"):
            yield from _read_jsonl(fs, path, text_field)
        else:
            yield from _read_parquet(fs, path, text_field)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where} is not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def _read_txt(fs: fsspec.AbstractFileSystem, path: str, split: str) -> Iterator[Document]:
    text = _decode(fs.cat_file(path), path)
    if split == "document":
        yield Document(text, path)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield Document(line, f"{path}:{n}")


def _read_jsonl(fs: fsspec.AbstractFileSystem, path: str, text_field: str) -> Iterator[Document]:
    with fs.open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            if len(raw) > MAX_JSON_LINE:
                raise CorpusError(f"{where} is longer than {MAX_JSON_LINE} bytes")
            if not raw.strip():
                continue
            try:
                rec = json.loads(_decode(raw, where))
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where} is not valid JSON: {e.msg} (column {e.colno})") from None
            yield _record_doc(rec, text_field, where)


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str, text_field: str) -> Iterator[Document]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise CorpusError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                              "set text_field")
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                yield _record_doc(rec, text_field, f"{path} row {row}")
                row += 1


def _iter_list(items: list, text_field: str) -> Iterator[Document]:
    for i, item in enumerate(items):
        if isinstance(item, str):
            yield Document(item, f"list[{i}]")
        elif isinstance(item, dict):
            yield _record_doc(item, text_field, f"list[{i}]")
        else:
            raise CorpusError(f"corpus list item {i} is a {type(item).__name__}; use strings or dicts")


def _record_doc(rec: Any, text_field: str, where: str) -> Document:
    if not isinstance(rec, dict):
        raise CorpusError(f"{where} is a JSON {type(rec).__name__}, expected an object with {text_field!r}")
    if text_field not in rec:
        raise CorpusError(f"{where} has no field {text_field!r} (fields: {', '.join(map(str, rec))}); set text_field")
    text = rec[text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {text_field!r} is a {type(text).__name__}, expected a string")
    meta = {k: v for k, v in rec.items() if k != text_field}
    reserved = {"doc_id", "source", "n_tokens"} & set(meta)
    if reserved:
        raise CorpusError(f"{where}: metadata field {sorted(reserved)[0]!r} is reserved by actstore; rename it")
    return Document(text, where.rsplit(" line ", 1)[0].rsplit(" row ", 1)[0], meta)


def doc_digest(h: hashlib._Hash, doc: Document) -> None:
    """Fold one document (text and metadata) into a running corpus hash."""
    blob = json.dumps([doc.text, doc.meta], sort_keys=True, default=str, ensure_ascii=False)
    h.update(hashlib.sha256(blob.encode("utf-8")).digest())
