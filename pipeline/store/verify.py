"""`Store.verify` / `actstore verify`: re-read every shard and compare with the manifest. Never raises."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas import layout
from actstore.workers import storage
from actstore.workers.dtypes import NUMPY_STORED
from actstore.workers.shard_writer import sha256_array, shard_path


@dataclass
class VerifyReport:
    """Outcome of a verification: `ok` is True only when nothing is missing or different."""

    url: str
    shards_checked: int = 0
    arrays_checked: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"url": self.url, "ok": self.ok, "shards_checked": self.shards_checked,
                "arrays_checked": self.arrays_checked, "bytes_read": self.bytes_read, "problems": self.problems}


def verify_store(store) -> VerifyReport:
    """Check ranges, token index bytes and every array's shape, dtype and SHA-256."""
    rep = VerifyReport(store.url)
    _check_ranges(store.manifest, rep)
    for i, info in enumerate(store.manifest.shards):
        rep.shards_checked += 1
        _check_tokens(store, info, rep)
        for h in store.manifest.hooks:
            _check_array(store, i, info, h, rep)
    rep.problems.extend(verify_labels(store))
    return rep


def _check_ranges(man, rep: VerifyReport) -> None:
    pos = 0
    for info in man.shards:
        if info.token_start != pos or info.token_end - info.token_start != info.n_tokens:
            rep.problems.append(f"shard {info.id}: token range [{info.token_start}, {info.token_end}) does not "
                                f"follow the previous shard (expected start {pos})")
        pos = info.token_end
    if pos != man.n_tokens:
        rep.problems.append(f"manifest n_tokens {man.n_tokens} != {pos} rows in its shards")


def _check_tokens(store, info, rep: VerifyReport) -> None:
    _check_file(store, info, layout.TOKENS, info.tokens_sha256, rep)
    if info.outputs_sha256 is not None:
        _check_file(store, info, layout.OUTPUTS, info.outputs_sha256, rep)
    if info.responses_sha256 is not None:
        _check_file(store, info, layout.RESPONSES, info.responses_sha256, rep)


def _check_file(store, info, name: str, sha256: str, rep: VerifyReport) -> None:
    path = storage.join(shard_path(store.root, info.id), name)
    try:
        raw = storage.with_retries(lambda: store.fs.cat_file(path), f"reading {path}")
    except (FileNotFoundError, OSError):
        rep.problems.append(f"shard {info.id}: {name} is missing")
        return
    rep.bytes_read += len(raw)
    if hashlib.sha256(raw).hexdigest() != sha256:
        rep.problems.append(f"shard {info.id}: {name} checksum mismatch")


def _check_array(store, i: int, info, h, rep: VerifyReport) -> None:
    rep.arrays_checked += 1
    try:
        arr = store.shard_array(i, h.name)
        data = (storage.with_retries(lambda: np.asarray(arr[:]), f"reading shard {info.id}") if info.n_tokens
                else np.zeros((0, h.d), NUMPY_STORED[h.dtype]))
    except Exception as e:  # a missing shard, a corrupt chunk or a shape mismatch: report, don't raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        rep.problems.append(f"shard {info.id}: array {h.name!r} unreadable: {msg}")
        return
    rep.bytes_read += data.nbytes
    if sha256_array(data.astype(NUMPY_STORED[h.dtype], copy=False)) != info.arrays.get(h.name):
        rep.problems.append(f"shard {info.id}: array {h.name!r} checksum mismatch (stored bytes changed)")


def verify_labels(store: Any) -> list[str]:
    """Problems of the manifest's label tables: missing, checksum mismatch, or a row count unlike the store's."""
    problems = []
    for lab in getattr(store.manifest, "labels", None) or []:
        path = layout.label_file(store.root, lab.name)
        try:
            raw = storage.with_retries(lambda p=path: store.fs.cat_file(p), f"reading {path}")
        except (FileNotFoundError, OSError):
            problems.append(f"label {lab.name}: {layout.LABELS}/{lab.name}.parquet is missing")
            continue
        if hashlib.sha256(raw).hexdigest() != lab.sha256:
            problems.append(f"label {lab.name}: checksum mismatch")
        try:
            rows = pq.read_metadata(pa.BufferReader(raw)).num_rows
        except (pa.ArrowInvalid, OSError):
            problems.append(f"label {lab.name}: not a readable Parquet file")
            continue
        if rows != store.n_tokens or lab.n_rows != store.n_tokens:
            problems.append(f"label {lab.name}: {rows} rows for {store.n_tokens} token rows")
    return problems
