"""Where analysis results go and what they say about themselves.

Every result an analysis writes (SAE directories, probe tables and weights, spectra, layer statistics, reports)
goes to an fsspec URL or local path, as given: an `s3://` output is written to S3, never to a local folder
named `s3:`. Each file is written atomically (a reader sees the old version or the new one), and each JSON
result carries its provenance: the store's URL and manifest SHA-256, the job that made it (without
credentials), the result kind and actstore's version. `actstore report` matches results to a store by that
manifest hash, never by folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from actstore.schemas.errors import OutputError
from actstore.version import __version__
from actstore.workers import storage

PROVENANCE = "provenance"


def version() -> str:
    return __version__


def provenance(store: Any, job: Any, kind: str) -> dict[str, Any]:
    """What a result records about where it came from."""
    return {"kind": kind, "store_url": store.url, "store_manifest_sha256": store.manifest_sha256,
            "job_type": type(job).__name__ if job is not None else None,
            "job": job.public_dict() if job is not None else None, "actstore_version": version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null; numpy scalars and arrays become Python numbers and lists."""
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        return clean(v.tolist())
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return str(v)


class Output:
    """An output location (a folder: local path or fsspec URL) that results are written into atomically."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self.storage_options = storage_options or {}
        self.fs, self.root = storage.get_fs(self.url, self.storage_options)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        """The user-facing URL of a file under this output (same scheme as the output)."""
        return "/".join([self.url.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def put_bytes(self, name: str, data: bytes) -> str:
        path = self.path(name)
        try:
            storage.with_retries(lambda: storage.put_atomic(self.fs, path, data), f"writing {self.url_of(name)}")
        except PermissionError as e:
            raise OutputError(f"cannot write {self.url_of(name)}: permission denied ({e.strerror or e})") from None
        return self.url_of(name)

    def put_json(self, name: str, obj: Any) -> str:
        return self.put_bytes(name, (json.dumps(clean(obj), indent=1) + "\n").encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.fs.cat_file(self.path(name)))

    def put_dir(self, local: str | Path, name: str, last: str | None = None) -> None:
        """Upload a local folder's files under `name/`, the file named `last` after all others."""
        storage.upload_dir(local, self.fs, self.path(name), last)


def check_writable(url: str, storage_options: dict[str, Any] | None, what: str) -> None:
    """Refuse an output that exists as a file, before any work; an existing folder is fine (results go inside)."""
    fs, root = storage.get_fs(url, storage_options)
    if fs.exists(root) and not fs.isdir(root):
        raise OutputError(f"{what} {url!r} is a file, not a folder; give a folder or a new path")
