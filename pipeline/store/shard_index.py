"""The Parquet shard index of a format v2 store (`shards.parquet`): the manifest's shard list as a table.

A store of 10^5 shards would carry ~60 MB of shard records in manifest.json; beyond `INDEX_MIN_SHARDS` they move
to one Parquet row per shard, in row order, with ShardInfo's fields as columns and one `arrays.<hook>` column per
hook (the array's SHA-256). Loading it builds the records without per-record validation (its SHA-256, recorded
in the manifest, is checked instead), so `open_store` stays fast at any size.
"""

from __future__ import annotations

import gc
import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas.errors import ManifestError
from actstore.schemas.manifest import ShardInfo

INDEX_MIN_SHARDS = 4096
ARRAY_PREFIX = "arrays."
_FIELDS = {"id": pa.string(), "part": pa.int64(), "seq_start": pa.int64(), "seq_end": pa.int64(),
           "token_start": pa.int64(), "token_end": pa.int64(), "doc_start": pa.int64(), "doc_end": pa.int64(),
           "n_tokens": pa.int64(), "tokens_sha256": pa.string(), "outputs_sha256": pa.string(),
           "responses_sha256": pa.string()}
# Columns added after the first v2 stores were written: an index without one reads it as null.
_LATER = ("responses_sha256",)


def index_bytes(shards: list[ShardInfo], hooks: list[str]) -> bytes:
    """shards.parquet for a shard list (every shard must hold every hook's array)."""
    cols: dict[str, Any] = {k: pa.array([getattr(s, k) for s in shards], t) for k, t in _FIELDS.items()}
    for h in hooks:
        cols[ARRAY_PREFIX + h] = pa.array([s.arrays[h] for s in shards], pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd")
    return buf.getvalue()


def read_index(raw: bytes, where: str) -> list[ShardInfo]:
    """The shard records of an index file (already checked against the manifest's SHA-256)."""
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{where} is not a readable shard index: {e}") from None
    data = table.to_pydict()
    hooks = [c[len(ARRAY_PREFIX):] for c in table.column_names if c.startswith(ARRAY_PREFIX)]
    for name in _LATER:
        data.setdefault(name, [None] * table.num_rows)
    if set(_FIELDS) - set(data):
        raise ManifestError(f"{where} lacks the columns {sorted(set(_FIELDS) - set(data))}")
    # 10^5 records of small objects: the cyclic collector would rescan them several times while they are built
    # (half of the time); none of them holds a cycle.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _records(data, hooks, table.num_rows)
    finally:
        if collecting:
            gc.enable()


def _records(data: dict[str, list], hooks: list[str], n: int) -> list[ShardInfo]:
    hashes = [data[ARRAY_PREFIX + h] for h in hooks]
    arrays = [dict(zip(hooks, row)) for row in zip(*hashes)] if hooks else [{} for _ in range(n)]
    names = (*_FIELDS, "arrays")
    return [_record(dict(zip(names, row))) for row in zip(*(data[k] for k in _FIELDS), arrays)]


_FIELDS_SET = frozenset((*_FIELDS, "arrays"))


def _record(values: dict[str, Any]) -> ShardInfo:
    """A ShardInfo from trusted values (every field present), built the way pydantic's `model_construct` builds
    it but without its per-field default handling: at 10^5 shards that handling is most of `open_store`'s time.
    The values come from a file whose SHA-256 the manifest records."""
    obj = ShardInfo.__new__(ShardInfo)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", set(_FIELDS_SET))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj
