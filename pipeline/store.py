"""Reading a committed store: `open_store`, and `Store` (manifest, hooks, activations, tokens, docs, loader).

A store opens only when manifest.json exists (it is written last); everything read is addressed through the
manifest's shard list, so shards of an interrupted later run are never seen.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from actstore.pipeline.consumers import ConsumersMixin
from actstore.pipeline.output import MANIFEST, RUN_RECORD
from actstore.pipeline.rawchunks import RawChunkArray
from actstore.schemas.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, parse_manifest
from actstore.workers import storage
from actstore.workers.dtypes import NUMPY_STORED, decode
from actstore.workers.shard_writer import shard_path
from actstore.workers.stats import HookStats
from actstore.workers.token_outputs import OUTPUTS_FILE


def _retrying_getitem(arr: Any, key: Any) -> np.ndarray:
    """dask getter: chunk reads retry transient storage errors (object stores hiccup)."""
    return storage.with_retries(lambda: np.asarray(arr[key]), "reading a chunk")


class StoreError(ValueError):
    """The store cannot be opened or read as asked; the message says what is missing."""


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """Open a complete store at a path or fsspec URL (file://, memory://, s3://)."""
    fs, root = storage.get_fs(url, storage_options)
    mpath = storage.join(root, MANIFEST)
    if not fs.exists(mpath):
        if fs.exists(storage.join(root, RUN_RECORD)) or fs.exists(storage.join(root, "shards")):
            raise StoreError(f"store {url!r} is incomplete: no manifest.json (an extraction was interrupted; "
                             "rerun the same extract config to resume it)")
        raise StoreError(f"no actstore store at {url!r} (manifest.json not found)")
    try:
        manifest = parse_manifest(storage.read_bytes(fs, mpath, MAX_MANIFEST_BYTES), f"{url}/manifest.json")
    except ValueError as e:
        raise ManifestError(str(e)) from None
    return Store(url, manifest, fs, root, storage_options)


class Store(ConsumersMixin):
    """A committed activation store."""

    def __init__(self, url: str, manifest: Manifest, fs, root: str, storage_options: dict | None = None) -> None:
        self.url, self.manifest, self.fs, self.root = url, manifest, fs, root
        self._storage_options = storage_options or {}

    def __repr__(self) -> str:
        return f"Store({self.url!r}, hooks={self.hooks}, n_tokens={self.n_tokens}, shards={len(self.manifest.shards)})"

    @property
    def hooks(self) -> list[str]:
        return [h.name for h in self.manifest.hooks]

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    # ---- arrays ---------------------------------------------------------------------------------------------
    def shard_array(self, shard_index: int, hook: str) -> zarr.Array:
        """The raw stored Zarr array of one shard (uint16 bits for bfloat16), shape-checked against the manifest."""
        info, h = self.manifest.shards[shard_index], self.manifest.hook(hook)
        path = storage.join(shard_path(self.root, info.id), "acts.zarr")
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
        return arr

    def _reader(self, shard_index: int, hook: str) -> Any:
        """The fastest reader for a shard array: raw chunk files on local disk when uncompressed, else zarr."""
        arr = self.shard_array(shard_index, hook)  # opens and shape-checks through zarr either way
        if storage.is_local(self.fs):
            path = storage.join(shard_path(self.root, self.manifest.shards[shard_index].id), "acts.zarr", hook)
            raw = RawChunkArray.open(path)
            if raw is not None and raw.shape == tuple(arr.shape) and raw.dtype == arr.dtype:
                return raw
        return arr

    def activations(self, hook: str) -> da.Array:
        """Lazy (n_tokens, d) dask array of the hook; bfloat16 is decoded to float32."""
        h = self.manifest.hook(hook)
        parts = []
        for i in range(len(self.manifest.shards)):
            arr = self._reader(i, hook)
            parts.append(da.from_array(arr, chunks=arr.chunks, asarray=True, getitem=_retrying_getitem,
                                       name=f"actstore-{self.manifest.shards[i].id}-{hook}-{id(self)}"))
        arr = da.concatenate(parts, axis=0) if parts else da.zeros((0, h.d), NUMPY_STORED[h.dtype])
        if h.dtype == "bfloat16":
            arr = arr.map_blocks(decode, "bfloat16", dtype=np.float32)
        return arr

    def read_rows(self, hook: str, shard_index: int, start: int, stop: int) -> np.ndarray:
        """Decoded rows [start, stop) of one shard (numpy)."""
        h = self.manifest.hook(hook)
        arr = self._cached_array(shard_index, hook)
        return decode(storage.with_retries(lambda: arr[start:stop], f"reading {hook} rows of shard {shard_index}"),
                      h.dtype)

    def _cached_array(self, shard_index: int, hook: str) -> zarr.Array:
        """Open (and shape-check) each shard array once per Store."""
        cache = self.__dict__.setdefault("_arrays", {})
        if (shard_index, hook) not in cache:
            cache[shard_index, hook] = self._reader(shard_index, hook)
        return cache[shard_index, hook]

    # ---- tables ---------------------------------------------------------------------------------------------
    def _shard_parquet(self, shard_index: int, name: str, columns: list[str] | None = None) -> pa.Table:
        path = storage.join(shard_path(self.root, self.manifest.shards[shard_index].id), name)
        raw = storage.with_retries(lambda: self.fs.cat_file(path), f"reading {path}")
        return pq.read_table(pa.BufferReader(raw), columns=columns)

    def shard_tokens(self, shard_index: int, columns: list[str] | None = None) -> pa.Table:
        """One shard's token index (optionally only some columns: Parquet reads just those)."""
        return self._shard_parquet(shard_index, "tokens.parquet", columns)

    def tokens(self) -> pa.Table:
        """Token index: token_id, doc_id, seq_id, position, special — one row per stored token, in row order."""
        tables = [self.shard_tokens(i) for i in range(len(self.manifest.shards))]
        return pa.concat_tables(tables) if tables else pa.table({})

    def token_outputs(self) -> pa.Table:
        """Per-token model outputs (config `token_outputs`), row-aligned with `tokens()`: `loss` (next-token
        negative log-likelihood, null at a sequence's last position), plus `topk_ids`/`topk_logprobs` when asked."""
        if not self.has_token_outputs:
            raise ValueError(f"store {self.url} has no per-token outputs; extract with `token_outputs: {{topk: 5}}`")
        return pa.concat_tables([self._shard_parquet(i, OUTPUTS_FILE) for i in range(len(self.manifest.shards))])

    @property
    def has_token_outputs(self) -> bool:
        """Whether every shard holds outputs.parquet (the store was extracted with `token_outputs`)."""
        return bool(self.manifest.shards) and all(s.outputs_sha256 for s in self.manifest.shards)

    def docs(self) -> pa.Table:
        """One row per corpus document: doc_id plus every metadata/label field."""
        with self.fs.open(storage.join(self.root, "docs.parquet"), "rb") as f:
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
        raw = self.fs.cat_file(storage.join(self.root, "stats", hook, "stats.safetensors"))
        st = HookStats.from_tensors(st_load(raw), "")
        if st.n != self.manifest.stats.get(hook, {}).get("n_tokens", st.n):
            # Written for a grown store by an append that stopped before its manifest commit: merge the
            # committed shards' own statistics instead (exactly what finalize computes).
            from actstore.pipeline.finalize import merged_stats

            st = merged_stats(self.fs, self.root, [s.id for s in self.manifest.shards], [hook])[hook]
        return st

    # ---- checking ----------------------------------------------------------------------------------------
    def verify(self) -> Any:
        """Re-read every shard and check shapes, checksums and the manifest; returns a VerifyReport."""
        from actstore.pipeline.verify import verify_store

        return verify_store(self)
