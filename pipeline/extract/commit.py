"""Finish a run: merge statistics, write docs.parquet and stats/, and commit manifest.json last.

A format v2 run is finished from its parts' commit records alone (`parts/<part>.json`, each with its shard
records, plus the part's merged statistics and docs rows): the driver reads one record per part, never one per
shard, and streams the docs files into docs.parquet. A long shard list goes to the Parquet shard index.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from safetensors.numpy import save as st_save

from actstore.pipeline.store.shard_index import INDEX_MIN_SHARDS, index_bytes
from actstore.pipeline.store.store import merge_in_order, merged_stats, store_stats  # noqa: F401  (re-exported)
from actstore.schemas import layout
from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import CorpusError, OutputError
from actstore.schemas.manifest import (
    CorpusInfo,
    HookInfo,
    Manifest,
    ModelInfo,
    ShardIndex,
    ShardInfo,
    TokenizerInfo,
)
from actstore.workers import storage
from actstore.workers.dtypes import NUMPY_STORED
from actstore.workers.families import n_layers_of
from actstore.workers.stats import HookStats
from actstore.workers.storage import with_retries


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("actstore", "torch", "transformers", "zarr", "pyarrow", "numpy", "fsspec", "ray", "dask"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def hook_infos(fs, root: str, first_shard: str, hooks: list[str]) -> list[HookInfo]:
    """Hook widths and dtypes, read from the first shard's array metadata."""
    group = zarr.open_group(storage.zarr_store(fs, layout.shard_file(root, first_shard, layout.ACTS), True), mode="r")
    out = []
    for h in hooks:
        arr = group[h]
        assert isinstance(arr, zarr.Array), h
        dtype = arr.attrs["actstore_dtype"]
        out.append(HookInfo(name=h, d=int(arr.shape[1]), dtype=dtype, stored_dtype=NUMPY_STORED[dtype].name))
    return out


def stats_blob(hook: str, st: HookStats) -> bytes:
    """stats/<hook>/stats.safetensors: a hook's merged statistics."""
    return st_save(st.to_tensors(""), metadata={"actstore": json.dumps({"format": "actstore-stats-v1", "hook": hook})})


def write_stats(fs, root: str, stats: dict[str, HookStats], atomic: bool = False) -> None:
    """Write merged statistics; `atomic` replaces existing files so readers never see a partial one."""
    put = storage.put_atomic if atomic else storage.put
    for h, st in stats.items():
        blob = stats_blob(h, st)
        path = layout.stats_file(root, h)
        with_retries(lambda: put(fs, path, blob), f"writing {path}")


def write_docs(fs, root: str, docs: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(docs, buf, compression="zstd")
    with_retries(lambda: storage.put_atomic(fs, storage.join(root, layout.DOCS), buf.getvalue()), "writing docs.parquet")


def kind_of(hook: str) -> str | None:
    return hook.split(".", 2)[2] if hook.startswith("blocks.") else None


def commit_manifest(fs, root: str, manifest: Manifest) -> None:
    """Write manifest.json (the store's commit record) and drop the run's scratch state.

    A v2 manifest with more than INDEX_MIN_SHARDS shards names a Parquet index (written first) instead of listing
    them; readers get the same `manifest.shards` either way."""
    stored = manifest
    if manifest.schema_version >= 2 and len(manifest.shards) > INDEX_MIN_SHARDS:
        blob = index_bytes(manifest.shards, [h.name for h in manifest.hooks])
        path = storage.join(root, layout.SHARD_INDEX)
        with_retries(lambda: storage.put_atomic(fs, path, blob), f"writing {layout.SHARD_INDEX}")
        index = ShardIndex(path=layout.SHARD_INDEX, sha256=hashlib.sha256(blob).hexdigest(),
                           n_shards=len(manifest.shards))
        stored = manifest.model_copy(update={"shards": [], "shard_index": index})
    else:
        stored = manifest.model_copy(update={"shard_index": None})
        if fs.exists(storage.join(root, layout.SHARD_INDEX)):  # an index this manifest no longer names
            fs.rm(storage.join(root, layout.SHARD_INDEX))
    with_retries(lambda: storage.put_atomic(fs, storage.join(root, layout.MANIFEST), stored.to_json()),
                 "writing manifest.json")
    for leftover in (storage.join(root, layout.RUN_RECORD), layout.tmp_dir(root), storage.join(root, layout.PARTS)):
        if fs.exists(leftover):
            fs.rm(leftover, recursive=True)


log = logging.getLogger("actstore")



def global_shards(records: list[dict[str, Any]], offset: int) -> list[ShardInfo]:
    """The shard records of committed parts, in part order, with token ranges made global (starting at
    `offset`): a part's records count rows within the part."""
    out = []
    for rec in records:
        for d in rec["shards"]:
            info = ShardInfo.model_validate(d)
            out.append(info.model_copy(update={"token_start": offset + info.token_start,
                                               "token_end": offset + info.token_end}))
        offset += rec["n_tokens"]
    return out

def finalize_parts(cfg: ExtractConfig, indices: list[int], model_cfg: Any, tok: Any, special: Any, fs,
                   root: str, spans: list | None = None) -> Manifest:
    """Commit a v2 run from its parts' records (every part of `indices` must be committed); `spans`: the span
    labels of the records (`span_field`), written as labels/<span_field>.parquet."""
    from actstore.pipeline.extract.part_records import combine_docs, part_info, part_stats, read_part
    from actstore.pipeline.extract.sharding import corpus_sha256, describe

    records = [read_part(fs, root, i) for i in indices]
    missing = [i for i, r in zip(indices, records) if r is None]
    if missing:
        raise OutputError(f"corpus part {missing[0]} has no commit record; rerun the same config to finish it")
    infos = global_shards(records, 0)
    n_docs = sum(r["n_docs"] for r in records)
    if not n_docs:
        raise CorpusError(f"corpus {describe(cfg.corpus)} holds no documents")
    if not infos:
        raise CorpusError(f"corpus {describe(cfg.corpus)} has {n_docs} documents but no tokens "
                          "(all documents are empty)")
    for field, where in {k: v for r in records for k, v in r["mixed"].items()}.items():
        log.warning("metadata field %r has mixed types (%s); it is stored as strings", field, where)
    hooks = list(cfg.hooks)
    stats = merge_in_order([part_stats(fs, root, r["part"]["index"], hooks) for r in records if r["n_shards"]])
    responses = None
    if cfg.generate is not None:  # each part's docs rows get the responses its shards generated
        responses = {layout.part_file(root, r["part"]["index"], layout.PART_DOCS): [d["id"] for d in r["shards"]]
                     for r in records}
    combine_docs(fs, root, indices, responses=responses)
    write_stats(fs, root, stats)
    labels = None
    if spans is not None:
        from actstore.pipeline.extract.record_spans import write_record_labels

        labels = [write_record_labels(fs, root, str(cfg.span_field), infos, spans)]
    manifest = Manifest(
        created_by=library_versions().get("actstore", "0"), config_hash=cfg.config_hash(),
        model=model_info(cfg, model_cfg), tokenizer=tokenizer_info(tok, special),
        context_length=cfg.context_length, packing=cfg.packing, hooks=hook_infos(fs, root, infos[0].id, hooks),
        n_tokens=infos[-1].token_end, n_sequences=sum(r["n_sequences"] for r in records), n_docs=n_docs,
        corpus=CorpusInfo(sha256=corpus_sha256([r["sha256"] for r in records]), n_docs=n_docs), shards=infos,
        parts=[part_info(r) for r in records], extract_config=cfg.public_dict(), versions=library_versions(),
        stats={h: stats[h].summary(kind_of(h)) for h in hooks}, labels=labels,
    )
    commit_manifest(fs, root, manifest)
    return manifest


def model_info(cfg: ExtractConfig, mc: Any) -> ModelInfo:
    return ModelInfo(
        id=cfg.model, revision=cfg.revision, commit=getattr(mc, "_commit_hash", None),
        model_type=getattr(mc, "model_type", None), n_layers=n_layers_of(mc),
        d_model=getattr(mc, "hidden_size", None) or getattr(mc, "n_embd", None), model_dtype=cfg.model_dtype,
    )


def tokenizer_info(tok: Any, special: Any) -> TokenizerInfo:
    return TokenizerInfo(name=str(getattr(tok, "name_or_path", "")), vocab_size=len(tok), bos_id=special.bos,
                         sep_id=special.sep, pad_id=special.pad, special_ids=sorted(special.special))
