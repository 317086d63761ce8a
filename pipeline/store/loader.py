"""Shuffled training batches from a store with bounded memory.

Each epoch reads the store's chunk-aligned row blocks in a seeded random order, gathers them into windows of
at most `buffer_rows` rows, permutes every window and cuts it into batches; rows that do not fill a batch carry
into the next window. Every row (optionally minus special tokens) is visited exactly once per epoch, the order
is a pure function of (seed, epoch), and memory stays at about `buffer_rows` rows per hook.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from actstore.pipeline.store.blocks import chunk_blocks
from actstore.schemas.errors import ConfigError


class ActivationLoader:
    """Iterable of batches: a tensor for one hook, or {hook: tensor} for several (same rows)."""

    def __init__(self, store: Any, hooks: str | list[str], batch_size: int, shuffle: bool = True, seed: int = 0,
                 buffer_rows: int = 1 << 16, skip_special: bool = False, drop_last: bool = False,
                 epoch: int = 0, rows: tuple[int, int] | None = None) -> None:
        if batch_size <= 0 or buffer_rows <= 0:
            raise ConfigError("batch_size and buffer_rows must be positive")
        self.store, self.single = store, isinstance(hooks, str)
        self.hooks = [hooks] if self.single else list(hooks)
        for h in self.hooks:
            store.manifest.hook(h)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.buffer_rows, self.skip_special, self.drop_last = max(buffer_rows, batch_size), skip_special, drop_last
        self.rows = rows  # optional global row range [start, stop) (e.g. a held-out split)

    def blocks(self) -> list[tuple[int, int, int]]:
        """(shard index, start, stop) chunk-aligned row blocks within `rows`."""
        return chunk_blocks(self.store, self.hooks[0], self.rows)

    def __iter__(self) -> Iterator[Any]:
        rng = np.random.default_rng([self.seed, self.epoch])
        blocks = self.blocks()
        order = rng.permutation(len(blocks)) if self.shuffle else np.arange(len(blocks))
        # One buffer per hook, reused for every window: carried rows sit at its front and the next window is
        # read right after them, so each row is copied once on the way in and once into its batch (no
        # concatenations, no fresh page-faulted buffers per window). A window stops at the first block that
        # reaches `buffer_rows`, and the carry is shorter than a batch, which bounds the size.
        longest = max((b - a for _, a, b in blocks), default=0)
        bufs = [np.empty((self.buffer_rows + longest + self.batch_size, self.store.manifest.hook(h).d), np.float32)
                for h in self.hooks]
        window: list[tuple[int, int, int]] = []
        size = carried = 0
        for j in order:
            window.append(blocks[j])
            size += blocks[j][2] - blocks[j][1]
            if size >= self.buffer_rows:
                carried = yield from self._emit(bufs, carried, window, rng, final=False)
                window, size = [], 0
        yield from self._emit(bufs, carried, window, rng, final=True)

    def _emit(self, bufs: list[np.ndarray], carried: int, window, rng, final: bool):
        """Batches from the carried rows plus `window`; returns how many rows it carried to the buffer front."""
        n = self._read(bufs, carried, window)
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        full = n - n % self.batch_size
        for s in range(0, full, self.batch_size):
            idx = perm[s:s + self.batch_size]
            yield self._batch([np.take(b, idx, axis=0) for b in bufs])  # a copy: the buffer can be reused
        rest = perm[full:]
        if final:
            if len(rest) and not self.drop_last:
                yield self._batch([np.take(b, rest, axis=0) for b in bufs])
            return 0
        for b in bufs:
            b[:len(rest)] = b[rest]  # fancy indexing copies before the assignment, so overlap is safe
        return len(rest)

    def _read(self, bufs: list[np.ndarray], pos: int, window) -> int:
        """Read the window's rows (minus special tokens if asked) into the buffers from row `pos`; returns the
        new row count. Decoding and the cast to float32 happen in the same copy."""
        for i, a, b in window:
            keep = (self._special(i)[a:b] == 0) if self.skip_special else None
            m = int(keep.sum()) if keep is not None else b - a
            for h, buf in zip(self.hooks, bufs):
                rows = self.store.read_rows(h, i, a, b)
                np.copyto(buf[pos:pos + m], rows if keep is None else rows[keep], casting="unsafe")
            pos += m
        return pos

    def _special(self, shard_index: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_special_cache", {})
        if shard_index not in cache:
            col = self.store.shard_tokens(shard_index).column("special")
            cache[shard_index] = col.to_numpy(zero_copy_only=False).astype(np.uint8)
        return cache[shard_index]

    def _batch(self, cols: list[np.ndarray]) -> Any:
        tensors = [torch.from_numpy(c) for c in cols]
        return tensors[0] if self.single else dict(zip(self.hooks, tensors))
