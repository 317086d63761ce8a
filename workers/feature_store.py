"""Sparse SAE codes as a store: encode activation rows to top-k latents and write them shard by shard.

A feature store mirrors its source store's shards (same ids, same rows, the same tokens.parquet bytes):

    <root>/features.json                       written last: the feature store's commit record
    <root>/docs.parquet                        the source store's documents (copied)
    <root>/shards/<id>/tokens.parquet          the source shard's token index (copied byte for byte)
    <root>/shards/<id>/codes.zarr/latent_ids     Zarr v3 (n_tokens, k) int32, largest activation first; -1 = none
    <root>/shards/<id>/codes.zarr/latent_values  Zarr v3 (n_tokens, k) float16 (0 where the id is -1)
    <root>/shards/<id>/shard.json              the shard's commit record (written last in the shard)

Any Zarr v3 and Parquet reader opens it without actstore. A shard is built under shards/.tmp and renamed into
place on local disks; on object stores the commit record's PUT is the atomic step (as extraction does), so an
interrupted encode resumes shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import numpy as np
import torch
import zarr

from actstore.schemas import layout
from actstore.schemas.errors import Float16OverflowError
from actstore.schemas.sae import BATCH_TOPK_FAMILY
from actstore.workers import storage
from actstore.workers.shard_writer import chunk_rows, sha256_array

FORMAT = "actstore.features"
FORMAT_VERSION = 1


@torch.inference_mode()
def encode_topk(sae: Any, x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(latent ids (n, k) int32, values (n, k) float16) of the k largest latent activations of rows `x`.

    TopK SAEs keep the k largest pre-activations and ReLU them, so the code is read straight off `topk` of the
    pre-activations (no dense (n, d_sae) code is built); other architectures take the top k of their dense code.
    Entries whose activation is not positive get id -1 and value 0.
    """
    z = sae.pre_acts(x.to(sae.W_enc.dtype))
    arch = sae.cfg.architecture
    dense_rule = arch != "topk" and not (arch in BATCH_TOPK_FAMILY and sae.threshold is None)
    if dense_rule:
        z = sae.activate(z)
    kk = min(k, z.shape[-1])
    vals, ids = torch.topk(z, kk, dim=-1, sorted=True)
    if not dense_rule:
        vals[:, min(sae.cfg.k, kk):] = 0  # the SAE itself keeps only its own k latents
    vals = torch.relu(vals)
    ids = torch.where(vals > 0, ids, -1).to(torch.int32)
    out_v = vals.to(torch.float16)
    if not torch.isfinite(out_v).all():
        raise Float16OverflowError("latent activations exceed float16's range; they cannot be stored as float16")
    if kk < k:  # fewer latents than k: pad with empty entries
        pad = (0, k - kk)
        ids, out_v = torch.nn.functional.pad(ids, pad, value=-1), torch.nn.functional.pad(out_v, pad, value=0)
    return ids.cpu().numpy(), out_v.cpu().numpy()


def codes_path(root: str, shard_id: str) -> str:
    return layout.shard_file(root, shard_id, layout.CODES)


def is_committed(fs: Any, root: str, shard_id: str) -> bool:
    return fs.exists(layout.shard_file(root, shard_id, layout.SHARD_RECORD))


def read_record(fs: Any, root: str, shard_id: str) -> dict[str, Any]:
    return json.loads(fs.cat_file(layout.shard_file(root, shard_id, layout.SHARD_RECORD)))


def write_codes_shard(fs: Any, root: str, shard_id: str, tokens_parquet: bytes, ids: np.ndarray,
                      values: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """Write one shard (token index bytes, both code arrays) and commit it; returns its record."""
    final = layout.shard_dir(root, shard_id)
    local = storage.is_local(fs)
    work = storage.join(layout.tmp_dir(root), f"{shard_id}.{uuid.uuid4().hex[:12]}") if local else final
    if not local and fs.exists(final) and not is_committed(fs, root, shard_id):
        fs.rm(final, recursive=True)  # debris of an interrupted attempt
    fs.makedirs(work, exist_ok=True)
    storage.put(fs, storage.join(work, layout.TOKENS), tokens_parquet)
    group = zarr.open_group(storage.zarr_store(fs, storage.join(work, layout.CODES)), mode="w",
                            attributes={"format": FORMAT, "k": int(ids.shape[1])})
    for name, arr, fill in ((layout.LATENT_IDS, ids, -1), (layout.LATENT_VALUES, values, 0)):
        z = group.create_array(name, shape=arr.shape, dtype=arr.dtype, fill_value=fill,
                               chunks=(chunk_rows(arr.shape[0], arr.shape[1], arr.dtype.itemsize), arr.shape[1]),
                               dimension_names=("token", "rank"), compressors=None)
        if arr.shape[0]:
            z[:] = arr
    record = {**meta, "id": shard_id, "n_tokens": int(ids.shape[0]), "k": int(ids.shape[1]),
              "tokens_sha256": hashlib.sha256(tokens_parquet).hexdigest(),
              "latent_ids_sha256": sha256_array(ids), "latent_values_sha256": sha256_array(values)}
    _commit(fs, work, final, (json.dumps(record, indent=1) + "\n").encode())
    return record


def _commit(fs: Any, work: str, final: str, record: bytes) -> None:
    """The record last; on local disks the finished folder is renamed into place in one step."""
    storage.put_atomic(fs, storage.join(work, layout.SHARD_RECORD), record)
    if work == final:
        return
    if os.path.exists(os.path.join(final, layout.SHARD_RECORD)):
        fs.rm(work, recursive=True)  # a duplicate task already committed the same bytes
        return
    if os.path.exists(final):
        fs.rm(final, recursive=True)
    os.rename(work, final)


def read_codes(fs: Any, root: str, shard_id: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(latent ids, values) rows [start, stop) of one committed shard."""
    group = zarr.open_group(storage.zarr_store(fs, codes_path(root, shard_id), read_only=True), mode="r")
    ids: Any = group[layout.LATENT_IDS]
    vals: Any = group[layout.LATENT_VALUES]
    stop = ids.shape[0] if stop is None else stop
    return np.asarray(ids[start:stop]), np.asarray(vals[start:stop])
