"""Corpus reading: .txt/.jsonl/.parquet files, directories and globs of them (local or fsspec URLs), or lists.

Yields `Document`s in a deterministic order (sorted paths, then file order). Every non-text field of a record
becomes document metadata (a docs.parquet column). Bad input fails with a one-line error naming file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq

from actstore.schemas.errors import CorpusError

log = logging.getLogger("actstore")

SUFFIXES = (".txt", ".jsonl", ".parquet")
MAX_JSON_LINE = 64 << 20  # a single JSON record above 64 MiB is refused (JSON inputs have size limits)


@dataclass
class Document:
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # file and line/row (or list index): named in errors, never stored


def iter_documents(
    corpus: str | list, text_field: str = "text", split: str = "document",
    storage_options: dict | None = None, max_docs: int | None = None, extensions: list[str] | None = None,
) -> Iterator[Document]:
    """All documents of a corpus spec, in a stable order, at most `max_docs`."""
    it = _iter_list(corpus, text_field) if isinstance(corpus, list) else _iter_files(
        corpus, text_field, split, storage_options or {}, extensions)
    for i, doc in enumerate(it):
        if max_docs is not None and i >= max_docs:
            return
        yield doc


def corpus_files(spec: str, storage_options: dict,
                 extensions: list[str] | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Expand a file, directory or glob to the sorted list of readable files."""
    fs, path = fsspec.core.url_to_fs(spec, **storage_options)
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = _directory_files(fs, path, spec, extensions)
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


def _directory_files(fs: fsspec.AbstractFileSystem, path: str, spec: str, extensions: list[str] | None) -> list[str]:
    """The files of a directory with the chosen extensions (default: the first file's), others listed once.

    A folder often holds a README, a manifest or files of another format beside the corpus: reading them all
    would mix documents silently, so only one kind is read unless `extensions` names several."""
    every = sorted(p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith("."))
    supported = [p for p in every if p.endswith(SUFFIXES)]
    if not supported:
        return []
    wanted = tuple(extensions) if extensions else ("." + supported[0].rsplit(".", 1)[-1],)
    files = [p for p in every if p.endswith(wanted)]
    skipped = [p.rsplit("/", 1)[-1] for p in every if not p.endswith(wanted)]
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        why = "as asked (extensions)" if extensions else f"{wanted[0]}, the type of its first file"
        log.warning("corpus %s: reading %d %s files (%s); skipped %d other files: %s (set extensions: to choose)",
                    spec, len(files), "/".join(wanted), why, len(skipped), shown)
    return files


def _iter_files(spec: str, text_field: str, split: str, storage_options: dict,
                extensions: list[str] | None = None) -> Iterator[Document]:
    fs, files = corpus_files(spec, storage_options, extensions)
    for path in files:
        yield from read_file(fs, path, text_field, split)


def read_file(fs: fsspec.AbstractFileSystem, path: str, text_field: str, split: str) -> Iterator[Document]:
    """The documents of one corpus file, by its type."""
    if path.endswith(".txt"):
        yield from _read_txt(fs, path, split)
    elif path.endswith(".jsonl"):
        yield from _read_jsonl(fs, path, text_field)
    else:
        yield from read_parquet(fs, path, text_field)


def decode(raw: bytes, where: str) -> str:
    """UTF-8 text; a leading byte-order mark (as some Windows editors write) is dropped."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where} is not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def _read_txt(fs: fsspec.AbstractFileSystem, path: str, split: str) -> Iterator[Document]:
    text = decode(fs.cat_file(path), path)
    if split == "document":
        yield Document(text, path, where=path)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield Document(line, f"{path}:{n}", where=f"{path} line {n}")


def _read_jsonl(fs: fsspec.AbstractFileSystem, path: str, text_field: str) -> Iterator[Document]:
    with fs.open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            if len(raw) > MAX_JSON_LINE:
                raise CorpusError(f"{where} is longer than {MAX_JSON_LINE} bytes")
            if not raw.strip():
                continue
            yield json_record(raw, text_field, where, path)


def json_record(raw: bytes, text_field: str, where: str, source: str) -> Document:
    """One JSON line as a document."""
    try:
        rec = json.loads(decode(raw, where))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where} is not valid JSON: {e.msg} (column {e.colno})") from None
    return _record_doc(rec, text_field, where, source)


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, text_field: str,
                 row_groups: range | None = None) -> Iterator[Document]:
    """The rows of a Parquet file (or of some of its row groups) as documents; rows are numbered in the file."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise CorpusError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                              "set text_field")
        groups = list(row_groups) if row_groups is not None else None
        row = sum(pf.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0
        for batch in pf.iter_batches(batch_size=4096, row_groups=groups):
            for rec in batch.to_pylist():
                yield _record_doc(rec, text_field, f"{path} row {row}", path)
                row += 1


def _iter_list(items: list, text_field: str) -> Iterator[Document]:
    for i, item in enumerate(items):
        yield list_item(item, i, text_field)


def list_item(item: Any, i: int, text_field: str) -> Document:
    """Item `i` of a corpus given as a Python list."""
    if isinstance(item, str):
        return Document(item, f"list[{i}]", where=f"list[{i}]")
    if isinstance(item, dict):
        return _record_doc(item, text_field, f"list[{i}]", f"list[{i}]")
    raise CorpusError(f"corpus list item {i} is a {type(item).__name__}; use strings or dicts")


def _record_doc(rec: Any, text_field: str, where: str, source: str) -> Document:
    if not isinstance(rec, dict):
        raise CorpusError(f"{where} is a JSON {type(rec).__name__}, expected an object with {text_field!r}")
    if text_field not in rec:
        raise CorpusError(f"{where} has no field {text_field!r} (fields: {', '.join(map(str, rec))}); set text_field")
    text = rec[text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {text_field!r} is a {type(text).__name__}, expected a string")
    meta = {k: v for k, v in rec.items() if k != text_field}
    reserved = {"doc_id", "source", "n_chars", "n_tokens"} & set(meta)
    if reserved:
        raise CorpusError(f"{where}: metadata field {sorted(reserved)[0]!r} is reserved by actstore; rename it")
    return Document(text, source, meta, where)


GENERATED_FIELDS = ("response", "finish_reason")  # docs.parquet columns that generation writes


def check_generated_fields(doc: Document) -> None:
    """With `generate`, a prompt record must not carry the docs columns generation writes (a dataset's reference
    answer in `response`, say): one line naming the field, before its prompt is generated."""
    clash = [f for f in GENERATED_FIELDS if f in doc.meta]
    if clash:
        raise CorpusError(f"{doc.where}: metadata field {clash[0]!r} is where generate stores the model's output; "
                          f"rename it in the corpus (e.g. reference_{clash[0]})")


class MetadataTypes:
    """Watches each metadata field's value types across documents and remembers the first conflict per field
    (ints and floats count as one kind: Arrow stores both as numbers)."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[str, str]] = {}  # field -> (kind, where first seen)
        self.conflicts: dict[str, str] = {}  # field -> "int at A, str at B"

    def observe(self, doc: Document) -> None:
        for key, value in doc.meta.items():
            if value is None or key in self.conflicts:
                continue
            kind = "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else \
                type(value).__name__
            seen = self.first.setdefault(key, (kind, doc.where))
            if seen[0] != kind:
                self.conflicts[key] = f"{seen[0]} at {seen[1]}, {kind} at {doc.where}"


def doc_digest(h: hashlib._Hash, doc: Document) -> None:
    """Fold one document (text and metadata) into a running corpus hash."""
    blob = json.dumps([doc.text, doc.meta], sort_keys=True, default=str, ensure_ascii=False)
    h.update(hashlib.sha256(blob.encode("utf-8")).digest())
