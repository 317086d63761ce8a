"""Several stores (two models, two corpora, ...) read as one concatenated view.

`open_stores(urls)` checks that the stores can be stacked row-wise: every hook they share must have the same
width and storage dtype (else a one-line ValueError naming the hook and both values); with `strict=True` the
hook sets must also be equal. The view's hooks are the shared ones, in the first store's order.

`MultiStore` exposes the same reading surface as `Store` — `manifest.shards` (with token ranges shifted to
global rows), `manifest.hook`, `shard_array`, `read_rows`, `shard_tokens`, `activations`, `tokens`,
`n_tokens` — so the loader, the torch/HF/xarray adapters and `export_slice` all work on it unchanged. Rows are
store 0's rows, then store 1's, and so on; `tokens()` adds a `store` column (index into `urls`) because doc,
sequence and token ids of different stores are unrelated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import pyarrow as pa

from actstore.pipeline.store.read_methods import ConsumersMixin
from actstore.pipeline.store.store import Store, open_store
from actstore.schemas.errors import HookNameError, StoreError
from actstore.schemas.manifest import HookInfo, ShardInfo


class MultiManifest:
    """The parts of a manifest readers use, for the concatenated view."""

    def __init__(self, hooks: list[HookInfo], shards: list[ShardInfo], context_length: int | None) -> None:
        self.hooks, self.shards, self.context_length = hooks, shards, context_length
        self.n_tokens = sum(s.n_tokens for s in shards)

    def hook(self, name: str) -> HookInfo:
        for h in self.hooks:
            if h.name == name:
                return h
        raise HookNameError(f"hook {name!r} is not in every store of this view (shared hooks: "
                       f"{', '.join(h.name for h in self.hooks)})")


def open_stores(urls: Sequence[str | Store], storage_options: dict | None = None, strict: bool = False,
                ) -> MultiStore:
    """Several stores (URLs or open Stores) as one row-wise view with the Store reading surface.

    The stores must hold the same hooks with the same widths and dtypes (`strict` also requires the same model
    and context). Returns a MultiStore; raises StoreError for incompatible stores, HookNameError for a hook
    that not every store holds.
    """
    stores = [u if isinstance(u, Store) else open_store(u, storage_options) for u in urls]
    if not stores:
        raise StoreError("open_stores needs at least one store")
    return MultiStore(stores, strict=strict)


def check_compatible(stores: Sequence[Store], strict: bool = False) -> list[HookInfo]:
    """The shared hooks (first store's order), or a one-line ValueError naming what disagrees."""
    first = stores[0]
    for other in stores[1:]:
        a, b = set(first.hooks), set(other.hooks)
        if strict and a != b:
            raise StoreError(f"stores have different hooks: {_names(a - b)} only in {first.url}; "
                             f"{_names(b - a)} only in {other.url}")
        for name in [h for h in first.hooks if h in b]:
            x, y = first.manifest.hook(name), other.manifest.hook(name)
            if x.d != y.d:
                raise StoreError(f"hook {name!r} has d={x.d} in {first.url} but d={y.d} in {other.url}; "
                                 "stores with different widths cannot be concatenated")
            if x.dtype != y.dtype:
                raise StoreError(f"hook {name!r} is stored as {x.dtype} in {first.url} but as {y.dtype} in "
                                 f"{other.url}; stores with different dtypes cannot be concatenated")
    shared = [first.manifest.hook(h) for h in first.hooks if all(h in s.hooks for s in stores[1:])]
    if not shared:
        raise StoreError("the stores share no hook, so there is nothing to concatenate")
    return shared


def _names(names: set[str]) -> str:
    return ", ".join(sorted(names)) or "(none)"


class MultiStore(ConsumersMixin):
    """Row-wise concatenation of compatible stores (see the module docstring)."""

    def __init__(self, stores: Sequence[Store], strict: bool = False) -> None:
        self.stores = list(stores)
        hooks = check_compatible(self.stores, strict)
        self._where: list[tuple[int, int]] = []  # global shard index -> (store, shard index in that store)
        shards, offset = [], 0
        for k, st in enumerate(self.stores):
            for j, s in enumerate(st.manifest.shards):
                shards.append(s.model_copy(update={"token_start": s.token_start + offset,
                                                   "token_end": s.token_end + offset}))
                self._where.append((k, j))
            offset += st.n_tokens
        self.offsets = np.cumsum([0] + [s.n_tokens for s in self.stores])
        ctx = {s.manifest.context_length for s in self.stores}
        self.manifest = MultiManifest(hooks, shards, ctx.pop() if len(ctx) == 1 else None)
        self.url = " + ".join(str(s.url) for s in self.stores)
        # The view's identity: its members' manifests, in order.
        self.manifest_sha256 = hashlib.sha256(" ".join(s.manifest_sha256 for s in self.stores).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"MultiStore({len(self.stores)} stores, hooks={self.hooks}, n_tokens={self.n_tokens})"

    @property
    def hooks(self) -> list[str]:
        return [h.name for h in self.manifest.hooks]

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def store_of_row(self, row: int) -> tuple[int, int]:
        """(store index, row inside that store) of a global row."""
        k = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return k, int(row - self.offsets[k])

    # ---- the Store reading surface ----------------------------------------------------------------------
    def shard_array(self, shard_index: int, hook: str) -> Any:
        self.manifest.hook(hook)
        k, j = self._where[shard_index]
        return self.stores[k].shard_array(j, hook)

    def read_rows(self, hook: str, shard_index: int, start: int, stop: int) -> np.ndarray:
        self.manifest.hook(hook)
        k, j = self._where[shard_index]
        return self.stores[k].read_rows(hook, j, start, stop)

    def shard_tokens(self, shard_index: int) -> pa.Table:
        k, j = self._where[shard_index]
        return self._with_store(self.stores[k].shard_tokens(j), k)

    def activations(self, hook: str) -> da.Array:
        self.manifest.hook(hook)
        return da.concatenate([s.activations(hook) for s in self.stores], axis=0)

    def tokens(self) -> pa.Table:
        """Token index of every store in order, plus `store` (int32 index of the store the row comes from)."""
        return pa.concat_tables([self._with_store(s.tokens(), k) for k, s in enumerate(self.stores)],
                                promote_options="default")

    @staticmethod
    def _with_store(table: pa.Table, k: int) -> pa.Table:
        return table.append_column("store", pa.array(np.full(table.num_rows, k, np.int32)))

    def docs(self) -> pa.Table:
        """Documents of every store, plus `store`; columns missing from a store are null there."""
        return pa.concat_tables([self._with_store(s.docs(), k) for k, s in enumerate(self.stores)],
                                promote_options="default")

    def special_mask(self) -> np.ndarray:
        return np.concatenate([s.special_mask() for s in self.stores])

    def labels(self, name: str) -> pa.Table:
        """Token-aligned labels `name` of every store in order (row-aligned with `tokens()`); every store of the
        view must hold them, so no rows are silently unlabelled."""
        missing = [str(s.url) for s in self.stores if name not in {lab.name for lab in s.manifest.labels or []}]
        if missing:
            raise StoreError(f"label {name!r} is not in every store of this view (missing in {', '.join(missing)}); "
                             "add it to each with `actstore label`")
        try:
            return pa.concat_tables([s.labels(name) for s in self.stores], promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise StoreError(f"label {name!r} has different value types across the stores of this view: {e}") \
                from None

