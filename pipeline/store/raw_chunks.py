"""Fast read path for uncompressed Zarr v3 arrays on local disk: chunk files are the raw little-endian array.

With the plain `bytes` codec (optionally followed by `crc32c`) and default chunk keys, chunk i of a (n, d) array
is the file `c/i/0` holding exactly `rows_i * d` values (then, with crc32c, their 4-byte little-endian CRC-32C).
A chunk with a checksum is checked when it is first mapped (and again whenever its file changes), so a changed
byte fails the read with a StoreError instead of being returned. Memory-mapping it (or one `readinto` for reads spanning chunks) skips zarr's
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

import google_crc32c
import numpy as np

from actstore.schemas.errors import StoreError


def _soft_fd_limit() -> int:
    """This process's soft limit on open files."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return soft if soft != resource.RLIM_INFINITY else 1 << 16
    except (ImportError, OSError, ValueError):  # no `resource` module (Windows)
        return 256


PLAIN_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]
CRC_CODECS = [*PLAIN_CODECS, {"name": "crc32c"}]
# Open chunk maps shared by every reader: re-mapping a chunk per read (np.memmap: open, fstat, mmap) cost more
# than copying a 4 MiB chunk out of the page cache, and a fresh map faults its pages in one by one again (on a
# full scan that doubled the time Dask's concatenation takes). Bounded because each map keeps a file
# descriptor open and keeps a deleted chunk's disk space until it is evicted: a quarter of this process's soft
# fd limit, between 64 and 256 maps (1 GiB of default 4 MiB chunks).
_MAX_MAPS = max(64, min(256, _soft_fd_limit() // 4))
_maps: OrderedDict[tuple, mmap.mmap] = OrderedDict()
_maps_lock = threading.Lock()
# Chunk files whose checksum passed, by (path, inode, size, mtime, ctime): a scan of a store larger than the map
# cache re-maps every chunk, and re-checking each one then cost as much as the scan's copy itself. A write to a
# file changes its times and a replacement its inode, so a changed chunk is checked again; a same-size rewrite
# within one tick of a coarse file-system clock (1 s on some) would not be, which is the trust a cached map
# already gave. Bounded: ~400 bytes a key, ~100 MB at the cap (1 TiB of 4 MiB chunks).
_MAX_VERIFIED = 1 << 18
_verified: OrderedDict[tuple, None] = OrderedDict()


def _file_key(fname: str, st: os.stat_result) -> tuple:
    return fname, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _chunk_map(fname: str, checksum: bool = False) -> mmap.mmap | None:
    """A read-only map of a chunk file (cached by path, inode, size and times), or None if it does not exist.

    With `checksum` the file's trailing CRC-32C is checked once per version of the file (a changed file has a
    new key)."""
    try:
        st = os.stat(fname)
    except FileNotFoundError:
        return None
    seen = _file_key(fname, st)
    with _maps_lock:
        m = _maps.get(seen)
        if m is not None:
            _maps.move_to_end(seen)
            return m
    try:
        f = open(fname, "rb")
    except FileNotFoundError:
        return None
    with f:
        st = os.fstat(f.fileno())  # the key of the file actually mapped: it may have been replaced since stat
        key = _file_key(fname, st)
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else None
    with _maps_lock:
        checked = key in _verified
    if checksum and not checked:
        check_crc(m, fname)
    with _maps_lock:
        if checksum:
            _verified[key] = None
            _verified.move_to_end(key)
            while len(_verified) > _MAX_VERIFIED:
                _verified.popitem(last=False)
        if m is not None:
            _maps[key] = m
            while len(_maps) > _MAX_MAPS:
                _maps.popitem(last=False)  # arrays still viewing an evicted map keep it alive
    return m


def check_crc(data: mmap.mmap | bytes | None, fname: str) -> None:
    """Raise StoreError unless `data` ends with the CRC-32C of the bytes before it (Zarr's crc32c codec)."""
    body = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    if len(body) < 4 or google_crc32c.value(body[:-4]) != int.from_bytes(body[-4:].tobytes(), "little"):
        raise StoreError(f"chunk {fname} is corrupt: its crc32c checksum does not match the stored bytes (the file "
                         "changed after it was written); run `actstore verify` and re-extract the damaged shard")


class RawChunkArray:
    """Array-like (shape, dtype, chunks, __getitem__ over row slices) reading chunk files directly."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.chunks = (self.rows, self.shape[1])
        self.ndim = 2
        self.crc = meta.get("codecs") == CRC_CODECS  # chunk files end with a 4-byte checksum

    @classmethod
    def open(cls, path: str) -> RawChunkArray | None:
        """A raw reader for the array at `path`, or None when the fast path does not apply."""
        try:
            with open(os.path.join(path, "zarr.json")) as f:
                meta = json.load(f)
        except OSError:
            return None
        plain = (meta.get("codecs") in (PLAIN_CODECS, CRC_CODECS) and meta.get("chunk_key_encoding", {}).get("name") == "default"
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
            m = _chunk_map(os.path.join(self.path, "c", str(c), "0"), self.crc)
            n_rows = self._rows_in(m, c)
            if n_rows:
                mm = np.frombuffer(m, self.dtype, count=n_rows * d).reshape(n_rows, d)  # read-only view, no copy
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

    def _rows_in(self, m: mmap.mmap | None, c: int) -> int:
        """Rows a chunk file holds: the chunk's own rows, or a whole chunk's (Zarr may pad the edge chunk); 0 when
        its size fits neither (then the slower checked path reports it)."""
        if m is None:
            return 0
        row_bytes, n_rows = self.shape[1] * self.dtype.itemsize, min(self.rows, self.shape[0] - c * self.rows)
        data = len(m) - 4 * self.crc
        return next((r for r in (n_rows, self.rows) if r * row_bytes == data), 0)

    def _read_chunk(self, c: int, lo: int, hi: int, dest: np.ndarray) -> None:
        fname = os.path.join(self.path, "c", str(c), "0")
        if self.crc:  # through the (checked, cached) map: a part of a chunk cannot be checked on its own
            m = _chunk_map(fname, True)
            if m is None:
                dest[...] = 0
                return
            n_rows = self._rows_in(m, c)
            if not n_rows:
                raise StoreError(f"chunk file {fname} has {len(m)} bytes, not the array's chunk size")
            dest[...] = np.frombuffer(m, self.dtype, count=n_rows * self.shape[1]).reshape(n_rows, -1)[lo:hi]
            return
        try:
            with open(fname, "rb", buffering=0) as f:
                row_bytes = self.shape[1] * self.dtype.itemsize
                f.seek(lo * row_bytes)
                view = memoryview(dest.reshape(-1).view(np.uint8))
                n = f.readinto(view)
                if n != view.nbytes:
                    raise StoreError(f"chunk file {fname} is truncated ({lo * row_bytes + n} bytes)")
        except FileNotFoundError:
            dest[...] = 0  # a chunk equal to the fill value was never written
