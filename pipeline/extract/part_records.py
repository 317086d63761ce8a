"""Driver-side bookkeeping of a streaming (format v2) run: per-part state only, never token ids or documents.

Result rows arrive from the shard stage in any order. `PartTracker` keeps, per part still running, the committed
shard records it has seen and, once the part's summary row has come, how many there are. When a part is
complete it merges the part's shard statistics (in shard order), writes `parts/<part>.stats.safetensors`, then
`parts/<part>.json`: the part's commit record (its listing fingerprint, content hash, counts and shard records),
written last. A resumed run skips every part that has one, without reading or tokenizing it again.

At commit, the store's docs.parquet is built from the parts' docs files (written by the readers) by streaming
them one at a time into one Parquet file; a metadata field whose type differs between parts is stored as
strings, as within a part.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from actstore.pipeline.store.store import merged_stats
from actstore.schemas import layout
from actstore.schemas.errors import OutputError
from actstore.schemas.manifest import PartInfo, ShardInfo
from actstore.workers import storage
from actstore.workers.parts import Part
from actstore.workers.stats import HookStats

log = logging.getLogger("actstore")
PART_FORMAT = "actstore-part-v1"
_PART_ERROR = re.compile(r"corpus part (\d+) \(")


class PartTracker:
    """Collects result rows; commits each part when all its shards are in. `progress(tokens)` per row."""

    def __init__(self, fs: Any, root: str, parts: list[Part], hooks: list[str],
                 progress: Callable[[int], None] = lambda n: None, commit_parts: bool = True) -> None:
        self.fs, self.root, self.hooks, self.progress = fs, root, hooks, progress
        self.parts = {p.index: p for p in parts}
        self.commit_parts = commit_parts  # False for append: hooks (no part records: the store has them)
        self._open: dict[int, dict[str, Any]] = {}
        self.finished: list[int] = []
        self.nodes: dict[str, int] = {}  # worker node -> shards it ran (Ray)

    def add(self, row: dict[str, Any]) -> None:
        self.progress(int(row["n_tokens"]))
        if row.get("node"):
            self.nodes[row["node"]] = self.nodes.get(row["node"], 0) + (row["state"] == "run")
        part = int(row["part"])
        st = self._open.setdefault(part, {"infos": {}, "summary": None})
        if row["shard_id"]:
            st["infos"][int(row["pos"])] = row["info"]
        if row["summary"]:
            st["summary"] = json.loads(row["summary"])
        if st["summary"] is not None and len(st["infos"]) == st["summary"]["n_shards"]:
            self._finish(part, st)

    def _finish(self, part: int, st: dict[str, Any]) -> None:
        del self._open[part]
        if self.commit_parts:
            infos = [ShardInfo.model_validate_json(st["infos"][k]) for k in range(st["summary"]["n_shards"])]
            write_part(self.fs, self.root, self.parts[part], st["summary"], infos, self.hooks)
        self.finished.append(part)


def write_part(fs: Any, root: str, part: Part, summary: dict[str, Any], infos: list[ShardInfo],
               hooks: list[str]) -> None:
    """Commit one finished part: its merged shard statistics, then its record (last).

    Row ranges are counted here from the shards' own row counts: a generated shard learns its length only when
    its responses are, so its shard.json counts its rows from 0 (for every other shard this changes nothing)."""
    infos = local_ranges(infos)
    summary = {**summary, "n_tokens": sum(i.n_tokens for i in infos)}
    if infos:
        stats = merged_stats(fs, root, [i.id for i in infos], hooks)
        blob = stats_bytes(stats)
        path = layout.part_file(root, part.index, layout.PART_STATS)
        storage.with_retries(lambda: storage.put_atomic(fs, path, blob), f"writing {path}")
    record = {"format": PART_FORMAT, "part": part.record(), "fingerprint": part.fingerprint(),
              "source": part.describe(), **{k: summary[k] for k in ("sha256", "n_docs", "n_sequences", "n_tokens",
                                                                      "n_shards", "mixed")},
              "shards": [i.model_dump(mode="json") for i in infos]}
    path = layout.part_file(root, part.index, layout.PART_RECORD)
    storage.with_retries(lambda: storage.put_atomic(fs, path, json.dumps(record, indent=1).encode()),
                         f"writing {path}")


def local_ranges(infos: list[ShardInfo]) -> list[ShardInfo]:
    """Shard records with token ranges tiling the part from row 0, in shard order."""
    out, pos = [], 0
    for i in infos:
        out.append(i.model_copy(update={"token_start": pos, "token_end": pos + i.n_tokens}))
        pos += i.n_tokens
    return out


def stats_bytes(stats: dict[str, HookStats]) -> bytes:
    tensors: dict = {}
    for h, st in stats.items():
        tensors.update(st.to_tensors(f"{h}/"))
    return st_save(tensors, metadata={"actstore": json.dumps({"format": "actstore-part-stats-v1",
                                                              "hooks": list(stats)})})


def read_part(fs: Any, root: str, index: int) -> dict[str, Any] | None:
    """A part's commit record, or None when the part is not committed."""
    path = layout.part_file(root, index, layout.PART_RECORD)
    try:
        return json.loads(storage.with_retries(lambda: fs.cat_file(path), f"reading {path}"))
    except FileNotFoundError:
        return None


def committed_parts(fs: Any, root: str, parts: list[Part]) -> set[int]:
    """Indices of `parts` whose commit record exists; a record of other input is refused (corpus changed)."""
    folder = storage.join(root, layout.PARTS)
    if not fs.exists(folder):
        return set()
    fs.invalidate_cache(folder)
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
    done = set()
    for part in parts:
        if layout.part_file("", part.index, layout.PART_RECORD).lstrip("/").split("/")[-1] not in names:
            continue
        rec = read_part(fs, root, part.index)
        if rec is not None and rec.get("fingerprint") != part.fingerprint():
            raise OutputError(f"corpus part {part.index} ({part.describe()}) changed since an earlier attempt "
                              f"committed it (was {rec.get('source')}); use the original corpus, a new output, or "
                              "--overwrite to start over")
        if rec is not None:
            done.add(part.index)
    return done


def part_info(rec: dict[str, Any]) -> PartInfo:
    return PartInfo(index=rec["part"]["index"], source=rec["source"], fingerprint=rec["fingerprint"],
                    sha256=rec["sha256"], n_docs=rec["n_docs"], n_sequences=rec["n_sequences"],
                    n_tokens=rec["n_tokens"], n_shards=rec["n_shards"])


def part_stats(fs: Any, root: str, index: int, hooks: list[str]) -> dict[str, HookStats]:
    raw = storage.with_retries(lambda: fs.cat_file(layout.part_file(root, index, layout.PART_STATS)),
                               f"reading the statistics of corpus part {index}")
    tensors = st_load(raw)
    return {h: HookStats.from_tensors(tensors, f"{h}/") for h in hooks}


def failed_part(err: BaseException) -> int | None:
    """The part a corpus error names (the message starts with `corpus part N (...)`), if any."""
    m = _PART_ERROR.search(str(err))
    return int(m.group(1)) if m else None


def drop_part_shards(fs: Any, root: str, index: int) -> int:
    """Remove the shards one part committed before it failed (nothing of a failed part stays committed)."""
    prefix = layout.shard_id(index, 0).rsplit("-", 1)[0] + "-"
    folder = storage.join(root, layout.SHARDS)
    if not fs.exists(folder):
        return 0
    fs.invalidate_cache(folder)
    victims = [p for p in fs.ls(folder, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith(prefix)]
    for p in victims:
        fs.rm(p, recursive=True)
    return len(victims)


# ---- docs.parquet from the parts' docs files ------------------------------------------------------------
def unified_schema(schemas: Iterable[pa.Schema]) -> tuple[pa.Schema, set[str]]:
    """One schema for every docs piece: fields in order of first appearance; a field with one type keeps it, ints
    and floats become float64, anything else mixed becomes strings (returned as the second item)."""
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            seen = types.setdefault(f.name, [])
            if not pa.types.is_null(f.type) and f.type not in seen:
                seen.append(f.type)
    fields, mixed = [], set()
    for name, ts in types.items():
        if not ts:
            fields.append(pa.field(name, pa.null()))
        elif len(ts) == 1:
            fields.append(pa.field(name, ts[0]))
        elif all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in ts):
            fields.append(pa.field(name, pa.float64()))
        else:
            fields.append(pa.field(name, pa.string()))
            mixed.add(name)
    return pa.schema(fields), mixed


def conform(table: pa.Table, schema: pa.Schema, mixed: set[str]) -> pa.Table:
    """A docs piece in the unified schema (missing fields null; mixed ones as strings, JSON for non-strings)."""
    cols = []
    for f in schema:
        if f.name not in table.column_names:
            cols.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        if f.name in mixed and not pa.types.is_string(col.type):
            values = [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in col.to_pylist()]
            col = pa.chunked_array([pa.array(values, pa.string())])
        cols.append(col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def write_docs_pieces(sink: Any, schemas: list[pa.Schema], pieces: Callable[[], Iterable[pa.Table]]) -> int:
    """Stream docs pieces (second pass over `pieces()`) into one Parquet file; returns its rows."""
    schema, mixed = unified_schema(schemas)
    for name in sorted(mixed):
        log.warning("metadata field %r has different types in different corpus parts; it is stored as strings",
                    name)
    rows = 0
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for table in pieces():
            if table.num_rows:
                writer.write_table(conform(table, schema, mixed))
                rows += table.num_rows
    return rows


def combine_docs(fs: Any, root: str, indices: list[int], head: pa.Table | None = None,
                 responses: dict[str, list[str]] | None = None) -> int:
    """docs.parquet of the store: `head` (rows already in the store, for append: tokens) then every part's docs
    file in order, one file in memory at a time. `responses` (generate: docs file path -> its part's shard ids)
    joins each part's responses in. Returns the number of documents."""
    paths = [layout.part_file(root, i, layout.PART_DOCS) for i in indices]

    def read(path: str) -> pa.Table:
        table = pq.read_table(pa.BufferReader(storage.with_retries(lambda: fs.cat_file(path), f"reading {path}")))
        return table if responses is None else with_responses(fs, root, table, responses.get(path, []))

    def schema_of(path: str) -> pa.Schema:
        with fs.open(path, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
        if responses is None or not len(schema):
            return schema
        return pa.schema([*schema, pa.field("response", pa.string()), pa.field("finish_reason", pa.string())])

    schemas = ([head.schema] if head is not None else []) + [schema_of(p) for p in paths]
    target = storage.join(root, layout.DOCS)
    with storage.open_atomic(fs, target) as sink:  # streamed to the store, never whole in memory
        n = write_docs_pieces(sink, schemas, lambda: _pieces(head, paths, read))
    return n


def with_responses(fs: Any, root: str, docs: pa.Table, shard_ids: list[str]) -> pa.Table:
    """A part's docs rows with `response` and `finish_reason` (null for documents with no prompt tokens) and
    `n_tokens` counting the response rows too, from the part's shards' responses files."""
    if not docs.num_rows:
        return docs
    pieces = []
    for sid in shard_ids:
        path = layout.shard_file(root, sid, layout.RESPONSES)
        pieces.append(pq.read_table(pa.BufferReader(storage.with_retries(lambda p=path: fs.cat_file(p),
                                                                         f"reading {path}"))))
    resp = pa.concat_tables(pieces) if pieces else None
    doc_ids = docs.column("doc_id")
    if resp is None or not resp.num_rows:
        idx = pa.nulls(docs.num_rows, pa.int32())
    else:
        idx = pc.index_in(doc_ids, value_set=resp.column("doc_id"))
    text = resp.column("response").take(idx) if resp is not None and resp.num_rows else pa.nulls(docs.num_rows,
                                                                                                    pa.string())
    reason = resp.column("finish_reason").take(idx) if resp is not None and resp.num_rows else pa.nulls(
        docs.num_rows, pa.string())
    extra = (pc.fill_null(resp.column("n_response_tokens").take(idx), 0) if resp is not None and resp.num_rows
             else pa.array(np.zeros(docs.num_rows, np.int64)))
    n_tokens = pc.add(docs.column("n_tokens"), extra)
    docs = docs.set_column(docs.schema.get_field_index("n_tokens"), "n_tokens", n_tokens)
    return docs.append_column("response", text).append_column("finish_reason", reason)


def _pieces(head: pa.Table | None, paths: list[str], read: Callable[[str], pa.Table]) -> Iterable[pa.Table]:
    if head is not None:
        yield head
    for p in paths:
        yield read(p)
