"""Reading a committed store: `open_store`, and `Store` (manifest, hooks, activations, tokens, docs, loader).

A store opens only when manifest.json exists (it is written last); everything read is addressed through the
manifest's shard list, so shards of an interrupted later run are never seen.
"""

from __future__ import annotations

import hashlib
from typing import Any

import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from actstore.pipeline.store.raw_chunks import RawChunkArray
from actstore.pipeline.store.read_methods import ConsumersMixin
from actstore.schemas import layout
from actstore.schemas.errors import StoreError  # noqa: F401  (defined with its siblings; raised here)
from actstore.schemas.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    ShardInfo,
    identity_sha256,
    parse_manifest,
)
from actstore.workers import storage
from actstore.workers.dtypes import NUMPY_STORED, decode, decoded_dtype
from actstore.workers.shard_writer import read_shard_stats
from actstore.workers.stats import HookStats


def merged_stats(fs, root: str, shard_ids: list[str], hooks: list[str]) -> dict[str, HookStats]:
    """Merge shard statistics in shard order (deterministic)."""
    total: dict[str, HookStats] = {}
    for sid in shard_ids:
        for h, st in storage.with_retries(lambda: read_shard_stats(fs, root, sid, hooks), f"reading stats of {sid}").items():
            total[h] = total[h].merge(st) if h in total else st
    return total


def merge_in_order(parts: list[dict[str, HookStats]]) -> dict[str, HookStats]:
    total: dict[str, HookStats] = {}
    for stats in parts:
        for h, st in stats.items():
            total[h] = total[h].merge(st) if h in total else st
    return total


def store_stats(fs, root: str, shards: list[ShardInfo], hooks: list[str]) -> dict[str, HookStats]:
    """A store's merged statistics, in the store's merge order: the shards of each corpus part in order, then the
    parts in order (format v1 and imported stores: one group, i.e. plain shard order). Merging is exact up to
    rounding, and this order is what makes every writer produce the same bytes."""
    groups: list[list[str]] = []
    for i, s in enumerate(shards):
        if i == 0 or s.part != shards[i - 1].part:
            groups.append([])
        groups[-1].append(s.id)
    return merge_in_order([merged_stats(fs, root, g, hooks) for g in groups])



class _ChunkReader:
    """A Dask task's callable: decoded rows [start, stop) of one shard array, retrying transient storage errors
    (object stores hiccup). A callable object, not an argument: dask would try to convert an array-like
    argument (`__array__`) into data."""

    def __init__(self, arr: Any, dtype: str, what: str) -> None:
        self.arr, self.dtype, self.what = arr, dtype, what

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return decode(storage.with_retries(lambda: np.asarray(self.arr[start:stop]), f"reading {self.what}"),
                      self.dtype)


class CheckedArray:
    """A shard's Zarr array whose reads turn a failed chunk checksum into a StoreError naming shard and hook.

    Everything else (shape, dtype, chunks, attrs, ...) is the Zarr array's own (`.zarr` is the array itself)."""

    def __init__(self, arr: zarr.Array, where: str) -> None:
        self.zarr, self.where = arr, where

    def __getattr__(self, name: str) -> Any:
        # Unpickling (a Dask scheduler receiving a task graph) looks up attributes before `zarr` is set;
        # without this guard each lookup of `self.zarr` would recurse into __getattr__ again.
        if name == "zarr":
            raise AttributeError(name)
        return getattr(self.zarr, name)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.zarr[key])
        except ValueError as e:
            if "checksum" not in str(e):
                raise
            raise StoreError(f"{self.where}: a chunk is corrupt: its crc32c checksum does not match the stored "
                             "bytes; run `actstore verify` and re-extract the damaged shard") from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype) if dtype is not None else out



def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """Open the complete store at a local path or fsspec URL (file://, memory://, s3://, ...).

    `storage_options` are fsspec options (endpoint_url, key, secret, ...), never recorded. Returns a `Store`
    (manifest, hooks, n_tokens, activations(), to_numpy(), tokens(), docs(), loader(), verify(), ...).
    Raises StoreError when there is no store or it is incomplete (an interrupted or running extraction; the
    message says how to resume), ManifestError when manifest.json is damaged or from a newer format.
    """
    fs, root = storage.get_fs(url, storage_options)
    mpath = storage.join(root, layout.MANIFEST)
    if not fs.exists(mpath):
        if fs.exists(storage.join(root, layout.RUN_RECORD)) or fs.exists(storage.join(root, layout.SHARDS)):
            raise StoreError(f"store {url!r} is incomplete: no manifest.json (an extraction was interrupted or is "
                             f"running; rerun `actstore extract` with the config recorded in {url}/"
                             f"{layout.RUN_RECORD} to resume, or add --overwrite to start over)")
        raise StoreError(f"no actstore store at {url!r} (manifest.json not found)")
    raw = storage.read_bytes(fs, mpath, MAX_MANIFEST_BYTES)
    try:
        manifest = parse_manifest(raw, f"{url}/manifest.json")
    except ValueError as e:
        raise ManifestError(str(e)) from None
    if manifest.shard_index is not None:
        manifest.shards = _indexed_shards(fs, root, url, manifest)
    return Store(url, manifest, fs, root, storage_options, identity_sha256(raw))


def _indexed_shards(fs, root: str, url: str, manifest: Manifest) -> list[ShardInfo]:
    """The shard list from the store's Parquet index, checked against the manifest's hash and counts."""
    from actstore.pipeline.store.shard_index import read_index

    index = manifest.shard_index
    assert index is not None
    where = f"{url}/{index.path}"
    try:
        raw = storage.with_retries(lambda: fs.cat_file(storage.join(root, index.path)), f"reading {where}")
    except FileNotFoundError:
        raise ManifestError(f"{where} is missing (the manifest lists its shards there); run `actstore verify`") from None
    if hashlib.sha256(raw).hexdigest() != index.sha256:
        raise ManifestError(f"{where} does not match the manifest's SHA-256 (changed or truncated)")
    shards = read_index(raw, where)
    if len(shards) != index.n_shards:
        raise ManifestError(f"{where} holds {len(shards)} shards, the manifest says {index.n_shards}")
    return shards


class Store(ConsumersMixin):
    """A committed activation store."""

    def __init__(self, url: str, manifest: Manifest, fs: Any, root: str, storage_options: dict | None = None,
                 manifest_sha256: str | None = None) -> None:
        self.url, self.manifest, self.fs, self.root = url, manifest, fs, root
        self._storage_options = storage_options or {}
        self.manifest_sha256 = manifest_sha256 or identity_sha256(manifest.to_json())
        """SHA-256 of manifest.json as committed, without its `labels` list (`identity_sha256`): the store's
        identity, recorded by every result made from it and unchanged by `actstore label`."""

    def __repr__(self) -> str:
        return f"Store({self.url!r}, hooks={self.hooks}, n_tokens={self.n_tokens}, shards={len(self.manifest.shards)})"

    @property
    def hooks(self) -> list[str]:
        return [h.name for h in self.manifest.hooks]

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    # ---- arrays ---------------------------------------------------------------------------------------------
    def shard_array(self, shard_index: int, hook: str) -> CheckedArray:
        """The raw stored Zarr array of one shard (uint16 bits for bfloat16), shape-checked against the manifest;
        reads check every chunk's crc32c (format v2) and fail with a StoreError on a mismatch."""
        info, h = self.manifest.shards[shard_index], self.manifest.hook(hook)
        path = layout.shard_file(self.root, info.id, layout.ACTS)
        try:
            arr = storage.with_retries(
                lambda: zarr.open_array(storage.zarr_store(self.fs, path, read_only=True), path=hook, mode="r"),
                f"opening {hook} of shard {info.id}")
        except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError) as e:
            raise StoreError(f"shard {info.id}: array {hook!r} is missing ({type(e).__name__})") from None
        want = (info.n_tokens, h.d)
        if tuple(arr.shape) != want or arr.dtype != NUMPY_STORED[h.dtype]:
            raise StoreError(f"shard {info.id}: array {hook!r} has shape {tuple(arr.shape)} dtype {arr.dtype}, "
                             f"but the manifest says {want} {NUMPY_STORED[h.dtype]}; run `actstore verify`")
        return CheckedArray(arr, f"shard {info.id}, array {hook!r}")

    def _reader(self, shard_index: int, hook: str) -> Any:
        """The fastest reader for a shard array: raw chunk files on local disk when uncompressed, else zarr."""
        arr = self.shard_array(shard_index, hook)  # opens and shape-checks through zarr either way
        if storage.is_local(self.fs):
            path = storage.join(layout.shard_file(self.root, self.manifest.shards[shard_index].id, layout.ACTS), hook)
            raw = RawChunkArray.open(path)
            if raw is not None and raw.shape == tuple(arr.shape) and raw.dtype == arr.dtype:
                return raw
        return arr

    def activations(self, hook: str) -> da.Array:
        """Lazy (n_tokens, d) dask array of the hook; bfloat16 is decoded to float32.

        One task per Zarr chunk, all in one graph layer. (Per-shard `from_array` arrays joined by
        `da.concatenate` add an alias task per chunk, which dask fuses into per-chunk sub-graphs that it orders
        one by one: on a full scan that cost as much as the copy itself.)
        """
        h = self.manifest.hook(hook)
        out_dtype = decoded_dtype(h.dtype)
        name = f"actstore-{hook}-{tokenize(self.url, [s.id for s in self.manifest.shards], id(self))}"
        dsk: dict[Any, Any] = {}  # dask keys are (name, i, j) tuples
        rows: list[int] = []
        for i, info in enumerate(self.manifest.shards):
            if not info.n_tokens:
                continue
            read = _ChunkReader(self._reader(i, hook), h.dtype, f"{hook} of shard {info.id}")
            step = int(read.arr.chunks[0])
            for a in range(0, info.n_tokens, step):
                b = min(a + step, info.n_tokens)
                dsk[(name, len(rows), 0)] = (read, a, b)
                rows.append(b - a)
        if not rows:
            return da.zeros((0, h.d), out_dtype)
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
        return da.Array(graph, name, (tuple(rows), (h.d,)), dtype=out_dtype)

    def read_rows(self, hook: str, shard_index: int, start: int, stop: int) -> np.ndarray:
        """Decoded rows [start, stop) of one shard (numpy)."""
        h = self.manifest.hook(hook)
        arr = self._cached_array(shard_index, hook)
        return decode(storage.with_retries(lambda: arr[start:stop], f"reading {hook} rows of shard {shard_index}"),
                      h.dtype)

    def _cached_array(self, shard_index: int, hook: str) -> Any:
        """Open (and shape-check) each shard array once per Store."""
        cache = self.__dict__.setdefault("_arrays", {})
        if (shard_index, hook) not in cache:
            cache[shard_index, hook] = self._reader(shard_index, hook)
        return cache[shard_index, hook]

    # ---- tables ---------------------------------------------------------------------------------------------
    def _shard_parquet(self, shard_index: int, name: str, columns: list[str] | None = None) -> pa.Table:
        path = layout.shard_file(self.root, self.manifest.shards[shard_index].id, name)
        raw = storage.with_retries(lambda: self.fs.cat_file(path), f"reading {path}")
        return pq.read_table(pa.BufferReader(raw), columns=columns)

    def shard_tokens(self, shard_index: int, columns: list[str] | None = None) -> pa.Table:
        """One shard's token index (optionally only some columns: Parquet reads just those)."""
        return self._shard_parquet(shard_index, layout.TOKENS, columns)

    def tokens(self) -> pa.Table:
        """Token index: token_id, doc_id, seq_id, position, special, char_start, char_end — one row per stored
        token, in row order. char_start/char_end (int32) are the token's [start, end) character span in its
        document's text, (-1, -1) for special tokens the tokenizer or packer added. Stores written before spans
        existed (or with a slow tokenizer, or by `from_arrays`) lack both columns; shards appended later to such
        a store have them, and the older rows read as null."""
        tables = [self.shard_tokens(i) for i in range(len(self.manifest.shards))]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    def labels(self, name: str) -> pa.Table:
        """Token-aligned labels `name` (added by `actstore label`): one `label` column, one row per token row,
        null where no span covers the token."""
        self.manifest.label(name)
        path = layout.label_file(self.root, name)
        raw = storage.with_retries(lambda: self.fs.cat_file(path), f"reading {path}")
        return pq.read_table(pa.BufferReader(raw))

    @property
    def has_char_spans(self) -> bool:
        """Whether every shard's token index holds char_start/char_end (needed to align span labels)."""
        return bool(self.manifest.shards) and all(
            "char_start" in self._token_schema(i).names for i in range(len(self.manifest.shards)))

    def _token_schema(self, shard_index: int) -> pa.Schema:
        path = layout.shard_file(self.root, self.manifest.shards[shard_index].id, layout.TOKENS)
        with self.fs.open(path, "rb") as f:
            return pq.read_schema(f)

    def token_outputs(self) -> pa.Table:
        """Per-token model outputs (config `token_outputs`), row-aligned with `tokens()`: `loss` (next-token
        negative log-likelihood) and `chosen_prob` (its probability), both null at a sequence's last position,
        `entropy` (nats, of the full next-token distribution), plus `topk_ids`/`topk_logprobs` when asked.
        Stores written before `chosen_prob`/`entropy` existed lack them (null in shards appended without them)."""
        if not self.has_token_outputs:
            raise StoreError(f"store {self.url} has no per-token outputs; extract with `token_outputs: {{topk: 5}}`")
        tables = [self._shard_parquet(i, layout.OUTPUTS) for i in range(len(self.manifest.shards))]
        return pa.concat_tables(tables, promote_options="default")

    @property
    def has_token_outputs(self) -> bool:
        """Whether every shard holds outputs.parquet (the store was extracted with `token_outputs`)."""
        return bool(self.manifest.shards) and all(s.outputs_sha256 for s in self.manifest.shards)

    def docs(self) -> pa.Table:
        """One row per corpus document: doc_id plus every metadata/label field."""
        with self.fs.open(storage.join(self.root, layout.DOCS), "rb") as f:
            table = pq.read_table(f)
        # An `append: tokens` that stopped just before its manifest commit leaves a grown docs.parquet (the
        # committed rows come first, unchanged): show only the documents this manifest holds.
        return table.slice(0, self.manifest.n_docs) if table.num_rows > self.manifest.n_docs else table

    def special_mask(self) -> np.ndarray:
        """Boolean per stored row: True for special tokens (BOS/CLS/SEP/EOS/padding ids)."""
        # only the one column is decoded (the full token index costs ~10x more to read)
        cols = [self.shard_tokens(i, ["special"]).column("special") for i in range(len(self.manifest.shards))]
        if not cols:
            return np.zeros(0, bool)
        return np.concatenate([c.to_numpy(zero_copy_only=False) for c in cols]).astype(bool)

    def stats(self, hook: str) -> HookStats:
        """Merged per-dimension statistics of a hook (non-special tokens)."""
        from safetensors.numpy import load as st_load

        self.manifest.hook(hook)
        raw = self.fs.cat_file(layout.stats_file(self.root, hook))
        st = HookStats.from_tensors(st_load(raw), "")
        if st.n != self.manifest.stats.get(hook, {}).get("n_tokens", st.n):
            # Written for a grown store by an append that stopped before its manifest commit: merge the
            # committed shards' own statistics instead (exactly what the commit computes).
            st = store_stats(self.fs, self.root, self.manifest.shards, [hook])[hook]
        return st

    # ---- checking ----------------------------------------------------------------------------------------
    def verify(self) -> Any:
        """Re-read every shard and check shapes, checksums and the manifest; returns a VerifyReport."""
        from actstore.pipeline.store.verify import verify_store

        return verify_store(self)
