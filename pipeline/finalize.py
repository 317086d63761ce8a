"""Finish a run: merge per-shard statistics, write docs.parquet and stats/, and commit manifest.json last."""

from __future__ import annotations

import io
import json
import platform
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from safetensors.numpy import save as st_save

from actstore.pipeline.output import MANIFEST, RUN_RECORD
from actstore.schemas.config import ExtractConfig
from actstore.schemas.manifest import (
    CorpusInfo,
    HookInfo,
    Manifest,
    ModelInfo,
    ShardInfo,
    TokenizerInfo,
)
from actstore.workers import storage
from actstore.workers.dtypes import NUMPY_STORED
from actstore.workers.hookmap import n_layers_of
from actstore.workers.shard_writer import read_commit, read_shard_stats, shard_path
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
    group = zarr.open_group(storage.zarr_store(fs, storage.join(shard_path(root, first_shard), "acts.zarr"), True), mode="r")
    out = []
    for h in hooks:
        arr = group[h]
        dtype = arr.attrs["actstore_dtype"]
        out.append(HookInfo(name=h, d=int(arr.shape[1]), dtype=dtype, stored_dtype=NUMPY_STORED[dtype].name))
    return out


def merged_stats(fs, root: str, shard_ids: list[str], hooks: list[str]) -> dict[str, HookStats]:
    """Merge shard statistics in shard order (deterministic)."""
    total: dict[str, HookStats] = {}
    for sid in shard_ids:
        for h, st in with_retries(lambda: read_shard_stats(fs, root, sid, hooks), f"reading stats of {sid}").items():
            total[h] = total[h].merge(st) if h in total else st
    return total


def stats_blob(hook: str, st: HookStats) -> bytes:
    """stats/<hook>/stats.safetensors: a hook's merged statistics."""
    return st_save(st.to_tensors(""), metadata={"actstore": json.dumps({"format": "actstore-stats-v1", "hook": hook})})


def write_stats(fs, root: str, stats: dict[str, HookStats], atomic: bool = False) -> None:
    """Write merged statistics; `atomic` replaces existing files so readers never see a partial one."""
    put = storage.put_atomic if atomic else storage.put
    for h, st in stats.items():
        blob = stats_blob(h, st)
        path = storage.join(root, "stats", h, "stats.safetensors")
        with_retries(lambda: put(fs, path, blob), f"writing {path}")


def write_docs(fs, root: str, docs: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(docs, buf, compression="zstd")
    with_retries(lambda: storage.put_atomic(fs, storage.join(root, "docs.parquet"), buf.getvalue()), "writing docs.parquet")


def kind_of(hook: str) -> str | None:
    return hook.split(".", 2)[2] if hook.startswith("blocks.") else None


def commit_manifest(fs, root: str, manifest: Manifest) -> None:
    """Write manifest.json (the store's commit record) and drop the run's scratch state."""
    with_retries(lambda: storage.put_atomic(fs, storage.join(root, MANIFEST), manifest.to_json()), "writing manifest.json")
    for leftover in (storage.join(root, RUN_RECORD), storage.join(root, "shards", ".tmp")):
        if fs.exists(leftover):
            fs.rm(leftover, recursive=True)


def finalize_extract(cfg: ExtractConfig, plan: Any, model_cfg: Any, tok: Any, fs, root: str) -> Manifest:
    """Check every planned shard is committed as planned, then write docs, stats and the manifest."""
    infos = [_checked(with_retries(lambda p=p: read_commit(fs, root, p.shard_id), f"reading shard {p.shard_id}"), p)
             for p in plan.shards]
    hooks = list(cfg.hooks)
    stats = merged_stats(fs, root, [i.id for i in infos], hooks)
    write_docs(fs, root, plan.docs)
    write_stats(fs, root, stats)
    manifest = Manifest(
        created_by=library_versions().get("actstore", "0"), config_hash=cfg.config_hash(),
        model=_model_info(cfg, model_cfg), tokenizer=_tokenizer_info(tok, plan.special),
        context_length=cfg.context_length, packing=cfg.packing, hooks=hook_infos(fs, root, infos[0].id, hooks),
        n_tokens=plan.n_tokens, n_sequences=plan.n_sequences, n_docs=plan.docs.num_rows,
        corpus=CorpusInfo(sha256=plan.corpus_sha256, n_docs=plan.docs.num_rows), shards=infos,
        extract_config=cfg.public_dict(), versions=library_versions(),
        stats={h: stats[h].summary(kind_of(h)) for h in hooks},
    )
    commit_manifest(fs, root, manifest)
    return manifest


def _checked(info: ShardInfo, p: Any) -> ShardInfo:
    if info.seq_start != p.seq_start or info.n_tokens != p.n_tokens or info.token_start != p.token_start:
        raise RuntimeError(f"committed shard {info.id} does not match the plan (rows {info.n_tokens} vs "
                           f"{p.n_tokens}); the output was written by another run: use a new output")
    return info


def _model_info(cfg: ExtractConfig, mc: Any) -> ModelInfo:
    return ModelInfo(
        id=cfg.model, revision=cfg.revision, commit=getattr(mc, "_commit_hash", None),
        model_type=getattr(mc, "model_type", None), n_layers=n_layers_of(mc),
        d_model=getattr(mc, "hidden_size", None) or getattr(mc, "n_embd", None), model_dtype=cfg.model_dtype,
    )


def _tokenizer_info(tok: Any, special: Any) -> TokenizerInfo:
    return TokenizerInfo(name=str(getattr(tok, "name_or_path", "")), vocab_size=len(tok), bos_id=special.bos,
                         sep_id=special.sep, pad_id=special.pad, special_ids=sorted(special.special))
