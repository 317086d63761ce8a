"""Readers that hand a store to other tools: PyTorch datasets, Hugging Face `datasets`, xarray and SAELens.

Everything here reads through the store's public surface (manifest shards, `shard_array`, `read_rows`,
`shard_tokens`, `activations`, `tokens`), so it works on a `Store` and on a `MultiStore` view alike. Rows are
the store's global token rows (the order of `store.activations(hook)` and `store.tokens()`); values are the
decoded stored numbers (float32/float16 as stored, bfloat16 decoded exactly to float32), bit-identical to
`store.activations(hook)`.

Global shuffle (`GlobalShuffleIterable`), precisely: for each (seed, epoch) the rows are cut into chunk-aligned
blocks (one Zarr chunk, or the part of it inside `rows`), the blocks are put in a uniformly random order over
the WHOLE store, consecutive blocks of that order are grouped into windows of `window_chunks` blocks, and the
rows of each window are uniformly permuted. The concatenation of the windows is the epoch's order: a
permutation of ALL row ids (every row exactly once), a pure function of (seed, epoch). Any row can land
anywhere in the epoch; rows from one chunk end up within one window (at most `window_chunks` chunks apart),
which is the price of reading whole chunks. With `window_chunks >= number of blocks` the order is a uniform
random permutation of every row (and the whole store is read into memory at once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from actstore.pipeline.store.export import (
    TOKEN_COLUMNS,
    check_rows,
    fixed_size_list,
    iter_slice,
    row_pieces,
    token_slice,
)
from actstore.schemas.errors import AnalysisError, ConfigError, OutputError
from actstore.workers.dtypes import NUMPY_STORED, decode, decoded_dtype
from actstore.workers.shard_writer import chunk_rows


def _hook_list(store: Any, hooks: str | Sequence[str]) -> tuple[list[str], bool]:
    single = isinstance(hooks, str)
    names = [hooks] if single else list(hooks)
    if not names:
        raise ConfigError("give at least one hook")
    for h in names:
        store.manifest.hook(h)  # KeyError listing the store's hooks
    return names, single


def _sample(hooks: list[str], single: bool, cols: list[torch.Tensor], ids: torch.Tensor | None) -> Any:
    """One hook without row ids -> the tensor; otherwise {hook: tensor, ..., "row": ids}."""
    if single and ids is None:
        return cols[0]
    out = dict(zip(hooks, cols))
    if ids is not None:
        out["row"] = ids
    return out


# ---- map-style ----------------------------------------------------------------------------------------------
class ActivationDataset(Dataset):
    """Map-style dataset over global rows [start, stop): item i is row start + i.

    `ds[i]` is a (d,) tensor for one hook or {hook: tensor} for several (plus "row" with `with_row_ids`).
    `__getitems__` (used by DataLoader for whole batches) groups the requested rows by shard and reads each
    shard's rows in one Zarr call that touches only the chunks holding them, instead of one read per row.
    Shuffle with the DataLoader (`shuffle=True` or a sampler); for large stores on object storage prefer
    `GlobalShuffleIterable`, whose reads are chunk-sized.
    """

    def __init__(self, store: Any, hooks: str | Sequence[str], rows: tuple[int, int] | None = None,
                 with_row_ids: bool = False) -> None:
        self.store = store
        self.hooks, self.single = _hook_list(store, hooks)
        self.start, self.stop = check_rows(store, rows)
        self.with_row_ids = with_row_ids
        self._starts = np.array([s.token_start for s in store.manifest.shards], dtype=np.int64)
        self._arrays: dict[tuple[int, str], Any] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        rows = self._rows(indices)
        cols = [torch.from_numpy(self._gather(h, rows)) for h in self.hooks]
        ids = torch.from_numpy(rows) if self.with_row_ids else None
        # views of one read per hook; default_collate stacks them back into a batch
        return [_sample(self.hooks, self.single, [c[j] for c in cols], None if ids is None else ids[j])
                for j in range(len(rows))]

    def _rows(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} rows")
        return np.where(idx < 0, idx + n, idx) + self.start

    def _gather(self, hook: str, rows: np.ndarray) -> np.ndarray:
        h = self.store.manifest.hook(hook)
        out = np.empty((len(rows), h.d), decoded_dtype(h.dtype))
        shard = np.searchsorted(self._starts, rows, side="right") - 1  # side=right skips empty shards
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local, inverse = np.unique(rows[sel] - self._starts[s], return_inverse=True)
            block = self._array(int(s), hook).get_orthogonal_selection((local, slice(None)))
            out[sel] = decode(block, h.dtype)[inverse]
        return out

    def _array(self, shard: int, hook: str) -> Any:
        key = (shard, hook)
        if key not in self._arrays:
            self._arrays[key] = self.store.shard_array(shard, hook)
        return self._arrays[key]

    def __getstate__(self) -> dict:
        # open Zarr arrays stay in the process that opened them; DataLoader workers reopen their own
        return {**self.__dict__, "_arrays": {}}


# ---- iterable with global shuffle ---------------------------------------------------------------------------
class GlobalShuffleIterable(IterableDataset):
    """Iterable over every row once per epoch in a seeded global order (see the module docstring).

    Yields single rows (`batch_size=None`; let the DataLoader batch them) or ready batches (`batch_size=B`; use
    `DataLoader(ds, batch_size=None)`). DataLoader workers (and, with `rank`/`world_size`, distributed ranks)
    take every k-th window of the epoch, so the parts are disjoint and together hold every row exactly once.
    A worker's rows that do not fill a batch carry into its next window; only its last batch may be short.
    Call `set_epoch(e)` before each epoch (as with DistributedSampler) to get a new order. Memory: one window
    per worker, about `window_chunks` x 4 MiB per hook (the writer's chunk size). With fewer windows than
    workers x ranks, some parts get no rows: raise the row count or lower `window_chunks`.
    """

    def __init__(self, store: Any, hooks: str | Sequence[str], batch_size: int | None = None, seed: int = 0,
                 epoch: int = 0, window_chunks: int = 8, shuffle: bool = True, rows: tuple[int, int] | None = None,
                 skip_special: bool = False, drop_last: bool = False, with_row_ids: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        if (batch_size is not None and batch_size <= 0) or window_chunks <= 0 or not 0 <= rank < world_size:
            raise ConfigError("batch_size and window_chunks must be positive and 0 <= rank < world_size")
        self.store = store
        self.hooks, self.single = _hook_list(store, hooks)
        self.batch_size, self.seed, self.epoch, self.window_chunks = batch_size, seed, epoch, window_chunks
        self.shuffle, self.skip_special, self.drop_last, self.with_row_ids = shuffle, skip_special, drop_last, with_row_ids
        self.rows, self.rank, self.world_size = check_rows(store, rows), rank, world_size
        self._special: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def blocks(self) -> list[tuple[int, int, int]]:
        """(shard, local start, local stop) chunk-aligned blocks inside `rows`, in store order.

        Chunk boundaries follow the widest hook (the most bytes per row), computed with the writer's own
        `chunk_rows` so no shard metadata has to be fetched; a misaligned block would still be read correctly.
        """
        infos = [self.store.manifest.hook(h) for h in self.hooks]
        widest = max(infos, key=lambda h: h.d * NUMPY_STORED[h.dtype].itemsize)
        item = NUMPY_STORED[widest.dtype].itemsize
        out = []
        for i, a, b in row_pieces(self.store, *self.rows):
            step = chunk_rows(self.store.manifest.shards[i].n_tokens, widest.d, item)
            for c in range(a - a % step, b, step):
                out.append((i, max(a, c), min(b, c + step)))
        return out

    def windows(self) -> list[list[tuple[int, int, int]]]:
        """This epoch's blocks in global random order, grouped into windows of `window_chunks` blocks."""
        blocks = self.blocks()
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(blocks)) if self.shuffle else \
            np.arange(len(blocks))
        w = self.window_chunks
        return [[blocks[j] for j in order[k:k + w]] for k in range(0, len(order), w)]

    def epoch_order(self) -> np.ndarray:
        """The epoch's full row order (global row ids) as one process without workers yields it."""
        parts = [self._window_ids(k, win)[0] for k, win in enumerate(self.windows())]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _window_ids(self, k: int, window: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(permuted global row ids of window k, the permutation applied to its kept rows)."""
        starts = [self.store.manifest.shards[i].token_start for i, _, _ in window]
        ids = np.concatenate([s + np.arange(a, b) for s, (_, a, b) in zip(starts, window)])
        if self.skip_special:
            ids = ids[self._keep(window)]
        # one generator per window, seeded by (seed, epoch, window): any worker can rebuild any window's order
        perm = np.random.default_rng([self.seed, self.epoch, k]).permutation(len(ids)) if self.shuffle else \
            np.arange(len(ids))
        return ids[perm], perm

    def _keep(self, window: list[tuple[int, int, int]]) -> np.ndarray:
        for i, _, _ in window:
            if i not in self._special:
                col = self.store.shard_tokens(i).column("special")
                self._special[i] = col.to_numpy(zero_copy_only=False).astype(bool)
        return ~np.concatenate([self._special[i][a:b] for i, a, b in window])

    def _read(self, k: int, window: list[tuple[int, int, int]]) -> tuple[list[np.ndarray], np.ndarray]:
        ids, perm = self._window_ids(k, window)
        keep = self._keep(window) if self.skip_special else None
        cols = []
        for h in self.hooks:
            data = np.concatenate([self.store.read_rows(h, i, a, b) for i, a, b in window])
            cols.append((data if keep is None else data[keep])[perm])
        return cols, ids

    def _part(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def __iter__(self) -> Iterator[Any]:
        part, parts = self._part()
        windows = self.windows()
        pending: tuple[list[np.ndarray], np.ndarray] | None = None
        for k in range(part, len(windows), parts):
            cols, ids = self._read(k, windows[k])
            if self.batch_size is None:
                yield from self._rows_of(cols, ids)
                continue
            if pending is not None:
                cols = [np.concatenate([p, c]) for p, c in zip(pending[0], cols)]
                ids = np.concatenate([pending[1], ids])
            full = len(ids) - len(ids) % self.batch_size
            for s in range(0, full, self.batch_size):
                yield self._make([c[s:s + self.batch_size] for c in cols], ids[s:s + self.batch_size])
            pending = ([c[full:] for c in cols], ids[full:])
        if pending is not None and len(pending[1]) and not self.drop_last:
            yield self._make(*pending)

    def _rows_of(self, cols: list[np.ndarray], ids: np.ndarray) -> Iterator[Any]:
        batch = self._make(cols, ids)
        tensors = [batch] if not isinstance(batch, dict) else [batch[h] for h in self.hooks]
        row_ids = batch["row"] if isinstance(batch, dict) and "row" in batch else None
        for j in range(len(ids)):
            yield _sample(self.hooks, self.single, [t[j] for t in tensors], None if row_ids is None else row_ids[j])

    def _make(self, cols: list[np.ndarray], ids: np.ndarray) -> Any:
        tensors = [torch.from_numpy(np.ascontiguousarray(c)) for c in cols]
        return _sample(self.hooks, self.single, tensors, torch.from_numpy(ids) if self.with_row_ids else None)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_special": {}}


def torch_dataset(store: Any, hooks: str | Sequence[str], kind: str = "map", seed: int = 0, epoch: int = 0,
                  **kwargs: Any) -> Dataset:
    """`Store.torch_dataset`: kind="map" -> ActivationDataset, kind="iterable" -> GlobalShuffleIterable.

    seed/epoch only apply to the iterable (a map-style dataset is shuffled by its DataLoader's sampler).
    """
    if kind == "map":
        return ActivationDataset(store, hooks, **kwargs)
    if kind == "iterable":
        return GlobalShuffleIterable(store, hooks, seed=seed, epoch=epoch, **kwargs)
    raise ConfigError(f"kind must be 'map' or 'iterable', got {kind!r}")


# Optional packages the adapters need, and the actstore extra that installs each (`make install` installs them).
EXTRAS = {"datasets": "tools", "xarray": "tools"}


def require(module: str, what: str) -> None:
    """Fail with the install command when an optional package is missing (before any work)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs the {module!r} package: pip install 'actstore[{EXTRAS[module]}]' "
                          f"(or pip install {module})")


# ---- Hugging Face datasets ----------------------------------------------------------------------------------
def hf_features(store: Any, hook: str) -> Any:
    """`activations` as a fixed-size list of the decoded dtype, then the token index columns."""
    require("datasets", "to_hf_dataset")
    from datasets import Features, List, Value

    h = store.manifest.hook(hook)
    return Features({"activations": List(Value(decoded_dtype(h.dtype).name), length=h.d),
                     "token_id": Value("int32"), "doc_id": Value("int64"), "seq_id": Value("int64"),
                     "position": Value("int32"), "special": Value("bool")})


def _hf_batches(store: Any, hook: str, start: int, stop: int, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for part, tok in iter_slice(store, hook, start, stop):
        cols = [fixed_size_list(part), *(tok.column(c).combine_chunks() for c in TOKEN_COLUMNS)]
        yield pa.RecordBatch.from_arrays(cols, schema=schema)


def to_hf_dataset(store: Any, hook: str, rows: tuple[int, int] | None = None,
                  cache_file: str | os.PathLike | None = None) -> Any:
    """A `datasets.Dataset` with `activations` (fixed-size list of float, width d) and token index columns.

    Without `cache_file` the table lives in memory: the rows read from Zarr are wrapped by Arrow without a
    further copy for float32/float16 stores (one copy in all: storage -> memory); bfloat16 stores are decoded
    to float32, which is one more copy. With `cache_file` the rows are streamed shard by shard into an Arrow
    file that the dataset memory-maps (bounded memory, one copy onto disk), as `datasets` does for its cache.
    float16 stores keep float16 in Arrow; note that datasets' numpy/torch formatters widen it to float32.
    """
    require("datasets", "to_hf_dataset")
    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable

    features = hf_features(store, hook)
    schema = features.arrow_schema
    start, stop = check_rows(store, rows)
    info = DatasetInfo(features=features, description=json.dumps({"actstore": store.url, "hook": hook,
                                                                   "rows": [start, stop]}))
    if cache_file is None:
        batches = list(_hf_batches(store, hook, start, stop, schema))
        return Dataset(InMemoryTable(pa.Table.from_batches(batches, schema=schema)), info=info)
    with pa.OSFile(os.fspath(cache_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in _hf_batches(store, hook, start, stop, schema):
            writer.write_batch(batch)
    return Dataset.from_file(os.fspath(cache_file), info=info)


# ---- xarray -------------------------------------------------------------------------------------------------
def to_xarray(store: Any, hooks: Sequence[str] | None = None) -> Any:
    """`xarray.Dataset`: one lazy (dask) variable per hook with dims ("token", "d_<hook>"), token-index coords.

    Coordinates along "token": row (global row id), token_id, doc_id, seq_id, position, special (and `store`
    for a multi-store view). Activations stay lazy; the token index is read into memory (it is small).
    """
    require("xarray", "to_xarray")
    import xarray as xr

    names = list(hooks) if hooks is not None else list(store.hooks)
    tok = store.tokens()
    coords = {"token": np.arange(store.n_tokens, dtype=np.int64)}
    for c in (*TOKEN_COLUMNS, "store"):
        if c in tok.column_names:
            coords[c] = ("token", tok.column(c).to_numpy(zero_copy_only=False))
    data = {h: (("token", f"d_{h}"), store.activations(h)) for h in names}
    attrs = {"actstore_url": str(store.url),
             "dtypes": json.dumps({h: store.manifest.hook(h).dtype for h in names})}
    return xr.Dataset(data, coords=coords, attrs=attrs)


# ---- SAELens ------------------------------------------------------------------------------------------------
def saelens_features(hook: str, context_size: int, d: int, dtype: str) -> Any:
    """The features SAELens' CacheActivationsRunner declares: {hook: Array2D((ctx, d)), token_ids: int32[ctx]}."""
    require("datasets", "the SAELens cache export")
    from datasets import Array2D, Features, List, Value

    return Features({hook: Array2D(shape=(context_size, d), dtype=dtype),
                     "token_ids": List(Value("int32"), length=context_size)})


def _array2d(rows: np.ndarray, context_size: int, ext_type: pa.DataType) -> pa.Array:
    """(n_seq * ctx, d) rows -> Array2D extension array (its storage is list<list<value>>; values not copied)."""
    d = rows.shape[1]
    n_seq = len(rows) // context_size
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n_seq * context_size * d + 1, d, dtype=np.int32)),
                                     pa.array(np.ascontiguousarray(rows).reshape(-1)))
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n_seq * context_size + 1, context_size, dtype=np.int32)),
                                     inner)
    return pa.ExtensionArray.from_storage(ext_type, outer)


def export_saelens_cache(store: Any, hook: str, out_dir: str | os.PathLike, rows: tuple[int, int] | None = None,
                         context_size: int | None = None, dtype: str | None = None,
                         max_shard_size: str | int = "500MB") -> dict[str, Any]:
    """Write rows of `hook` as the cached-activations dataset SAELens' CacheActivationsRunner writes.

    Layout (what `datasets.Dataset.save_to_disk` writes, read back by `datasets.load_from_disk`):
    out_dir/{dataset_info.json, state.json, data-0000i-of-0000N.arrow}, features
    `{<hook>: Array2D(shape=(context_size, d), dtype), "token_ids": List(Value("int32"), length=context_size)}`,
    one row per sequence. This is what SAELens' `ActivationsStore(cached_activations_path=out_dir, ...)` loads;
    it checks the hook column and its (context_size, d) shape and reshapes batches to (batch * ctx, d).
    (Checked against sae-lens 6.54: cache_activations_runner.py and training/activations_store.py.)

    Each row holds `context_size` consecutive store rows (default: the manifest's context_length, so packed
    stores export whole windows when `rows` starts on a window boundary). The tail that does not fill a row is
    dropped and reported. dtype defaults to the stored one (bfloat16 -> float32: Arrow has no bfloat16).
    """
    from datasets import Dataset, DatasetInfo

    h = store.manifest.hook(hook)
    ctx = int(context_size or getattr(store.manifest, "context_length", None) or 0)
    if ctx <= 0:
        raise ConfigError("context_size is needed: this store records no context_length")
    start, stop = check_rows(store, rows)
    n_seq = (stop - start) // ctx
    if n_seq == 0:
        raise ConfigError(f"rows {start}:{stop} hold fewer than one sequence of {ctx} tokens")
    dtype = dtype or decoded_dtype(h.dtype).name
    out = os.fspath(out_dir)
    if os.path.exists(out) and os.listdir(out):
        raise OutputError(f"{out} is not empty; SAELens caches go to a new or empty directory")
    features = saelens_features(hook, ctx, h.d, dtype)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.actstore-tmp.arrow")
    try:
        _write_saelens_stream(store, hook, start, n_seq, ctx, features, tmp)
        info = DatasetInfo(features=features, description=json.dumps({"actstore": store.url, "hook": hook}))
        Dataset.from_file(tmp, info=info).save_to_disk(out, max_shard_size=max_shard_size)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    end = start + n_seq * ctx
    return {"path": out, "hook": hook, "context_size": ctx, "d_in": h.d, "dtype": dtype, "n_sequences": n_seq,
            "rows": [start, end], "dropped_rows": stop - end}


def _write_saelens_stream(store: Any, hook: str, start: int, n_seq: int, ctx: int, features: Any, path: str) -> None:
    """Stream whole sequences (about 64 MiB of rows per batch) into an Arrow IPC file."""
    schema = features.arrow_schema
    h = store.manifest.hook(hook)
    per_batch = max(1, (64 << 20) // (ctx * h.d * 4))
    np_dtype = np.dtype(features[hook].dtype)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for s in range(0, n_seq, per_batch):
            a, b = start + s * ctx, start + min(n_seq, s + per_batch) * ctx
            acts = np.concatenate([p for p, _ in iter_slice(store, hook, a, b)]).astype(np_dtype, copy=False)
            toks = token_slice(store, a, b).column("token_id").to_numpy().astype(np.int32, copy=False)
            ids = pa.FixedSizeListArray.from_arrays(pa.array(toks), ctx)
            writer.write_batch(pa.RecordBatch.from_arrays([_array2d(acts, ctx, schema.field(hook).type), ids],
                                                          schema=schema))


def saelens_data_provider(store: Any, hook: str, batch_size: int, seed: int = 0, skip_special: bool = True,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          window_chunks: int = 8, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """An endless iterator of (batch_size, d) tensors: the `data_provider` SAELens' `SAETrainer` consumes.

    Epoch e is `GlobalShuffleIterable(seed=seed, epoch=e)` with full batches only; special tokens (BOS, SEP,
    padding) are skipped by default, as SAELens' own ActivationsStore does with exclude_special_tokens.
    Use: `SAETrainer(cfg, sae, data_provider=saelens_data_provider(store, hook, cfg.train_batch_size_samples))`.
    """
    epoch = 0
    while True:
        ds = GlobalShuffleIterable(store, hook, batch_size=batch_size, seed=seed, epoch=epoch,
                                   window_chunks=window_chunks, skip_special=skip_special, drop_last=True)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers) if num_workers else ds
        n = 0
        for batch in loader:
            n += 1
            yield batch.to(device=device, dtype=dtype)
        if n == 0:
            raise AnalysisError(f"the store has fewer usable rows of {hook!r} than one batch of {batch_size}")
        epoch += 1

