"""Fast read path for uncompressed Zarr v3 arrays on local disk: chunk files are the raw little-endian array.

With the plain `bytes` codec and default chunk keys, chunk i of a (n, d) array is the file `c/i/0` holding
exactly `rows_i * d` values. Memory-mapping it (or one `readinto` for reads spanning chunks) skips zarr's
per-chunk buffer copies and async machinery (a full scan runs several times faster). Anything else (compression, object
stores, other encodings) goes through zarr. Missing chunk files are fill-value chunks (zarr skips writing
chunks that equal the fill value), so they read as zeros.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

PLAIN_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]
# Open chunk maps shared by every reader: re-mapping a chunk per read (np.memmap: open, fstat, mmap) cost more
# than copying a 4 MiB chunk out of the page cache. Bounded because each map keeps a file descriptor open.
_MAX_MAPS = 64
_maps: OrderedDict[tuple, mmap.mmap] = OrderedDict()
_maps_lock = threading.Lock()


def _chunk_map(fname: str) -> mmap.mmap | None:
    """A read-only map of a chunk file (cached by path, inode, size and mtime), or None if it does not exist."""
    try:
        st = os.stat(fname)
    except FileNotFoundError:
        return None
    key = (fname, st.st_ino, st.st_size, st.st_mtime_ns)
    with _maps_lock:
        m = _maps.get(key)
        if m is not None:
            _maps.move_to_end(key)
            return m
    with open(fname, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else None
    if m is not None:
        with _maps_lock:
            _maps[key] = m
            while len(_maps) > _MAX_MAPS:
                _maps.popitem(last=False)  # arrays still viewing an evicted map keep it alive
    return m


class RawChunkArray:
    """Array-like (shape, dtype, chunks, __getitem__ over row slices) reading chunk files directly."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.chunks = (self.rows, self.shape[1])
        self.ndim = 2

    @classmethod
    def open(cls, path: str) -> RawChunkArray | None:
        """A raw reader for the array at `path`, or None when the fast path does not apply."""
        try:
            with open(os.path.join(path, "zarr.json")) as f:
                meta = json.load(f)
        except OSError:
            return None
        plain = (meta.get("codecs") == PLAIN_CODECS and meta.get("chunk_key_encoding", {}).get("name") == "default"
                 and meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
                 and meta.get("chunk_grid", {}).get("name") == "regular" and len(meta.get("shape", [])) == 2
                 and meta["chunk_grid"]["configuration"]["chunk_shape"][1] == meta["shape"][1]
                 and meta.get("fill_value") in (0, 0.0) and not meta.get("storage_transformers"))
        return cls(path, meta) if plain else None

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # dask passes (rows, cols) slices; columns are always full here
            key, cols = key[0], key[1:]
        else:
            cols = ()
        start, stop, step = key.indices(self.shape[0]) if isinstance(key, slice) else (key, key + 1, 1)
        if step != 1:
            return self[start:stop][::step]
        out = self.read(start, stop)
        return out[(slice(None), *cols)] if cols else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read(0, self.shape[0])
        return out.astype(dtype) if dtype is not None else out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop): a read-only memory map when they lie in one chunk (no copy; the common case,
        since dask chunks are the zarr chunks), else a new array filled with one readinto per chunk."""
        d, stop = self.shape[1], min(stop, self.shape[0])
        c = start // self.rows
        if stop > start and (stop - 1) // self.rows == c:
            m = _chunk_map(os.path.join(self.path, "c", str(c), "0"))
            n_rows = min(self.rows, self.shape[0] - c * self.rows)
            if m is not None and len(m) == n_rows * d * self.dtype.itemsize:
                mm = np.frombuffer(m, self.dtype).reshape(n_rows, d)  # read-only view, no copy
                return mm[start - c * self.rows:stop - c * self.rows]
        out = np.empty((max(0, stop - start), d), self.dtype)
        row = start
        while row < stop:
            c = row // self.rows
            c0, c1 = c * self.rows, min((c + 1) * self.rows, self.shape[0])
            hi = min(stop, c1)
            self._read_chunk(c, row - c0, hi - c0, out[row - start:hi - start])
            row = hi
        return out

    def _read_chunk(self, c: int, lo: int, hi: int, dest: np.ndarray) -> None:
        fname = os.path.join(self.path, "c", str(c), "0")
        try:
            with open(fname, "rb", buffering=0) as f:
                row_bytes = self.shape[1] * self.dtype.itemsize
                f.seek(lo * row_bytes)
                view = memoryview(dest.reshape(-1).view(np.uint8))
                n = f.readinto(view)
                if n != view.nbytes:
                    raise OSError(f"chunk file {fname} is truncated ({lo * row_bytes + n} bytes)")
        except FileNotFoundError:
            dest[...] = 0  # a chunk equal to the fill value was never written
