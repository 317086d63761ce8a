"""fsspec filesystems that misbehave on purpose: transient errors, permanent errors, and a disk quota.

They extend the in-memory filesystem, so zarr reaches them through fsspec (not a local fast path) and every
write and read of a store goes through the fault points.
"""

from __future__ import annotations

import errno
import random

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FaultFS(MemoryFileSystem):
    """memory:// with injected faults. Class attributes configure it (tests reset them)."""

    protocol = "faulty"
    root_marker = "/"
    rng = random.Random(0)
    p_write = 0.0  # probability a write raises ConnectionError (transient)
    p_read = 0.0  # probability a read raises ConnectionError (transient)
    deny = ""  # paths containing this substring fail every write with PermissionError (permanent)
    quota: int | None = None  # bytes; writes beyond it raise ENOSPC (a full disk)
    used = 0
    injected = 0

    @classmethod
    def reset(cls, seed: int = 0) -> None:
        cls.rng, cls.p_write, cls.p_read, cls.deny, cls.quota, cls.used, cls.injected = (
            random.Random(seed), 0.0, 0.0, "", None, 0, 0)

    def _fault(self, path: str, write: bool, size: int = 0) -> None:
        cls = type(self)
        if write and cls.deny and cls.deny in path:
            raise PermissionError(errno.EACCES, f"permission denied: {path}")
        if cls.rng.random() < (cls.p_write if write else cls.p_read):
            cls.injected += 1
            raise ConnectionError(f"injected transient fault on {path}")
        if write and cls.quota is not None:
            if cls.used + size > cls.quota:
                raise OSError(errno.ENOSPC, "No space left on device")
            cls.used += size

    def pipe_file(self, path, value, **kwargs):
        self._fault(path, True, len(value))
        return super().pipe_file(path, value, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._fault(path, False)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        self._fault(path, "w" in mode or "a" in mode)
        return super()._open(path, mode=mode, **kwargs)


fsspec.register_implementation("faulty", FaultFS, clobber=True)
