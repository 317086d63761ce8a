"""Transcoders in circuit-tracer's on-disk layout (the tensors and config keys its loaders read).

circuit-tracer (decoderesearch/circuit-tracer, formerly safety-research) builds attribution graphs from a set of
per-layer transcoders (`model_kind: transcoder_set`) or one cross-layer transcoder (`cross_layer_transcoder`).
A per-layer set is a folder with `config.yaml` and one `layer_{i}.safetensors` per layer i = 0..n-1 holding

    W_enc (d_transcoder, d_model)   b_enc (d_transcoder)   W_dec (d_transcoder, d_model)   b_dec (d_model)
    [W_skip (d_model, d_model)]     [activation_function.threshold (d_transcoder)]

and its `SingleLayerTranscoder` computes f = act(x @ W_enc.T + b_enc), y = f @ W_dec + b_dec [+ x @ W_skip.T].
The activation is a JumpReLU when the file holds a threshold, else ReLU, unless config.yaml names one
(`activation: topk` with `k`, honoured by loaders after release 0.5.0 when they load from the Hub).

Our transcoders (`SparseAutoencoder` with cfg.transcoder) use the same maths with W_enc (d_in, d_sae) and
W_skip (d_in, d_out), so the conversion transposes those two. Activations map as: relu -> ReLU; jumprelu ->
JumpReLU with its thresholds; batchtopk (inference rule: one global threshold) -> JumpReLU with that threshold
on every latent (exact); topk -> `activation: topk` (circuit-tracer keeps the k largest pre-activations without
a ReLU, ours applies one: they agree whenever a token's k-th largest pre-activation is positive).

A cross-layer transcoder (`model_kind: cross_layer_transcoder`, read by circuit-tracer's `load_clt`) is a folder
with config.yaml and, per layer l,

    W_enc_{l}.safetensors: W_enc_{l} (d_transcoder, d_model), b_enc_{l} (d_transcoder), b_dec_{l} (d_model),
                           [threshold_{l} (d_transcoder)]
    W_dec_{l}.safetensors: W_dec_{l} (d_transcoder, n_layers - l, d_model)

(checked against circuit_tracer/transcoder/cross_layer_transcoder.py, release 0.5.0). Its loader infers n_layers
from the number of W_enc files and the activation from the threshold: JumpReLU with threshold_{l}, else ReLU; it
has no TopK. `clt_tensors` converts our `CrossLayerTranscoder` (W_enc (L, d_model, d_sae), so each layer's
encoder is transposed; W_dec[l] already has circuit-tracer's shape): relu -> ReLU; jumprelu -> its thresholds;
batchtopk -> its per-layer inference threshold on every feature of the layer (exact); topk -> ReLU (agrees
only where a token has at most k positive pre-activations per layer: the export notes it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from actstore.schemas.errors import ConfigError
from actstore.workers.families import Family
from actstore.workers.sae.clt import CrossLayerTranscoder
from actstore.workers.sae.model import SparseAutoencoder

TRANSCODER_SET = "transcoder_set"
CROSS_LAYER_TRANSCODER = "cross_layer_transcoder"
CONFIG_FILE = "config.yaml"
# actstore hook kind -> circuit-tracer (TransformerLens) hook name, without the `blocks.{l}.` prefix
INPUT_HOOKS = {"hook_mlp_in": "mlp.hook_in", "hook_resid_mid": "hook_resid_mid"}
OUTPUT_KINDS = ("hook_mlp_out",)


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def activation_of(sae: SparseAutoencoder) -> dict[str, Any]:
    """config.yaml's activation keys for this transcoder: {activation: relu | jump_relu | topk[, k]}."""
    if sae.cfg.architecture == "relu":
        return {"activation": "relu"}
    if sae.threshold is not None:  # jumprelu, and batchtopk's inference threshold
        return {"activation": "jump_relu"}
    return {"activation": "topk", "k": int(sae.cfg.k)}


def layer_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """One `layer_{i}.safetensors` worth of tensors, float32, contiguous, on the CPU."""
    if not sae.cfg.transcoder:
        raise ConfigError("circuit-tracer needs transcoders (MLP input -> MLP output), not SAEs")
    if sae.cfg.d_in != sae.cfg.d_target:
        raise ConfigError(f"circuit-tracer transcoders read and write d_model: this one maps {sae.cfg.d_in} -> "
                          f"{sae.cfg.d_target}")

    def cpu(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float32).contiguous().clone()

    out = {"W_enc": cpu(sae.W_enc.T), "W_dec": cpu(sae.W_dec), "b_enc": cpu(sae.b_enc), "b_dec": cpu(sae.b_dec)}
    if sae.cfg.skip:
        out["W_skip"] = cpu(sae.W_skip.T)
    if sae.threshold is not None:
        out["activation_function.threshold"] = cpu(sae.threshold)
    return out


def hook_names(in_kind: str, out_kind: str, family: Family | None) -> tuple[str, str]:
    """(feature_input_hook, feature_output_hook) for transcoders from `in_kind` to `out_kind`.

    The MLP output is `mlp.hook_out` (circuit-tracer's wrapper around the MLP) where the MLP's output is what the
    block adds to the stream, and TransformerLens' `hook_mlp_out` where a norm follows the MLP (Gemma 2/3,
    OLMo 2) or the family is unknown; circuit-tracer's per-architecture maps name these."""
    if in_kind not in INPUT_HOOKS or out_kind not in OUTPUT_KINDS:
        raise ConfigError(f"circuit-tracer transcoders replace MLPs: they read one of "
                          f"{', '.join(INPUT_HOOKS)} and write hook_mlp_out, not {in_kind} -> {out_kind}")
    plain_mlp = family is not None and family.points.get("hook_mlp_out") == ("mlp", "out")
    return INPUT_HOOKS[in_kind], "mlp.hook_out" if plain_mlp else "hook_mlp_out"



def clt_files(clt: CrossLayerTranscoder) -> dict[str, dict[str, Tensor]]:
    """{file name: tensors} of a cross-layer transcoder in circuit-tracer's layout, float32, on the CPU."""
    def cpu(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float32).contiguous().clone()

    threshold = clt.threshold
    files: dict[str, dict[str, Tensor]] = {}
    for layer in range(clt.cfg.n_layers):
        enc = {f"W_enc_{layer}": cpu(clt.W_enc[layer].T), f"b_enc_{layer}": cpu(clt.b_enc[layer]),
               f"b_dec_{layer}": cpu(clt.b_dec[layer])}
        if threshold is not None:
            enc[f"threshold_{layer}"] = cpu(threshold[layer])
        files[f"W_enc_{layer}.safetensors"] = enc
        files[f"W_dec_{layer}.safetensors"] = {f"W_dec_{layer}": cpu(clt.W_dec[layer])}
    return files


def clt_activation_note(clt: CrossLayerTranscoder) -> str | None:
    """Why circuit-tracer's activation differs from ours for this CLT, or None when they agree exactly."""
    if clt.cfg.architecture == "topk" or clt.threshold is None and clt.cfg.architecture != "relu":
        return ("TopK cross-layer transcoder: circuit-tracer's CLT loader has no TopK and applies a ReLU, which "
                "agrees only where a token has at most k positive pre-activations in a layer")
    return None
