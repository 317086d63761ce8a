"""Token-aligned labels from character spans (`actstore label`): `labels/<name>.parquet` beside a committed store.

A span `{doc_id, start, end, label}` names characters [start, end) of a document's text, or with `target:
response` of its generated response (stores written with `generate`, whose response tokens' spans index the
response text). A token row (a prompt/text row for text spans, a response row for response spans) gets the
label of a span its own character span overlaps (`char_start < end and start < char_end`); special tokens
(char span (-1, -1)) and tokens no span touches stay null. Spans of one document may overlap only when they
carry the same label, so every token has at most one.

Everything is checked before anything is written; then the table goes to a temporary name, is renamed into
place (object stores replace on PUT), and the manifest -- rewritten atomically -- lists it with its row count
and SHA-256, which `verify` checks (`pipeline.store.verify`). No other file of the store is touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.pipeline.store.store import Store, open_store
from actstore.schemas import layout
from actstore.schemas.errors import LabelError
from actstore.schemas.manifest import LabelInfo, Manifest
from actstore.workers import storage

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
TARGETS = ("text", "response")


@dataclass(frozen=True)
class Span:
    doc_id: int
    start: int
    end: int
    label: str | int
    target: str = "text"  # "text": the document's text; "response": its generated response


def label(store_or_url: Any, spans: str | os.PathLike | Iterable[dict], name: str, overwrite: bool = False,
          storage_options: dict[str, Any] | None = None) -> LabelInfo:
    """Add the span labels `spans` (a JSONL path or an iterable of dicts) to a store as `labels/<name>.parquet`.

    Each span is `{doc_id, start, end, label}` with character offsets into the document's text, or, with
    `target: "response"`, into its generated response (stores written with `generate`). Raises LabelError,
    naming the first problem, before writing anything when a span is outside its text, spans of one document
    overlap with different labels, a doc id is not in the store, a response span names a store without
    responses, the store has no character spans (written before they existed), or `name` exists (unless
    `overwrite`).
    Returns the manifest's record of the new table; a Store given is updated to the new manifest.
    """
    # re-read the committed manifest even for a Store: an object opened before another label was added would
    # otherwise write back a manifest without it
    if isinstance(store_or_url, Store):
        store = open_store(store_or_url.url, storage_options or store_or_url._storage_options)
    else:
        store = open_store(str(store_or_url), storage_options)
    _check_name(store, name, overwrite)
    parsed = read_spans(spans)
    if not store.has_char_spans:
        raise LabelError(f"store {store.url} has no character spans per token (written by an actstore before "
                         "they existed, by from_arrays, or with a slow tokenizer); re-extract it to label spans")
    n_chars = _doc_lengths(store)
    resp_chars = _response_lengths(store) if any(sp.target == "response" for sp in parsed) else None
    check_spans(parsed, n_chars, resp_chars)
    tokens = store.tokens()
    cols = ["doc_id", "char_start", "char_end"] + (["response"] if "response" in tokens.column_names else [])
    column = align(tokens.select(cols), parsed)
    info, manifest = _commit(store, name, column)
    if isinstance(store_or_url, Store):  # the caller's object sees the new label (shards are unchanged)
        store_or_url.manifest = manifest.model_copy(update={"shards": store.manifest.shards})
    return info


def read_spans(spans: str | os.PathLike | Iterable[dict]) -> list[Span]:
    """Parse span records (JSONL lines or dicts), refusing malformed ones with their line number."""
    if isinstance(spans, (str, os.PathLike)):
        try:
            with open(spans, encoding="utf-8") as f:
                lines = [(i, ln) for i, ln in enumerate(f, 1) if ln.strip()]
        except OSError as e:
            raise LabelError(f"cannot read span file {str(spans)!r}: {e.strerror or e}") from None
        records = [(i, _json_line(spans, i, ln)) for i, ln in lines]
    else:
        records = list(enumerate(spans, 1))
    out = [parse_span(f"span {i}", r) for i, r in records]
    if not out:
        raise LabelError("the span file holds no spans")
    return out


def _json_line(path: Any, i: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise LabelError(f"{path}:{i} is not valid JSON: {e.msg}") from None


def parse_span(i: str, r: Any) -> Span:
    if not isinstance(r, dict):
        raise LabelError(f"{i} must be a JSON object with doc_id, start, end, label")
    missing = [k for k in ("doc_id", "start", "end", "label") if k not in r]
    if missing:
        raise LabelError(f"{i} lacks {', '.join(missing)} (each span needs doc_id, start, end, label)")
    target = r.get("target", "text")
    if target not in TARGETS:
        raise LabelError(f"{i} has target {target!r}; use text or response")
    for k in ("doc_id", "start", "end"):
        if not isinstance(r[k], int) or isinstance(r[k], bool):
            raise LabelError(f"{i}: {k} must be an integer, got {r[k]!r}")
    lab = r["label"]
    if not isinstance(lab, (str, int)) or isinstance(lab, bool):
        raise LabelError(f"{i}: label must be a string or an integer, got {lab!r}")
    return Span(r["doc_id"], r["start"], r["end"], lab, target)


def check_spans(spans: list[Span], n_chars: dict[int, int], resp_chars: dict[int, int | None] | None = None) -> None:
    """Every span inside its document's text (`n_chars`: doc_id -> length) or response (`resp_chars`: doc_id ->
    response length, None for a document without one); overlapping spans of one document and target carry the
    same label."""
    if len({type(s.label) for s in spans}) > 1:
        raise LabelError("span labels mix strings and integers; use one type for every label")
    for s in spans:
        if s.doc_id not in n_chars:
            raise LabelError(f"span {s.doc_id}:[{s.start}, {s.end}) names doc_id {s.doc_id}, which is not in the "
                             f"store (docs.parquet lists its doc ids)")
        n = n_chars[s.doc_id] if s.target == "text" else (resp_chars or {}).get(s.doc_id)
        if n is None:
            raise LabelError(f"span [{s.start}, {s.end}) of doc {s.doc_id} targets its response, but the document "
                             "has no generated response")
        what = "text" if s.target == "text" else "response"
        if not 0 <= s.start < s.end or s.end > n:
            raise LabelError(f"span [{s.start}, {s.end}) of doc {s.doc_id} is outside its {what} of "
                             f"{n} characters (need 0 <= start < end <= length)")
    by_doc = sorted(spans, key=lambda s: (s.doc_id, s.target, s.start, s.end))
    active: list[Span] = []  # spans of the current document and target that reach past the current start
    for s in by_doc:
        active = [a for a in active if (a.doc_id, a.target) == (s.doc_id, s.target) and a.end > s.start]
        clash = next((a for a in active if a.label != s.label), None)
        if clash is not None:
            raise LabelError(f"spans [{clash.start}, {clash.end}) {clash.label!r} and [{s.start}, {s.end}) "
                             f"{s.label!r} of doc {s.doc_id} overlap with different labels")
        active.append(s)


def align(tokens: pa.Table, spans: list[Span]) -> pa.Array:
    """The label of each token row (null where no span overlaps its character span)."""
    doc = tokens.column("doc_id").to_numpy()
    start = tokens.column("char_start").to_numpy()
    end = tokens.column("char_end").to_numpy()
    resp = (tokens.column("response").to_numpy(zero_copy_only=False).astype(bool)
            if "response" in tokens.column_names else np.zeros(len(doc), bool))
    out: list[Any] = [None] * len(doc)
    for target, is_resp in (("text", False), ("response", True)):
        chosen = [s for s in spans if s.target == target]
        if chosen:
            _align_rows(np.flatnonzero((start >= 0) & (resp == is_resp)), doc, start, end, chosen, out)
    return pa.array(out, pa.string() if any(isinstance(s.label, str) for s in spans) else pa.int64())


def _align_rows(text_rows: np.ndarray, doc: np.ndarray, start: np.ndarray, end: np.ndarray, spans: list[Span],
                out: list[Any]) -> None:
    """Label the rows of `text_rows` (rows whose spans index one kind of text) that `spans` overlap."""
    # rows of one document in character order: stable sort by doc keeps the store's order, which within a
    # document is increasing in characters (windows of a packed document follow each other)
    rows = text_rows[np.argsort(doc[text_rows], kind="stable")]
    sorted_doc = doc[rows]  # doc ids are sparse in format v2 (part << 32 | index): look each one up
    for s in spans:
        r = rows[np.searchsorted(sorted_doc, s.doc_id, "left"):np.searchsorted(sorted_doc, s.doc_id, "right")]
        a = np.searchsorted(end[r], s.start, side="right")  # first token ending after the span starts
        b = np.searchsorted(start[r], s.end, side="left")  # first token starting at or after the span's end
        for i in r[a:b]:
            out[i] = s.label


def _doc_lengths(store: Any) -> dict[int, int]:
    docs = store.docs()
    if "n_chars" not in docs.column_names:
        raise LabelError(f"docs.parquet of {store.url} has no n_chars column; re-extract the store to label spans")
    return dict(zip(docs.column("doc_id").to_pylist(), docs.column("n_chars").to_pylist()))


def _response_lengths(store: Any) -> dict[int, int | None]:
    docs = store.docs()
    if "response" not in docs.column_names:
        raise LabelError(f"spans target generated responses, but the store {store.url} has none (it was not "
                         "extracted with generate); use target: text")
    texts = docs.column("response").to_pylist()
    return {d: None if t is None else len(t) for d, t in zip(docs.column("doc_id").to_pylist(), texts)}


def _check_name(store: Any, name: str, overwrite: bool) -> None:
    if not NAME.fullmatch(name):
        raise LabelError(f"label name {name!r} must be letters, digits, '_', '.' or '-' (at most 100, starting "
                         "with a letter or digit)")
    listed = any(lab.name == name for lab in store.manifest.labels or [])
    exists = listed or store.fs.exists(layout.label_file(store.root, name))  # a file left by an interrupted label run too
    if exists and not overwrite:
        raise LabelError(f"label {name!r} already exists in {store.url}; pass --overwrite (overwrite=True) to "
                         "replace it")


def _commit(store: Any, name: str, column: pa.Array) -> tuple[LabelInfo, Manifest]:
    info = write_table(store.fs, store.root, name, column)
    kept = [lab for lab in store.manifest.labels or [] if lab.name != name]
    # a store whose shard list lives in its Parquet index keeps it there (open_store filled it in for reading)
    shards = [] if store.manifest.shard_index is not None else store.manifest.shards
    manifest = Manifest.model_validate({**store.manifest.model_dump(), "shards": shards, "labels": [*kept, info]})
    mpath = layout.join(store.root, layout.MANIFEST)
    storage.with_retries(lambda: storage.put_atomic(store.fs, mpath, manifest.to_json()), "writing manifest.json")
    return info, manifest


def write_table(fs: Any, root: str, name: str, column: pa.Array) -> LabelInfo:
    """Write labels/<name>.parquet atomically; returns its manifest record (the caller commits the manifest)."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"label": column}), buf, compression="zstd")
    raw = buf.getvalue()
    info = LabelInfo(name=name, n_rows=len(column), n_labelled=len(column) - column.null_count,
                     dtype="string" if pa.types.is_string(column.type) else "int64",
                     sha256=hashlib.sha256(raw).hexdigest())
    path = layout.label_file(root, name)
    storage.with_retries(lambda: storage.put_atomic(fs, path, raw), f"writing {path}")
    return info
