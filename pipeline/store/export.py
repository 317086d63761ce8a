"""Export a row slice of one hook to a single file other tools read directly: .npy, .safetensors or Parquet.

`actstore export URL --hook H --rows A:B --format npy|safetensors|parquet -o PATH` calls `export_slice`. Every
writer streams the slice shard by shard, so memory stays at about one shard's rows whatever the slice size.

What each format holds (rows A..B-1 of the store, in store order):

- npy: the (B-A, d) activation matrix only. float16 stays float16; bfloat16 becomes float32 (exact: numpy has no
  bfloat16).
- safetensors: tensor `activations` (B-A, d) in the stored dtype (F32, F16, or BF16 bit-exact), plus the token
  index as tensors `token_id` (I32), `doc_id` (I64), `seq_id` (I64), `position` (I32), `special` (BOOL), and
  string metadata hook, rows ("A:B"), store dtype and source URL.
- parquet: column `activations` of type fixed_size_list<float32|float16>[d] (bfloat16 -> float32) next to the
  token index columns token_id, doc_id, seq_id, position, special; one row group per shard piece.

Both also carry `char_start`/`char_end` (I32: the token's character span, -1 for special tokens) and `response`
(BOOL: a generated token) when every shard of the slice holds them, so span labels can be joined after export.

The row helpers here (`row_pieces`, `parse_rows`) are shared by the other adapters.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas.errors import ConfigError, OutputError
from actstore.workers.dtypes import NUMPY_STORED, decode, decoded_dtype

FORMATS = ("npy", "safetensors", "parquet")
TOKEN_COLUMNS = ("token_id", "doc_id", "seq_id", "position", "special")
# exported when every shard of the slice has them (older stores and from_arrays stores may not)
OPTIONAL_COLUMNS = ("char_start", "char_end", "response")
# safetensors dtype names of the arrays we write (stored activation bytes and token index columns)
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64",
              "bool": "BOOL"}


# ---- rows ---------------------------------------------------------------------------------------------------
def parse_rows(text: str | None, n: int) -> tuple[int, int]:
    """`A:B` (either side optional, negatives count from the end, like Python slices) -> (start, stop)."""
    if text is None or text.strip() in ("", ":"):
        return 0, n
    a, sep, b = text.partition(":")
    if not sep:
        raise ConfigError(f"--rows {text!r}: expected A:B (e.g. 0:1000)")
    try:
        start, stop, _ = slice(int(a) if a.strip() else None, int(b) if b.strip() else None).indices(n)
    except ValueError:
        raise ConfigError(f"--rows {text!r}: A and B must be integers") from None
    if stop <= start:
        raise ConfigError(f"--rows {text!r} selects no rows of the store's 0:{n} (rows {start}:{stop}); give A < B")
    return start, stop


def check_rows(store: Any, rows: tuple[int, int] | None) -> tuple[int, int]:
    """Validate a global row range [start, stop) against the store; None means every row."""
    if rows is None:
        return 0, store.n_tokens
    start, stop = int(rows[0]), int(rows[1])
    if not 0 <= start <= stop <= store.n_tokens:
        raise ConfigError(f"rows {start}:{stop} are outside the store's 0:{store.n_tokens}")
    return start, stop


def row_pieces(store: Any, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard index, local start, local stop) covering global rows [start, stop), in order."""
    out = []
    for i, info in enumerate(store.manifest.shards):
        a, b = max(start, info.token_start), min(stop, info.token_start + info.n_tokens)
        if a < b:
            out.append((i, a - info.token_start, b - info.token_start))
    return out


def iter_slice(store: Any, hook: str, start: int, stop: int, raw: bool = False,
               ) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """(rows, token index rows) per shard piece of [start, stop); `raw` keeps the stored bytes (bf16 as uint16)."""
    dtype = store.manifest.hook(hook).dtype
    for i, a, b in row_pieces(store, start, stop):
        stored = np.asarray(store.shard_array(i, hook)[a:b])
        yield (stored if raw else decode(stored, dtype)), store.shard_tokens(i).slice(a, b - a)


def token_slice(store: Any, start: int, stop: int, columns: tuple[str, ...] = TOKEN_COLUMNS) -> pa.Table:
    """The token index rows [start, stop) (reads only the shards that overlap)."""
    parts = [store.shard_tokens(i).slice(a, b - a) for i, a, b in row_pieces(store, start, stop)]
    return pa.concat_tables(parts).select(list(columns)) if parts else _empty_tokens(columns)


def slice_columns(store: Any, start: int, stop: int) -> tuple[str, ...]:
    """The token columns an export of rows [start, stop) carries: the index, plus the optional columns that
    every overlapping shard holds."""
    extra = set(OPTIONAL_COLUMNS)
    for i, _, _ in row_pieces(store, start, stop):
        extra &= set(store.shard_tokens(i).column_names)
    return TOKEN_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in extra) if start < stop else TOKEN_COLUMNS


_COLUMN_TYPES = {"token_id": pa.int32(), "doc_id": pa.int64(), "seq_id": pa.int64(), "position": pa.int32(),
                 "special": pa.bool_(), "char_start": pa.int32(), "char_end": pa.int32(), "response": pa.bool_()}


def _empty_tokens(columns: tuple[str, ...] = TOKEN_COLUMNS) -> pa.Table:
    return pa.table({c: pa.array([], _COLUMN_TYPES[c]) for c in columns})


def fixed_size_list(rows: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) C-contiguous numpy -> Arrow fixed_size_list<float>[d] over the same buffer (no copy)."""
    rows = np.ascontiguousarray(rows)  # a no-op for the contiguous arrays we read from Zarr
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


# ---- export -------------------------------------------------------------------------------------------------
def export_slice(store: Any, hook: str, rows: tuple[int, int] | None, fmt: str, path: str | os.PathLike,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write rows [a, b) of `hook` to a local file in `fmt` (see the module docstring); returns a summary.

    An existing file is refused unless `overwrite`; the file appears complete or not at all (written under a
    temporary name, then renamed). Raises ConfigError, HookNameError, OutputError."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    h = store.manifest.hook(hook)
    start, stop = check_rows(store, rows)
    path = os.fspath(path)
    if os.path.isdir(path) or (os.path.exists(path) and not overwrite):
        what = "a folder" if os.path.isdir(path) else "a file that exists"
        raise OutputError(f"-o {path!r} is {what}; give a new file name"
                          + ("" if os.path.isdir(path) else " or --overwrite to replace it"))
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = {"npy": _write_npy, "safetensors": _write_safetensors, "parquet": _write_parquet}[fmt]
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        writer(store, hook, start, stop, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dtype = h.dtype if fmt == "safetensors" else decoded_dtype(h.dtype).name  # safetensors keeps bfloat16
    return {"path": path, "format": fmt, "hook": hook, "rows": [start, stop], "shape": [stop - start, h.d],
            "dtype": dtype, "bytes": os.path.getsize(path)}


def _write_npy(store: Any, hook: str, start: int, stop: int, path: str) -> None:
    h = store.manifest.hook(hook)
    # open_memmap writes the .npy header and lets each shard piece land in place: bounded memory
    out = np.lib.format.open_memmap(path, mode="w+", dtype=decoded_dtype(h.dtype), shape=(stop - start, h.d))
    at = 0
    for part, _ in iter_slice(store, hook, start, stop):
        out[at:at + len(part)] = part
        at += len(part)
    out.flush()
    del out


def _write_parquet(store: Any, hook: str, start: int, stop: int, path: str) -> None:
    h = store.manifest.hook(hook)
    value = pa.from_numpy_dtype(decoded_dtype(h.dtype))
    columns = slice_columns(store, start, stop)
    schema = pa.schema([("activations", pa.list_(value, h.d)), *_empty_tokens(columns).schema],
                       metadata={"actstore": json.dumps({"hook": hook, "rows": [start, stop], "dtype": h.dtype})})
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        if start == stop:
            w.write_table(schema.empty_table())
        for part, tok in iter_slice(store, hook, start, stop):
            cols = [fixed_size_list(part), *(tok.column(c).cast(_COLUMN_TYPES[c]) for c in columns)]
            w.write_table(pa.Table.from_arrays(cols, schema=schema))


def _write_safetensors(store: Any, hook: str, start: int, stop: int, path: str) -> None:
    """Stream a safetensors file: header (all sizes are known up front), then the tensors' bytes in order."""
    h, n = store.manifest.hook(hook), stop - start
    columns = slice_columns(store, start, stop)
    tok = token_slice(store, start, stop, columns)
    cols = {c: tok.column(c).to_numpy(zero_copy_only=False) for c in columns}
    entries = [("activations", h.dtype, [n, h.d], n * h.d * NUMPY_STORED[h.dtype].itemsize)]
    entries += [(c, str(a.dtype), [n], a.nbytes) for c, a in cols.items()]
    meta = {"hook": hook, "rows": f"{start}:{stop}", "dtype": h.dtype, "source": str(store.url), "format": "actstore"}
    with open(path, "wb") as f:
        f.write(_safetensors_header(entries, meta))
        # stored bytes as they are (bf16 stays its uint16 bit pattern = safetensors BF16), little-endian
        parts = iter_slice(store, hook, start, stop, raw=True)
        f.writelines(np.ascontiguousarray(p, dtype=p.dtype.newbyteorder("<")).tobytes() for p, _ in parts)
        f.writelines(np.ascontiguousarray(a).tobytes() for a in cols.values())


def _safetensors_header(entries: list[tuple[str, str, list[int], int]], meta: dict[str, str]) -> bytes:
    """8-byte little-endian header length + JSON header padded with spaces so the data starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob
