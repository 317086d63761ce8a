"""`actstore.from_arrays`: import activations made elsewhere (numpy, torch, dask) as a v1 store."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.pipeline.extract.commit import (
    commit_manifest,
    hook_infos,
    kind_of,
    library_versions,
    merged_stats,
    write_docs,
    write_stats,
)
from actstore.pipeline.extract.run_record import OutputError, check_output
from actstore.pipeline.store.store import Store, open_store
from actstore.schemas import layout
from actstore.schemas.errors import ConfigError
from actstore.schemas.hooks import parse_hooks
from actstore.schemas.manifest import CorpusInfo, Manifest
from actstore.workers import storage
from actstore.workers.dtypes import to_storage
from actstore.workers.shard_writer import ArraySpec, write_shard


def from_arrays(arrays: dict[str, Any], url: str, tokens: pa.Table | dict | None = None,
                docs: pa.Table | dict | None = None, shard_tokens: int = 65536, dtype: str | None = None,
                storage_options: dict | None = None) -> Store:
    """Write activations made elsewhere ({hook: (n, d) numpy/torch/dask array}) as a store at `url`.

    `tokens` (table or dict of columns token_id, doc_id, seq_id, position, special; missing ones default to one
    document and sequence per row) and `docs` (doc_id plus metadata/label columns) describe the rows; `dtype`
    (float32 | float16 | bfloat16) defaults to the arrays' own. Returns the committed Store. Raises ConfigError
    for arrays of different lengths or non-2-D arrays, OutputError when `url` holds something else.
    """
    parse_hooks(list(arrays))
    mats = {h: _as_tensor(a) for h, a in arrays.items()}
    ns = {h: int(m.shape[0]) for h, m in mats.items()}
    if len(set(ns.values())) != 1 or any(m.ndim != 2 for m in mats.values()):
        raise ConfigError(f"from_arrays needs 2-D arrays with the same number of rows, got {ns}")
    n = next(iter(ns.values()))
    dtype = dtype or _infer_dtype(mats)
    tok = _tokens(tokens, n)
    fs, root = storage.get_fs(url, storage_options)
    if check_output(fs, root, url, "from_arrays").resuming or fs.exists(storage.join(root, layout.MANIFEST)):
        raise OutputError(f"output {url!r} already holds a store; choose a new output")
    shard_ids = []
    for start in range(0, n, shard_tokens):
        stop = min(n, start + shard_tokens)
        part = {h: to_storage(m[start:stop], dtype)[0] for h, m in mats.items()}
        specs = [ArraySpec(h, part[h].shape[1], dtype) for h in mats]
        sid = f"{start:09d}"
        meta = {"seq_start": start, "seq_end": stop, "token_start": start, "token_end": stop}
        shard_ids.append(write_shard(fs, root, sid, meta, tok.slice(start, stop - start), part, specs))
    _finish(fs, root, list(mats), shard_ids, tok, docs, n)
    return open_store(url, storage_options)


def _finish(fs, root: str, hooks: list[str], infos: list, tok: pa.Table, docs: Any, n: int) -> None:
    docs_t = _docs(docs, tok)
    write_docs(fs, root, docs_t)
    stats = merged_stats(fs, root, [i.id for i in infos], hooks)
    write_stats(fs, root, stats)
    digest = hashlib.sha256(b"".join(i.tokens_sha256.encode() + "".join(i.arrays.values()).encode() for i in infos))
    commit_manifest(fs, root, Manifest(
        created_by=library_versions().get("actstore", "0"), hooks=hook_infos(fs, root, infos[0].id, hooks) if infos else [],
        n_tokens=n, n_sequences=len(np.unique(tok.column("seq_id").to_numpy())), n_docs=docs_t.num_rows,
        corpus=CorpusInfo(sha256=digest.hexdigest(), n_docs=docs_t.num_rows), shards=infos,
        versions=library_versions(), stats={h: stats[h].summary(kind_of(h)) for h in hooks},
    ))


def _as_tensor(a: Any):
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    if hasattr(a, "compute") and not isinstance(a, np.ndarray):
        a = a.compute()
    return torch.from_numpy(np.ascontiguousarray(a))


def _infer_dtype(mats: dict) -> str:

    kinds = {str(m.dtype).removeprefix("torch.") for m in mats.values()}
    if kinds <= {"bfloat16"}:
        return "bfloat16"
    if kinds <= {"float16"}:
        return "float16"
    return "float32"


def _tokens(tokens: Any, n: int) -> pa.Table:
    if tokens is None:
        rows = np.arange(n, dtype=np.int64)
        return pa.table({"token_id": pa.array(np.full(n, -1, np.int32)), "doc_id": pa.array(rows),
                         "seq_id": pa.array(rows), "position": pa.array(np.zeros(n, np.int32)),
                         "special": pa.array(np.zeros(n, bool))})
    t = tokens if isinstance(tokens, pa.Table) else pa.table(tokens)
    if t.num_rows != n:
        raise ConfigError(f"tokens has {t.num_rows} rows but the arrays have {n}")
    cols = {"token_id": pa.int32(), "doc_id": pa.int64(), "seq_id": pa.int64(), "position": pa.int32(),
            "special": pa.bool_()}
    defaults = {"token_id": np.full(n, -1), "seq_id": np.arange(n), "position": np.zeros(n), "special": np.zeros(n)}
    out = {}
    for name, typ in cols.items():
        col = t.column(name) if name in t.column_names else pa.array(defaults.get(name, np.arange(n)))
        out[name] = col.cast(typ)
    return pa.table(out)


def _docs(docs: Any, tok: pa.Table) -> pa.Table:
    if docs is None:
        return pa.table({"doc_id": pa.array(np.unique(tok.column("doc_id").to_numpy()))})
    t = docs if isinstance(docs, pa.Table) else pa.table(docs)
    if "doc_id" not in t.column_names:
        raise ConfigError("docs needs a doc_id column matching tokens' doc_id")
    return t
