"""`actstore export-transcoders`: trained per-layer transcoders as one folder that circuit-tracer loads.

Input: transcoder folders written by `actstore train transcoder` / `train_transcoder(out_dir=...)` (SAELens
files plus actstore.json), local or any fsspec URL, or folders whose subfolders are such folders (one training
output per layer). They must form one set: transcoders (not SAEs) of the same model and store, one per layer
0..n-1 with the same input and output kinds (`hook_mlp_in` or `hook_resid_mid` -> `hook_mlp_out`), width,
activation and skip connection. Anything else is refused with a one-line error before a byte is written.

A cross-layer transcoder folder (`actstore train clt --out`, holding clt.json) is exported alone as circuit-tracer's
`cross_layer_transcoder`: it must cover every layer 0..n-1 of its model.

Output: `layer_{i}.safetensors` per layer (a CLT: `W_enc_{i}.safetensors` and `W_dec_{i}.safetensors`),
`actstore_export.json` (where each layer came from) and `config.yaml` written last, so its presence marks a complete export (circuit-tracer's own cache uses the same rule). Load it
with circuit-tracer by its absolute path (`ReplacementModel.from_pretrained(model, "/abs/path")`) or upload it
to the Hugging Face Hub. The tensor layout is documented in `actstore.workers.sae.circuit_tracer`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml
from safetensors.torch import save as safetensors_bytes

from actstore.pipeline.analysis.results import Output, version
from actstore.schemas.errors import ConfigError, OutputError
from actstore.schemas.hooks import HookNameError, parse_hook
from actstore.workers import storage
from actstore.workers.families import MODEL_TYPES, family_of_type
from actstore.workers.sae import circuit_tracer as ct
from actstore.workers.sae.clt_io import CLT_CONFIG_FILE, load_clt
from actstore.workers.sae.model import SparseAutoencoder
from actstore.workers.sae.saelens import CFG_FILE, EXTRA_FILE, META_FILE, WEIGHTS_FILE, load_saelens

FORMATS = ("circuit-tracer",)
EXPORT_RECORD = "actstore_export.json"
_OPTIONAL = (EXTRA_FILE, "metrics.json")


@dataclass
class Source:
    """One transcoder folder, read and checked."""

    url: str
    sae: SparseAutoencoder
    layer: int
    in_kind: str
    out_kind: str
    model: str | None
    store_sha: str | None
    store_url: str | None
    meta: dict[str, Any] = field(default_factory=dict)


def export_transcoders(dirs: list[str], out: str, format: str = "circuit-tracer", overwrite: bool = False,
                       scan: str | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write per-layer transcoders (folders or parents of folders, see the module docstring) to `out` in
    circuit-tracer's layout; returns a summary (out, n_layers, hooks, activation, notes).

    Raises ConfigError for folders that do not form one complete set, OutputError for an existing `out`
    without `overwrite`."""
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not supported; use one of {', '.join(FORMATS)}")
    clts = [u for u in dirs if _is_clt(u, storage_options)]
    if clts and len(dirs) > 1:
        raise ConfigError(f"{clts[0]} is a cross-layer transcoder: export it alone (one CLT covers every layer)")
    if clts:
        return export_clt(clts[0], out, overwrite, scan, storage_options)
    sources = [read_source(u, storage_options) for u in expand(dirs, storage_options)]
    model_type, n_layers = model_info(sources, storage_options)
    check_set(sources, model_type, n_layers)
    output = Output(out, storage_options)
    check_output(output, overwrite)
    return write(output, sources, model_type, scan or os.path.basename(str(out).rstrip("/")))


def _is_clt(url: str, storage_options: dict[str, Any] | None) -> bool:
    fs, root = storage.get_fs(url, storage_options)
    return bool(fs.exists(storage.join(root, CLT_CONFIG_FILE)))


def export_clt(url: str, out: str, overwrite: bool = False, scan: str | None = None,
               storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a saved cross-layer transcoder in circuit-tracer's `cross_layer_transcoder` layout (see
    `actstore.workers.sae.circuit_tracer`); returns a summary like `export_transcoders`."""
    clt, meta = load_clt(url, storage_options)
    info = meta.get("metadata", {})
    layers = [int(parse_hook(h).layer) for h in meta["hooks_in"]]
    in_kind = parse_hook(meta["hooks_in"][0]).kind
    model_type, n_layers = info.get("model_type"), info.get("n_layers")
    known = MODEL_TYPES.get(model_type or "")
    if known is not None and not known.causal:
        raise ConfigError(f"this CLT comes from a {model_type!r} store; circuit-tracer traces causal LMs")
    n = n_layers if n_layers is not None else layers[-1] + 1
    if layers != list(range(n)):
        raise ConfigError(f"{url} covers layers {layers[0]}..{layers[-1]}; circuit-tracer needs a CLT over every "
                          f"layer 0..{n - 1} of the model")
    output = Output(out, storage_options)
    check_output(output, overwrite)
    hook_in, hook_out = ct.hook_names(in_kind, "hook_mlp_out", family_of_type(model_type))
    config = {"model_kind": ct.CROSS_LAYER_TRANSCODER, "model_name": info.get("model_name"),
              "feature_input_hook": hook_in, "feature_output_hook": hook_out,
              "scan": scan or os.path.basename(str(out).rstrip("/"))}
    config = {k: v for k, v in config.items() if v is not None}
    prov = info.get("provenance") or {}
    record = {"format": "circuit-tracer", "actstore_version": version(), "model_type": model_type,
              "config": config, "source": url, "store_url": prov.get("store_url"),
              "store_manifest_sha256": prov.get("store_manifest_sha256"), "layers": layers}
    _clear(output, ("W_enc_*.safetensors", "W_dec_*.safetensors", "layer_*.safetensors"))
    for name, tensors in ct.clt_files(clt).items():
        output.put_bytes(name, safetensors_bytes(tensors, {"format": "pt"}))
    output.put_json(EXPORT_RECORD, record)
    output.put_bytes(ct.CONFIG_FILE, yaml.safe_dump(config, sort_keys=False).encode())
    note = ct.clt_activation_note(clt)
    return {"out": output.url, "n_layers": len(layers), "feature_input_hook": hook_in, "feature_output_hook": hook_out,
            "model_kind": ct.CROSS_LAYER_TRANSCODER, "notes": [note] if note else []}


def _clear(output: Output, patterns: tuple[str, ...]) -> None:
    """Remove config.yaml and the record first (a half-written export is never taken for a complete one), then
    stale tensor files of an earlier export."""
    fs = output.fs
    for name in (ct.CONFIG_FILE, EXPORT_RECORD):
        if fs.exists(output.path(name)):
            fs.rm(output.path(name))
    if fs.exists(output.root):
        for pattern in patterns:
            for stale in fs.glob(output.path(pattern)):
                fs.rm(stale)


def expand(dirs: list[str], storage_options: dict[str, Any] | None) -> list[str]:
    """Each transcoder folder as given, or the transcoder folders directly under a parent folder."""
    found: list[str] = []
    for url in dirs:
        fs, root = storage.get_fs(url, storage_options)
        if fs.exists(storage.join(root, META_FILE)):
            found.append(url)
            continue
        kids = sorted(p for p in (fs.ls(root, detail=False) if fs.isdir(root) else [])
                      if fs.exists(storage.join(p, META_FILE)))
        if not kids:
            raise ConfigError(f"{url} is not a transcoder folder (no {META_FILE}) and holds none; give the folders "
                              "that `actstore train transcoder --out` wrote")
        found += ["/".join([url.rstrip("/"), p.rstrip("/").rsplit("/", 1)[-1]]) for p in kids]
    return found


def read_source(url: str, storage_options: dict[str, Any] | None) -> Source:
    """Load one transcoder folder (local, or copied from an fsspec URL) with its hooks and provenance."""
    fs, root = storage.get_fs(url, storage_options)
    meta = json.loads(fs.cat_file(storage.join(root, META_FILE)))
    sae_cfg = meta.get("sae_config", {})
    if not sae_cfg.get("transcoder"):
        raise ConfigError(f"{url} holds an SAE of {meta.get('hook_name')}, not a transcoder; circuit-tracer needs "
                          "transcoders (train them with `actstore train transcoder`)")
    sae = _load(fs, root, storage_options)
    info = meta.get("metadata", {})
    hooks = info.get("hooks") or [meta.get("hook_name"), info.get("hook_name_out")]
    layer, in_kind, out_kind = _layer_of(url, hooks)
    prov = info.get("provenance") or {}
    return Source(url, sae, layer, in_kind, out_kind, info.get("model_name"), prov.get("store_manifest_sha256"),
                  prov.get("store_url"), info)


def _load(fs: Any, root: str, storage_options: dict[str, Any] | None) -> SparseAutoencoder:
    if storage.is_local(fs):
        return load_saelens(root)
    with tempfile.TemporaryDirectory(prefix="actstore-tc-") as tmp:
        for name in (CFG_FILE, WEIGHTS_FILE, META_FILE, *_OPTIONAL):
            path = storage.join(root, name)
            if name in (CFG_FILE, WEIGHTS_FILE, META_FILE) or fs.exists(path):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(fs.cat_file(path))
        return load_saelens(tmp)


def _layer_of(url: str, hooks: list[Any]) -> tuple[int, str, str]:
    """(layer, input kind, output kind) of a transcoder from blocks.{l}.X to blocks.{l}.Y."""
    try:
        spec_in, spec_out = parse_hook(str(hooks[0])), parse_hook(str(hooks[1]))
    except (HookNameError, IndexError):
        raise ConfigError(f"{url}: its hooks {hooks} are not a canonical blocks.{{l}}.<kind> pair") from None
    if spec_in.is_module or spec_out.is_module or spec_in.layer != spec_out.layer:
        raise ConfigError(f"{url} maps {spec_in.name} -> {spec_out.name}; circuit-tracer's per-layer transcoders "
                          "map blocks.{l}.hook_mlp_in (or hook_resid_mid) to blocks.{l}.hook_mlp_out of the same l")
    ct.hook_names(spec_in.kind, spec_out.kind, None)  # refuses kinds circuit-tracer cannot use
    return int(spec_in.layer), spec_in.kind, spec_out.kind


def model_info(sources: list[Source], storage_options: dict[str, Any] | None) -> tuple[str | None, int | None]:
    """(model_type, n_layers) from the transcoders' metadata, else from their store's manifest, else unknown."""
    for s in sources:
        if s.meta.get("model_type"):
            return s.meta["model_type"], s.meta.get("n_layers")
    for s in sources:
        if not s.store_url:
            continue
        try:
            from actstore.pipeline.store.store import open_store

            model = open_store(s.store_url, storage_options).manifest.model
        except Exception:  # the store may be gone or need other credentials: the export works without it
            continue
        if model is not None:
            return model.model_type, model.n_layers
    return None, None


def check_set(sources: list[Source], model_type: str | None, n_layers: int | None) -> None:
    """Refuse anything that is not one transcoder per layer of one model and store, all alike."""
    _same(sources, lambda s: s.model, "models")
    _same(sources, lambda s: s.store_sha, "stores (different store manifests)")
    _same(sources, lambda s: (s.in_kind, s.out_kind), "hooks")
    _same(sources, lambda s: s.sae.cfg.d_sae, "widths (d_transcoder)")
    _same(sources, lambda s: s.sae.cfg.d_in, "input widths (d_model)")
    _same(sources, lambda s: ct.activation_of(s.sae), "activations")
    _same(sources, lambda s: s.sae.cfg.skip, "skip connections (all or none need W_skip)")
    known = MODEL_TYPES.get(model_type or "")
    if known is not None and not known.causal:
        raise ConfigError(f"these transcoders come from a {model_type!r} store; circuit-tracer traces causal LMs")
    by_layer: dict[int, str] = {}
    for s in sources:
        if s.layer in by_layer:
            raise ConfigError(f"two transcoders for layer {s.layer}: {by_layer[s.layer]} and {s.url}; pass one "
                              "folder per layer")
        by_layer[s.layer] = s.url
    n = n_layers if n_layers is not None else max(by_layer) + 1
    if max(by_layer) >= n:
        raise ConfigError(f"layer {max(by_layer)} is out of range: the model has {n} layers ({by_layer[max(by_layer)]})")
    missing = [i for i in range(n) if i not in by_layer]
    if missing:
        what = f"layer {missing[0]} is" if len(missing) == 1 else f"layers {_ranges(missing)} are"
        raise ConfigError(f"{what} missing: circuit-tracer needs one transcoder per layer 0..{n - 1} of the model")


def _same(sources: list[Source], key: Any, what: str) -> None:
    seen: dict[Any, str] = {}
    for s in sources:
        value = key(s)
        if value is not None and str(value) not in seen:
            seen[str(value)] = s.url
    if len(seen) > 1:
        (a, ua), (b, ub) = list(seen.items())[:2]
        raise ConfigError(f"the transcoders mix {what}: {a} ({ua}) and {b} ({ub}); export one set at a time")


def _ranges(layers: list[int]) -> str:
    return ", ".join(str(i) for i in layers[:10]) + (f" and {len(layers) - 10} more" if len(layers) > 10 else "")


def check_output(output: Output, overwrite: bool) -> None:
    """An existing output folder is replaced only with overwrite (and then only the files an export writes)."""
    fs, root = output.fs, output.root
    if not fs.exists(root):
        return
    if not fs.isdir(root):
        raise OutputError(f"output {output.url} is a file; give a new folder")
    if fs.ls(root, detail=False) and not overwrite:
        raise OutputError(f"output {output.url} already exists; pass --overwrite (overwrite=True) to replace it")


def write(output: Output, sources: list[Source], model_type: str | None, scan: str) -> dict[str, Any]:
    """Layer files, the provenance record, then config.yaml (removed first, so a half-written export is
    never mistaken for a complete one)."""
    _clear(output, ("layer_*.safetensors", "W_enc_*.safetensors", "W_dec_*.safetensors"))
    ordered = sorted(sources, key=lambda s: s.layer)
    for s in ordered:
        output.put_bytes(ct.layer_file(s.layer), safetensors_bytes(ct.layer_tensors(s.sae), {"format": "pt"}))
    first = ordered[0]
    hook_in, hook_out = ct.hook_names(first.in_kind, first.out_kind, family_of_type(model_type))
    config: dict[str, Any] = {"model_kind": ct.TRANSCODER_SET, "model_name": first.model,
                              "feature_input_hook": hook_in, "feature_output_hook": hook_out, "scan": scan,
                              **ct.activation_of(first.sae)}
    config = {k: v for k, v in config.items() if v is not None}
    record = {"format": "circuit-tracer", "actstore_version": version(), "model_type": model_type,
              "config": config, "layers": [{"layer": s.layer, "source": s.url, "store_url": s.store_url,
                                            "store_manifest_sha256": s.store_sha} for s in ordered]}
    output.put_json(EXPORT_RECORD, record)
    output.put_bytes(ct.CONFIG_FILE, yaml.safe_dump(config, sort_keys=False).encode())
    return {"out": output.url, "n_layers": len(ordered), "feature_input_hook": hook_in,
            "feature_output_hook": hook_out, **ct.activation_of(first.sae), "notes": _notes(config)}


def _notes(config: dict[str, Any]) -> list[str]:
    if config.get("activation") != "topk":
        return []
    return ["TopK transcoders: circuit-tracer applies `activation: topk` only where its loader reads it (loading "
            "from the Hugging Face Hub, after release 0.5.0); loaded from a local path they act as ReLU"]
