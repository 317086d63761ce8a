"""fsspec helpers shared by the shard writer and the store reader: URL -> filesystem, Zarr stores, atomic puts.

Credentials live only in the `storage_options` passed here; nothing in this module logs or records them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import Store as ZarrStore
from zarr.storage import FsspecStore, LocalStore

from actstore.schemas.errors import (
    StorageError,  # noqa: F401  (defined with its siblings; raised here)
    StoreError,
)
from actstore.schemas.layout import join  # noqa: F401  (re-exported: the one path joiner)


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, root path without protocol) for a store URL or plain path."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)




def zarr_store(fs: fsspec.AbstractFileSystem, path: str, read_only: bool = False) -> ZarrStore:
    """A Zarr store over `path`: LocalStore for local disks (fastest), FsspecStore otherwise."""
    if is_local(fs):
        return LocalStore(path, read_only=read_only)
    if getattr(fs, "async_impl", False) and not getattr(fs, "asynchronous", False):
        # zarr drives async filesystems from its own event loop: it needs an instance made for async use
        # (a sync-mode s3fs instance is bound to fsspec's loop and fails with "attached to a different loop").
        fs = type(fs)(**{**fs.storage_options, "asynchronous": True})
    elif not getattr(fs, "async_impl", False):
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = AsyncFileSystemWrapper(fs)
    with warnings.catch_warnings():
        # a wrapped sync filesystem (memory://) is fine for zarr; its "not asynchronous" warning is noise
        warnings.simplefilter("ignore")
        return FsspecStore(fs, path=path, read_only=read_only)


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small object so readers see either the old or the new version, never a partial one.

    Object stores (S3, memory) replace objects atomically on PUT; local disks need write-to-temp + rename.
    """
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Any]:
    """A binary file to stream a large object into; readers see it only once complete (local disks: a temporary
    name renamed at the end; object stores: the upload completes when the file closes)."""
    if not is_local(fs):
        with fs.open(path, "wb") as f:
            yield f
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, limit: int | None = None) -> bytes:
    """Read a whole (small) object, refusing ones above `limit` bytes (JSON inputs have size limits)."""
    if limit is not None:
        size = fs.size(path)
        if size is not None and size > limit:
            raise StoreError(f"{path} is {size} bytes, above the {limit}-byte limit for this file")
    return fs.cat_file(path)


def put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write an object, creating parent directories on local disks."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EINTR}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network hiccups and throttling, not missing files, permissions or a full disk."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    name = type(exc).__name__
    return name in {"ClientConnectionError", "ServerTimeoutError", "EndpointConnectionError", "ReadTimeoutError",
                    "SlowDown", "ThrottlingException"} or (exc.__cause__ is not None and is_transient(exc.__cause__))


def with_retries(fn, what: str, attempts: int = 8, base_delay: float = 0.1, max_delay: float = 5.0):
    """Call fn(); retry transient errors with exponential backoff and jitter, fail permanent ones at once.

    Only idempotent operations go through here (a shard rewrite produces the same bytes), so retrying a
    partially done attempt is safe.
    """
    import random
    import time

    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # classify, then re-raise with a one-line cause
            if not is_transient(e):
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    raise StorageError(errno.ENOSPC, f"{what}: no space left on the output device") from e
                raise
            if attempt == attempts - 1:
                raise StorageError(f"{what}: still failing after {attempts} attempts: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}") from e
            time.sleep(min(max_delay, base_delay * 2**attempt) * (0.5 + random.random()))


def upload_dir(local: str | os.PathLike, fs: fsspec.AbstractFileSystem, root: str, last: str | None = None) -> None:
    """Copy a local folder's files under `root` (each PUT atomic), the file named `last` after all the others,
    so its presence marks the copy complete."""
    from pathlib import Path

    files = sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    for p in files:
        dest = join(root, *p.relative_to(local).parts)
        data = p.read_bytes()
        with_retries(lambda dest=dest, data=data: put_atomic(fs, dest, data), f"writing {dest}")
