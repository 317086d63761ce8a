"""Save and load cross-layer transcoders: a self-describing folder of JSON + safetensors (no pickle).

A folder written by `save_clt` holds:

- clt_weights.safetensors: W_enc (L, d_model, d_sae), b_enc (L, d_sae), b_dec (L, d_model), W_dec.{l}
  (d_sae, L - l, d_model) for each layer l, plus log_threshold (jumprelu) or running_threshold and its count
  (batchtopk): the module's state_dict, float32, so `load_clt` rebuilds it exactly.
- clt.json, written last (its presence marks a complete save): format and version, the CLTConfig, the hooks the
  CLT reads and writes per layer (`hooks_in`, `hooks_out`), and the caller's metadata (training config and
  metrics, provenance: store URL and manifest SHA-256, job, actstore version).

Each file is written atomically to a local folder or any fsspec URL. `actstore.pipeline.analysis.clt` adds
metrics.json; `export_clt_circuit_tracer` converts a saved CLT into circuit-tracer's layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from actstore.schemas.errors import ConfigError
from actstore.schemas.sae import CLTConfig
from actstore.workers import storage
from actstore.workers.sae.clt import CrossLayerTranscoder

CLT_CONFIG_FILE, CLT_WEIGHTS_FILE = "clt.json", "clt_weights.safetensors"
CLT_FORMAT = "actstore.clt"
CLT_FORMAT_VERSION = 1


def save_clt(res: Any, directory: str | os.PathLike, extra_metadata: dict[str, Any] | None = None,
             storage_options: dict[str, Any] | None = None) -> str:
    """Write a TrainResult holding a CrossLayerTranscoder (weights, then clt.json) to a folder or URL."""
    clt: CrossLayerTranscoder = res.sae
    fs, root = storage.get_fs(str(directory), storage_options)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in clt.state_dict().items()}
    half = len(res.hooks) // 2
    meta = {"format": CLT_FORMAT, "format_version": CLT_FORMAT_VERSION, "clt_config": asdict(clt.cfg),
            "hooks_in": res.hooks[:half], "hooks_out": res.hooks[half:],
            "metadata": {"train_config": asdict(res.train_cfg), "train_metrics": res.metrics,
                         **({"provenance": res.provenance} if res.provenance else {}), **(extra_metadata or {})}}
    _put(fs, storage.join(root, CLT_WEIGHTS_FILE), st_save(tensors, {"format": "pt"}))
    _put(fs, storage.join(root, CLT_CONFIG_FILE), json.dumps(meta, indent=1, default=str).encode())
    return str(directory)


def _put(fs: Any, path: str, data: bytes) -> None:
    storage.with_retries(lambda: storage.put_atomic(fs, path, data), f"writing {path}")


def read_clt_meta(directory: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """clt.json of a saved CLT; ConfigError when the folder holds none."""
    fs, root = storage.get_fs(str(directory), storage_options)
    path = storage.join(root, CLT_CONFIG_FILE)
    if not fs.exists(path):
        raise ConfigError(f"{directory} is not a cross-layer transcoder folder (no {CLT_CONFIG_FILE}); give a "
                          "folder written by `actstore train clt --out`")
    meta = json.loads(fs.cat_file(path))
    if meta.get("format") != CLT_FORMAT or meta.get("format_version", 0) > CLT_FORMAT_VERSION:
        raise ConfigError(f"{directory}/{CLT_CONFIG_FILE} is not an actstore CLT of a version this actstore reads")
    return meta


def load_clt(directory: str | os.PathLike, storage_options: dict[str, Any] | None = None,
             ) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """(the CLT in eval mode, its clt.json) from a folder written by `save_clt`."""
    meta = read_clt_meta(directory, storage_options)
    fs, root = storage.get_fs(str(directory), storage_options)
    clt = CrossLayerTranscoder(CLTConfig(**meta["clt_config"]))
    clt.load_state_dict(st_load(fs.cat_file(storage.join(root, CLT_WEIGHTS_FILE))))
    return clt.eval(), meta
