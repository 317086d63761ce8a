"""Save and load SAEs in SAELens' on-disk format (cfg.json + sae_weights.safetensors), plus our own metadata.

A directory written by `save_saelens` holds:

- cfg.json: SAELens config field names. Top-level legacy (pre-6.0) fields such as hook_name, hook_layer,
  model_name, context_size, activation_fn_str, plus a `metadata` dict with the same run information; no
  `sae_lens_version` is written, so SAELens runs its legacy-config converter, which accepts exactly these
  fields. Architectures map as: topk -> "topk" (k), relu -> "standard", jumprelu -> "jumprelu", batchtopk ->
  "jumprelu" with its global inference threshold on every latent (what SAELens itself does for BatchTopK).
  Transcoders use "transcoder" / "skip_transcoder" / "jumprelu_transcoder" / "jumprelu_skip_transcoder";
  a TopK transcoder has no SAELens counterpart and is written as "topk_transcoder" (loads here only).
- sae_weights.safetensors: W_enc (d_in, d_sae), W_dec (d_sae, d_out), b_enc, b_dec, threshold (JumpReLU
  forms) and W_skip in SAELens' (d_out, d_in) orientation.
- actstore_state.safetensors: tensors SAELens has no name for (jumprelu's exact log-threshold, batchtopk's
  running-threshold counters), so that `load_saelens` reproduces the module bit for bit.
- actstore.json: our full SAEConfig and the caller's metadata (training config, metrics, store URL, ...).

`load_saelens` reads our directories exactly, and plain SAELens directories of the architectures above.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from actstore.schemas.errors import ConfigError
from actstore.workers.sae.model import SAEConfig, SparseAutoencoder

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
EXTRA_FILE, META_FILE = "actstore_state.safetensors", "actstore.json"
FORMAT_VERSION = 1
# Run information SAELens keeps (top level in legacy configs, `metadata` in 6.x); taken from extra_metadata.
SAELENS_META_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "dataset_path",
                     "prepend_bos", "model_from_pretrained_kwargs", "dataset_trust_remote_code",
                     "sae_lens_training_version", "neuronpedia_id", "hook_name_out", "hook_layer_out",
                     "hook_head_index_out")
_SAELENS_TO_ARCH = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "transcoder": "relu",
                    "skip_transcoder": "relu", "jumprelu_transcoder": "jumprelu",
                    "jumprelu_skip_transcoder": "jumprelu", "topk_transcoder": "topk"}


def saelens_architecture(sae: SparseAutoencoder) -> str:
    """SAELens' architecture name for this module (see the module docstring)."""
    cfg = sae.cfg
    threshold_form = cfg.architecture == "jumprelu" or sae.threshold is not None
    if not cfg.transcoder:
        return {"relu": "standard"}.get(cfg.architecture, "jumprelu" if threshold_form else "topk")
    if cfg.architecture == "relu":
        return "skip_transcoder" if cfg.skip else "transcoder"
    if threshold_form:
        return "jumprelu_skip_transcoder" if cfg.skip else "jumprelu_transcoder"
    return "topk_transcoder"


def hook_layer(hook_name: str) -> int | None:
    """Layer index of a TransformerLens-style hook name ('blocks.3.hook_resid_post' -> 3)."""
    match = re.match(r"blocks\.(\d+)\.", hook_name or "")
    return int(match.group(1)) if match else None


def save_saelens(sae: SparseAutoencoder, directory: str | os.PathLike, hook_name: str,
                 d_in: int | None = None, extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` (operating on raw activations) as a SAELens-loadable directory; returns its path.

    SAELens fields such as model_name, context_size, dataset_path, hook_name_out are taken from
    `extra_metadata`; everything in it also goes to actstore.json."""
    if d_in is not None and d_in != sae.cfg.d_in:
        raise ConfigError(f"save_saelens: d_in={d_in} but the SAE reads d_in={sae.cfg.d_in}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(extra_metadata or {})
    weights, extra = _split_state(sae)
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if extra:
        save_file(extra, str(out / EXTRA_FILE), metadata={"format": "pt"})
    cfg_json = _saelens_cfg(sae, hook_name, meta)
    (out / CFG_FILE).write_text(json.dumps(cfg_json, indent=2))
    ours = {"format": "actstore.sae", "format_version": FORMAT_VERSION, "sae_config": asdict(sae.cfg),
            "hook_name": hook_name, "saelens_architecture": cfg_json["architecture"], "metadata": meta}
    (out / META_FILE).write_text(json.dumps(ours, indent=2, default=str))
    return out


def _split_state(sae: SparseAutoencoder) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(SAELens-named weights, tensors only we use), all contiguous CPU copies."""
    def cpu(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float32).contiguous().clone()

    weights = {name: cpu(getattr(sae, name)) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    extra: dict[str, Tensor] = {}
    if sae.cfg.skip:
        weights["W_skip"] = cpu(sae.W_skip.T)
    if sae.threshold is not None:
        weights["threshold"] = cpu(sae.threshold)
    for name, tensor in sae.state_dict().items():
        if name not in weights and name != "W_skip":
            extra[name] = cpu(tensor)
    return weights, extra


def _saelens_cfg(sae: SparseAutoencoder, hook_name: str, meta: dict[str, Any]) -> dict[str, Any]:
    cfg = sae.cfg
    arch = saelens_architecture(sae)
    run = {"model_name": None, "hook_name": hook_name, "hook_layer": hook_layer(hook_name),
           "hook_head_index": None, "context_size": None, "dataset_path": None, "prepend_bos": True,
           "model_from_pretrained_kwargs": {}, "dataset_trust_remote_code": False,
           "sae_lens_training_version": None, "neuronpedia_id": None}
    run.update({k: meta[k] for k in SAELENS_META_KEYS if k in meta})
    out: dict[str, Any] = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": not cfg.transcoder, "normalize_activations": "none",
        "reshape_activations": "none", "finetuning_scaling_factor": False,
        "activation_fn_str": "topk" if arch in ("topk", "topk_transcoder") else "relu",
        "activation_fn_kwargs": {}, **run}
    if arch in ("topk", "topk_transcoder"):
        out["k"] = cfg.k
        out["activation_fn_kwargs"] = {"k": cfg.k}
    if cfg.transcoder:
        out["d_out"] = cfg.d_target
        out.setdefault("hook_name_out", "")
        out.setdefault("hook_layer_out", hook_layer(out["hook_name_out"]))
        out.setdefault("hook_head_index_out", None)
    out["metadata"] = {k: out[k] for k in SAELENS_META_KEYS if k in out}
    return out


def load_saelens(directory: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load a directory written by `save_saelens` (exactly) or a SAELens one (supported architectures)."""
    src = Path(directory)
    weights = load_file(str(src / WEIGHTS_FILE), device="cpu")
    if (src / META_FILE).exists():
        sae = SparseAutoencoder(SAEConfig(**json.loads((src / META_FILE).read_text())["sae_config"]))
        extra = load_file(str(src / EXTRA_FILE), device="cpu") if (src / EXTRA_FILE).exists() else {}
        _load_ours(sae, weights, extra)
    else:
        sae = _load_foreign(json.loads((src / CFG_FILE).read_text()), weights)
    return sae.to(device).eval()


def _load_ours(sae: SparseAutoencoder, weights: dict[str, Tensor], extra: dict[str, Tensor]) -> None:
    state = {k: v for k, v in weights.items() if k != "threshold"}
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"].T.contiguous()
    state.update(extra)
    sae.load_state_dict(state)


def _load_foreign(cfg: dict[str, Any], weights: dict[str, Tensor]) -> SparseAutoencoder:
    """Build our module from a SAELens config; b_dec applied to the input or not is folded into b_enc."""
    arch_name = cfg.get("architecture", "standard")
    if arch_name not in _SAELENS_TO_ARCH:
        raise ConfigError(f"load_saelens: architecture {arch_name!r} is not supported")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise ConfigError("load_saelens: SAEs with run-time activation normalisation are not supported")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    if d_sae % d_in:
        raise ConfigError(f"load_saelens: d_sae={d_sae} is not a multiple of d_in={d_in}")
    transcoder = "transcoder" in arch_name
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 1
    sae_cfg = SAEConfig(d_in=d_in, architecture=_SAELENS_TO_ARCH[arch_name], expansion=d_sae // d_in, k=int(k),
                        transcoder=transcoder, skip="skip" in arch_name,
                        d_out=int(cfg.get("d_out", d_in)) if transcoder else None, normalize_decoder=False)
    sae = SparseAutoencoder(sae_cfg)
    state = {n: weights[n].float() for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if sae_cfg.skip:
        state["W_skip"] = weights["W_skip"].float().T.contiguous()
    if sae_cfg.architecture == "jumprelu":
        state["log_threshold"] = weights["threshold"].float().log()
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        # Our SAEs always encode (x - b_dec); compensate so the pre-activations are unchanged.
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
    sae.load_state_dict(state)
    return sae
