"""Write one shard (token index, per-hook Zarr arrays, statistics) and commit it atomically.

Layout under <root>/shards/<shard_id>/: tokens.parquet, acts.zarr/<hook>, stats.safetensors and shard.json.
shard.json is written last and is the shard's commit record: a shard without it is debris from an interrupted
run and is rewritten. On local disks the shard is built under shards/.tmp/ and renamed into place in one step;
object stores have no rename, so there the files go to the final prefix and the commit record's PUT is the
atomic step. The same input always produces the same bytes, so a retried or duplicated task is harmless.

Every activation chunk ends with Zarr v3's crc32c checksum codec, so any reader (zarr, or the raw local reader)
detects a chunk whose bytes changed. Hooks of a shard are written (created, filled, hashed, and their statistics
computed) in parallel when the caller passes a thread pool; the bytes are the same either way.

`append: hooks` adds arrays to a committed shard without changing its files (acts.zarr/<new hook>,
stats-<tag>.safetensors, then append-<tag>.json as that append's commit record: see `append_arrays`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from actstore.schemas import layout
from actstore.schemas.errors import StoreError
from actstore.schemas.manifest import ShardInfo
from actstore.workers import storage
from actstore.workers.dtypes import NUMPY_STORED, decode
from actstore.workers.stats import HookStats

CHUNK_BYTES = 4 << 20  # ~4 MiB full-width chunks: large enough for fast scans, small enough to shuffle
_APPEND_RE = re.compile(r"^append-([0-9a-f]{8,64})\.json$")  # commit records of `append: hooks`, one per append


@dataclass(frozen=True)
class ArraySpec:
    """How one hook is stored."""

    name: str
    d: int
    dtype: str  # storage dtype


def shard_path(root: str, shard_id: str) -> str:
    return layout.shard_dir(root, shard_id)


def is_committed(fs, root: str, shard_id: str) -> bool:
    return fs.exists(storage.join(shard_path(root, shard_id), layout.SHARD_RECORD))


def read_commit(fs, root: str, shard_id: str) -> ShardInfo:
    return ShardInfo.model_validate_json(fs.cat_file(storage.join(shard_path(root, shard_id), layout.SHARD_RECORD)))


def chunk_rows(n: int, d: int, itemsize: int) -> int:
    """Rows per full-width chunk: about CHUNK_BYTES, split evenly over the shard.

    Zarr stores edge chunks at full size, so the rows are spread evenly over ceil(n / target) chunks: a small
    shard gets one chunk of exactly its size and a large one wastes less than one row per chunk.
    """
    target = max(1, CHUNK_BYTES // (d * itemsize))
    n_chunks = max(1, -(-n // target))
    return max(1, -(-n // n_chunks))


def sha256_array(arr: np.ndarray) -> str:
    """SHA-256 of the array's C-order bytes, hashed in place (no `tobytes` copy; hashlib releases the GIL)."""
    data = np.ascontiguousarray(arr)
    return hashlib.sha256(data.reshape(-1).view(np.uint8) if data.size else b"").hexdigest()


def _codecs(compression: str) -> list:
    """Bytes-to-bytes codecs of an activation array: optional zstd, then always the crc32c checksum (last, so
    it covers the bytes as stored)."""
    checksum = zarr.codecs.Crc32cCodec()
    return [zarr.codecs.ZstdCodec(level=1), checksum] if compression == "zstd" else [checksum]


def _map(pool: Executor | None, fn: Callable[[Any], Any], items: list) -> list:
    """fn over items, on `pool` when given (results in item order either way)."""
    return list(pool.map(fn, items)) if pool is not None and len(items) > 1 else [fn(i) for i in items]


def write_shard(
    fs, root: str, shard_id: str, meta: dict, tokens: pa.Table, arrays: dict[str, np.ndarray],
    specs: list[ArraySpec], compression: str = "none", overflow: dict[str, int] | None = None,
    outputs: pa.Table | None = None, pool: Executor | None = None, responses: pa.Table | None = None,
) -> ShardInfo:
    """Write and commit one shard; `meta` holds seq/token ranges. Returns the committed ShardInfo.

    `outputs` (per-token model outputs, row-aligned with `tokens`) goes to outputs.parquet when given;
    `responses` (generate: one row per prompt) to responses.parquet, joined into docs.parquet at commit.
    """
    final = shard_path(root, shard_id)
    work = storage.join(layout.tmp_dir(root), f"{shard_id}.{uuid.uuid4().hex[:12]}") if storage.is_local(fs) else final
    if fs.exists(final) and not is_committed(fs, root, shard_id) and work == final:
        fs.rm(final, recursive=True)  # debris of an interrupted attempt on an object store
    fs.makedirs(work, exist_ok=True)
    tok_sha = _put_parquet(fs, work, layout.TOKENS, tokens)
    sums = _write_arrays(fs, work, arrays, specs, compression, pool)
    out_sha = _put_parquet(fs, work, layout.OUTPUTS, outputs) if outputs is not None else None
    resp_sha = _put_parquet(fs, work, layout.RESPONSES, responses) if responses is not None else None
    storage.put(fs, storage.join(work, layout.SHARD_STATS), _stats_bytes(tokens, arrays, specs, overflow or {}, pool))
    doc = tokens.column("doc_id").to_numpy()
    info = ShardInfo(
        id=shard_id, n_tokens=tokens.num_rows, arrays=sums, tokens_sha256=tok_sha,
        doc_start=int(doc.min()) if doc.size else -1, doc_end=int(doc.max()) if doc.size else -1,
        outputs_sha256=out_sha, responses_sha256=resp_sha, **meta,
    )
    _commit(fs, work, final, info)
    return info


def _commit(fs, work: str, final: str, info: ShardInfo) -> None:
    record = (info.model_dump_json(indent=1) + "\n").encode()
    if work == final:
        storage.put_atomic(fs, storage.join(final, layout.SHARD_RECORD), record)
        return
    storage.put_atomic(fs, storage.join(work, layout.SHARD_RECORD), record)
    if os.path.exists(os.path.join(final, layout.SHARD_RECORD)):
        fs.rm(work, recursive=True)  # a duplicate task already committed identical bytes
        return
    if os.path.exists(final):
        fs.rm(final, recursive=True)
    try:
        os.rename(work, final)  # atomic on one filesystem: the shard appears complete or not at all
    except OSError:
        if not os.path.exists(os.path.join(final, layout.SHARD_RECORD)):
            raise
        fs.rm(work, recursive=True)  # lost a race against an identical duplicate


def _put_parquet(fs, work: str, name: str, table: pa.Table) -> str:
    """Write `table` as the shard file `name`; returns the SHA-256 of the bytes written (for the commit record)."""
    raw = _parquet_bytes(table)
    storage.put(fs, storage.join(work, name), raw)
    return hashlib.sha256(raw).hexdigest()


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True)
    return buf.getvalue()


def _write_arrays(fs, work: str, arrays: dict[str, np.ndarray], specs: list[ArraySpec], compression: str,
                  pool: Executor | None = None) -> dict:
    store = storage.zarr_store(fs, storage.join(work, layout.ACTS))
    return _create_arrays(zarr.open_group(store, mode="w"), arrays, specs, compression, pool)


def _create_arrays(group: zarr.Group, arrays: dict[str, np.ndarray], specs: list[ArraySpec], compression: str,
                   pool: Executor | None = None) -> dict:
    """Create and fill one array per spec in `group`; returns hook -> SHA-256 of the stored bytes."""

    def one(spec: ArraySpec) -> str:
        arr = arrays[spec.name]
        dt = NUMPY_STORED[spec.dtype]
        assert arr.dtype == dt and arr.shape[1] == spec.d, (spec, arr.dtype, arr.shape)
        z = group.create_array(
            spec.name, shape=arr.shape, chunks=(chunk_rows(arr.shape[0], spec.d, dt.itemsize), spec.d), dtype=dt,
            compressors=_codecs(compression), fill_value=0, dimension_names=("token", "d"),
            attributes={"actstore_dtype": spec.dtype, "hook": spec.name},
        )
        if arr.shape[0]:
            z[:] = arr
        return sha256_array(arr)

    return dict(zip([s.name for s in specs], _map(pool, one, specs)))


def _stats_bytes(tokens: pa.Table, arrays: dict, specs: list[ArraySpec], overflow: dict[str, int],
                 pool: Executor | None = None) -> bytes:
    keep = ~tokens.column("special").to_numpy(zero_copy_only=False).astype(bool)

    def one(spec: ArraySpec) -> HookStats:
        # Rows are selected and decoded chunk by chunk inside from_rows: no full copy of the array.
        # inf rows only exist with on_overflow: inf; they are counted as overflow, not averaged into stats.
        return HookStats.from_rows(
            arrays[spec.name], overflow.get(spec.name, 0), keep=None if keep.all() else keep,
            finite_only=spec.dtype == "float16", decode=lambda part, dt=spec.dtype: decode(part, dt),
        )

    tensors: dict[str, np.ndarray] = {}
    for spec, st in zip(specs, _map(pool, one, specs)):
        tensors.update(st.to_tensors(f"{spec.name}/"))
    # One metadata key: safetensors writes metadata in hash-map order, which would make the bytes vary.
    meta = json.dumps({"format": "actstore-shard-stats-v1", "hooks": [s.name for s in specs]})
    return st_save(tensors, metadata={"actstore": meta})


def read_stats(fs, root: str, shard_id: str, hooks: list[str]) -> dict[str, HookStats]:
    tensors = st_load(fs.cat_file(layout.shard_file(root, shard_id, layout.SHARD_STATS)))
    return {h: HookStats.from_tensors(tensors, f"{h}/") for h in hooks}


def read_shard_stats(fs, root: str, shard_id: str, hooks: list[str]) -> dict[str, HookStats]:
    """Like `read_stats`, but hooks added later by `append: hooks` are read from their append's stats file."""
    tensors = st_load(fs.cat_file(layout.shard_file(root, shard_id, layout.SHARD_STATS)))
    missing = {h for h in hooks if f"{h}/n" not in tensors}
    for tag, rec in append_records(fs, root, shard_id) if missing else []:
        if missing & set(rec.get("hooks", [])):
            tensors.update(st_load(fs.cat_file(layout.shard_file(root, shard_id, layout.append_stats(tag)))))
    return {h: HookStats.from_tensors(tensors, f"{h}/") for h in hooks}


# ---- append: hooks --------------------------------------------------------------------------------------------
# A committed shard never changes; new hooks go next to its files: acts.zarr/<hook> (a new array in the existing
# group, whose zarr.json is left as it is), stats-<tag>.safetensors, then append-<tag>.json, the append's commit
# record for this shard, written last. `tag` names one append (the store and the new hooks), so a rerun of an
# interrupted append skips the shards that hold its record.

def append_record_path(root: str, shard_id: str, tag: str) -> str:
    return layout.shard_file(root, shard_id, layout.append_record(tag))


def is_appended(fs, root: str, shard_id: str, tag: str) -> bool:
    return fs.exists(append_record_path(root, shard_id, tag))


def read_append(fs, root: str, shard_id: str, tag: str) -> dict:
    return json.loads(fs.cat_file(append_record_path(root, shard_id, tag)))


def append_records(fs, root: str, shard_id: str) -> list[tuple[str, dict]]:
    """(tag, record) of every append commit record in a shard, in name order."""
    fs.invalidate_cache(shard_path(root, shard_id))  # object-store listings are cached; records may be new
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(shard_path(root, shard_id), detail=False))
    return [(m.group(1), json.loads(fs.cat_file(storage.join(shard_path(root, shard_id), m.group(0)))))
            for m in map(_APPEND_RE.match, names) if m]


def append_arrays(
    fs, root: str, shard_id: str, tag: str, tokens: pa.Table, arrays: dict[str, np.ndarray],
    specs: list[ArraySpec], compression: str = "none", overflow: dict[str, int] | None = None,
    pool: Executor | None = None,
) -> dict:
    """Add new hook arrays (and their statistics) to a committed shard without changing any of its files.

    Leftovers of an uncommitted earlier attempt at the same hooks (arrays, other appends' records naming them)
    are removed first: they were never part of the store. Returns the record written last.
    """
    if not is_committed(fs, root, shard_id):
        raise StoreError(f"shard {shard_id} is not committed; cannot append hooks to it")
    base, names = shard_path(root, shard_id), {s.name for s in specs}
    for other, rec in append_records(fs, root, shard_id):
        if other != tag and names & set(rec.get("hooks", [])):
            for name in (layout.append_record(other), layout.append_stats(other)):
                if fs.exists(storage.join(base, name)):
                    fs.rm(storage.join(base, name))
    for name in names:
        if fs.find(storage.join(base, layout.ACTS, name)):
            fs.rm(storage.join(base, layout.ACTS, name), recursive=True)
    group = zarr.open_group(storage.zarr_store(fs, storage.join(base, layout.ACTS)), mode="r+")
    sums = _create_arrays(group, arrays, specs, compression, pool)
    storage.put(fs, storage.join(base, layout.append_stats(tag)), _stats_bytes(tokens, arrays, specs, overflow or {},
                                                                               pool))
    record = {"format": "actstore-append-v1", "tag": tag, "hooks": [s.name for s in specs], "arrays": sums,
              "overflow": {s.name: int((overflow or {}).get(s.name, 0)) for s in specs}}
    storage.put_atomic(fs, append_record_path(root, shard_id, tag), (json.dumps(record, indent=1) + "\n").encode())
    return record


def tokens_sha256(tokens: pa.Table) -> str:
    """SHA-256 of tokens.parquet as `write_shard` would write this table."""
    return hashlib.sha256(_parquet_bytes(tokens)).hexdigest()
