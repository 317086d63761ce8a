"""Corpus parts (store format v2): the corpus cut into pieces that derive from the input alone.

Listing parts reads metadata only (file sizes from the listing, the footer of a Parquet file above `part_bytes`),
never the text, and works on any fsspec URL:

- consecutive whole files are grouped into one part while their sizes add up to at most `part_bytes` (a corpus of
  many small files must not become as many tiny shards);
- a .jsonl file, or a .txt file read with `split: lines`, above `part_bytes` is cut into byte ranges of
  `part_bytes`. A range holds the lines that *start* in it: its reader skips to the first line start at or after
  the range's first byte and reads until a line starts at or after its last, so every line is read exactly once
  and no part needs another part's bytes;
- a .parquet file above `part_bytes` with several row groups is cut into runs of row groups of at most
  `part_bytes` compressed bytes (at least one row group each);
- a .txt file read as one document is never cut;
- a Python list is cut every `part_docs` items.

Ids: document i and sequence j of part p get doc_id = p << 32 | i and seq_id = p << 32 | j (`PART_SHIFT`): unique
int64 values that derive from the input alone, so parts can be read, tokenized and written anywhere and in any
order. A one-part corpus keeps the ids 0, 1, 2, ...

`max_docs` is the one setting that needs the text: parts are then counted in order (Parquet from its metadata,
lines by reading them) until the limit is reached, and the part where it falls is read up to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import fsspec
import pyarrow.parquet as pq

from actstore.schemas.errors import CorpusError
from actstore.workers import corpus as corpus_mod
from actstore.workers.corpus import Document

PART_SHIFT = 32  # doc_id / seq_id = part << PART_SHIFT | index within the part
PART_LIMIT = 1 << PART_SHIFT  # documents and sequences per part, and parts per corpus (ids stay below 2**63)


@dataclass(frozen=True)
class Part:
    """One part of a corpus: what to read (the unit of tokenization, packing and resume)."""

    index: int
    kind: str  # "files" (whole files), "bytes" (a line-aligned byte range), "rowgroups", "list"
    files: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    start: int = 0  # first byte / row group / list item
    stop: int = 0  # end (exclusive)
    limit: int | None = None  # read at most this many documents (max_docs)
    items: list | None = field(default=None, compare=False)  # list corpora: the part's items
    items_sha256: str | None = None

    def describe(self) -> str:
        """Which input the part is, for messages and the manifest."""
        if self.kind == "list":
            return f"list[{self.start}:{self.stop}]"
        if self.kind == "bytes":
            return f"{self.files[0]} bytes {self.start}-{self.stop}"
        if self.kind == "rowgroups":
            return f"{self.files[0]} row groups {self.start}-{self.stop - 1}"
        more = f" and {len(self.files) - 1} more files" if len(self.files) > 1 else ""
        return f"{self.files[0]}{more}"

    def fingerprint(self) -> str:
        """SHA-256 of the listing (files, sizes, range, limit; a list part's content hash)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("items", "index")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """The part as recorded in the store (a list part's items are not: they are the corpus itself)."""
        return {k: v for k, v in asdict(self).items() if k != "items"}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> Part:
        d = json.loads(raw)
        return cls(**{**d, "files": tuple(d["files"]), "sizes": tuple(d["sizes"])})


@dataclass(frozen=True)
class CorpusSpec:
    """The corpus settings a part reader needs (a subset of ExtractConfig, cheap to ship to workers)."""

    corpus: str | list
    text_field: str = "text"
    split: str = "document"
    storage_options: dict = field(default_factory=dict)
    extensions: list[str] | None = None
    max_docs: int | None = None
    part_bytes: int = 256 << 20
    part_docs: int = 100_000

    @classmethod
    def of(cls, cfg: Any) -> CorpusSpec:
        return cls(cfg.corpus, cfg.text_field, cfg.split, dict(cfg.storage_options), cfg.extensions, cfg.max_docs,
                   cfg.part_bytes, cfg.part_docs)

    def describe(self) -> str:
        return repr(self.corpus) if isinstance(self.corpus, str) else f"<list of {len(self.corpus)} items>"

    def fs(self) -> fsspec.AbstractFileSystem:
        assert isinstance(self.corpus, str)
        return fsspec.core.url_to_fs(self.corpus, **self.storage_options)[0]


# ---- listing ----------------------------------------------------------------------------------------------
def list_parts(spec: CorpusSpec, first: int = 0) -> list[Part]:
    """The corpus' parts in order, numbered from `first`; raises CorpusError for missing or empty corpora."""
    if isinstance(spec.corpus, list):
        parts = _list_parts(spec.corpus, spec.part_docs, first)
    else:
        fs, files = corpus_mod.corpus_files(spec.corpus, spec.storage_options, spec.extensions)
        sizes = _sizes(fs, files)
        if not any(sizes):
            raise CorpusError(f"corpus {spec.describe()} holds no documents (every file is empty)")
        parts = _file_parts(fs, files, sizes, spec, first)
    if spec.max_docs is not None:
        parts = _limited(parts, spec)
    if len(parts) >= PART_LIMIT:
        raise CorpusError(f"corpus {spec.describe()} makes {len(parts):,} parts; raise part_bytes")
    return parts


def _list_parts(items: list, per_part: int, first: int) -> list[Part]:
    parts = []
    for n, a in enumerate(range(0, len(items), per_part)):
        chunk = items[a:a + per_part]
        digest = hashlib.sha256(json.dumps(chunk, sort_keys=True, default=str, ensure_ascii=False).encode())
        parts.append(Part(first + n, "list", start=a, stop=a + len(chunk), items=chunk,
                          items_sha256=digest.hexdigest()))
    return parts


def _sizes(fs: fsspec.AbstractFileSystem, files: list[str]) -> list[int]:
    """File sizes, from one listing of their folders where the filesystem allows (one request, not one per file)."""
    known: dict[str, int] = {}
    for folder in sorted({f.rsplit("/", 1)[0] for f in files}) if len(files) > 1 else []:
        try:
            known.update({e["name"]: int(e.get("size") or 0) for e in fs.ls(folder, detail=True)})
        except (OSError, ValueError):
            pass
    return [known[f] if f in known else int(fs.info(f).get("size") or 0) for f in files]


def _splittable(path: str, split: str) -> bool:
    return path.endswith(".jsonl") or (path.endswith(".txt") and split == "lines")


def _file_parts(fs: fsspec.AbstractFileSystem, files: list[str], sizes: list[int], spec: CorpusSpec,
                first: int) -> list[Part]:
    parts: list[Part] = []
    group: list[tuple[str, int]] = []

    def flush() -> None:
        if group:
            parts.append(Part(first + len(parts), "files", tuple(f for f, _ in group), tuple(s for _, s in group)))
            group.clear()

    for path, size in zip(files, sizes):
        pieces = _cut(fs, path, size, spec) if size > spec.part_bytes else None
        if pieces:
            flush()
            base = first + len(parts)  # fixed first: extend() grows `parts` while it consumes the generator
            parts.extend(replace(p, index=base + i) for i, p in enumerate(pieces))
            continue
        if group and sum(s for _, s in group) + size > spec.part_bytes:
            flush()
        group.append((path, size))
    flush()
    return parts


def _cut(fs: fsspec.AbstractFileSystem, path: str, size: int, spec: CorpusSpec) -> list[Part] | None:
    """A large file's pieces, or None when it cannot be cut (one .txt document, one row group)."""
    if _splittable(path, spec.split):
        step = spec.part_bytes
        return [Part(0, "bytes", (path,), (size,), a, min(size, a + step)) for a in range(0, size, step)]
    if path.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        groups = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                  for g in range(meta.num_row_groups)]
        if len(groups) < 2:
            return None
        runs, start, acc = [], 0, 0
        for g, n in enumerate(groups):
            if g > start and acc + n > spec.part_bytes:
                runs.append((start, g))
                start, acc = g, 0
            acc += n
        runs.append((start, len(groups)))
        return [Part(0, "rowgroups", (path,), (size,), a, b) for a, b in runs]
    return None


def _limited(parts: list[Part], spec: CorpusSpec) -> list[Part]:
    """The parts that hold the first `max_docs` documents, the last one limited to the rest."""
    left, out = spec.max_docs or 0, []
    for p in parts:
        if left <= 0:
            break
        n = count_documents(p, spec)
        out.append(replace(p, limit=left) if n > left else p)
        left -= n
    return out


def count_documents(part: Part, spec: CorpusSpec) -> int:
    """Documents a part yields (Parquet: from its metadata; text: by reading the lines, not parsing them)."""
    if part.kind == "list":
        return part.stop - part.start
    fs, n = spec.fs(), 0
    if part.kind == "rowgroups":
        with fs.open(part.files[0], "rb") as f:
            meta = pq.ParquetFile(f).metadata
        return sum(meta.row_group(g).num_rows for g in range(part.start, part.stop))
    if part.kind == "bytes":
        return sum(1 for _, line in _range_lines(fs, part.files[0], part.start, part.stop) if line.strip())
    for path in part.files:
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                n += pq.ParquetFile(f).metadata.num_rows
        elif path.endswith(".txt") and spec.split == "document":
            n += 1
        else:
            with fs.open(path, "rb") as f:
                n += sum(1 for line in f if line.strip())
    return n


# ---- reading ----------------------------------------------------------------------------------------------
def read_part(part: Part, spec: CorpusSpec) -> Iterator[Document]:
    """The part's documents in order; a bad record raises CorpusError naming the part and the record."""
    it = _documents(part, spec)
    try:
        for i, doc in enumerate(it):
            if part.limit is not None and i >= part.limit:
                return
            if i >= PART_LIMIT:
                raise CorpusError(f"more than {PART_LIMIT:,} documents; lower part_bytes")
            yield doc
    except CorpusError as e:
        raise CorpusError(f"corpus part {part.index} ({part.describe()}): {e}") from None
    except (OSError, ValueError) as e:  # unreadable file, broken Parquet, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorpusError(f"corpus part {part.index} ({part.describe()}) cannot be read: {first}") from None


def _documents(part: Part, spec: CorpusSpec) -> Iterator[Document]:
    if part.kind == "list":
        for i, item in enumerate(part.items or [], part.start):
            yield corpus_mod.list_item(item, i, spec.text_field)
        return
    fs = spec.fs()
    if part.kind == "bytes":
        yield from _range_documents(fs, part, spec)
    elif part.kind == "rowgroups":
        yield from corpus_mod.read_parquet(fs, part.files[0], spec.text_field, range(part.start, part.stop))
    else:
        for path in part.files:
            yield from corpus_mod.read_file(fs, path, spec.text_field, spec.split)


def _range_lines(fs: fsspec.AbstractFileSystem, path: str, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line that starts in [start, stop)."""
    with fs.open(path, "rb") as f:
        pos = start
        if start > 0:  # the line running through `start` - 1 belongs to the previous range
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
        while pos < stop:
            line = f.readline(corpus_mod.MAX_JSON_LINE + 1)
            if not line:
                return
            if len(line) > corpus_mod.MAX_JSON_LINE:
                raise CorpusError(f"the line at byte {pos} is longer than {corpus_mod.MAX_JSON_LINE} bytes")
            yield pos, line
            pos += len(line)


def _range_documents(fs: fsspec.AbstractFileSystem, part: Part, spec: CorpusSpec) -> Iterator[Document]:
    path = part.files[0]
    for n, (pos, raw) in enumerate(_range_lines(fs, path, part.start, part.stop), 1):
        where = f"{path} line {n} of the part (byte {pos})"
        if not raw.strip():
            continue
        if path.endswith(".jsonl"):
            yield corpus_mod.json_record(raw, spec.text_field, where, source=path)
        else:
            for line in corpus_mod.decode(raw, where).splitlines():  # the same line breaks as a whole-file read
                if line.strip():
                    yield Document(line, f"{path}@{pos}", where=where)
