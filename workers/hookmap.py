"""Map canonical hook names (design §4) to concrete modules of Hugging Face models, per model family.

Each hook point is a (module path relative to the block, "in" | "out") pair: "in" captures the first
positional input of that module (a forward pre-hook), "out" its first output tensor (a forward hook).

Post-LN BERT/MiniLM semantics (documented in the README): resid_pre is the block input (already layer-normed),
attn_out is the attention projection before the residual add and LayerNorm, resid_mid = mlp_in is the normed
stream entering the MLP, mlp.hook_post the GELU output, mlp_out the MLP projection before the residual add and
LayerNorm, and resid_post the block output (after its LayerNorm; BERT has no final norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from actstore.schemas.hooks import BLOCK_KINDS, HookNameError, HookSpec

Point = tuple[str, str]  # (module path relative to the block, "in" | "out")


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and what each canonical hook means there."""

    name: str
    blocks: str  # path of the block list, relative to the base model
    final_norm: str | None
    points: dict[str, Point] = field(default_factory=dict)


def _pre_ln(attn: str, mlp: str, ln_mlp: str, post: Point) -> dict[str, Point]:
    return {
        "hook_resid_pre": ("", "in"),
        "hook_attn_out": (attn, "out"),
        "hook_resid_mid": (ln_mlp, "in"),
        "hook_mlp_in": (mlp, "in"),
        "mlp.hook_post": post,
        "hook_mlp_out": (mlp, "out"),
        "hook_resid_post": ("", "out"),
    }


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "h", "ln_f", _pre_ln("attn", "mlp", "ln_2", ("mlp.act", "out"))),
    "gpt_neox": Family(
        "gpt_neox", "layers", "final_layer_norm",
        _pre_ln("attention", "mlp", "post_attention_layernorm", ("mlp.act", "out")),
    ),
    # Llama-style gated MLP: hook_post is act(gate) * up, the input of down_proj (as in TransformerLens).
    "llama": Family(
        "llama", "layers", "norm", _pre_ln("self_attn", "mlp", "post_attention_layernorm", ("mlp.down_proj", "in"))
    ),
    "bert": Family(
        "bert", "encoder.layer", None,
        {
            "hook_resid_pre": ("", "in"),
            "hook_attn_out": ("attention.output.dense", "out"),
            "hook_resid_mid": ("attention", "out"),
            "hook_mlp_in": ("intermediate", "in"),
            "mlp.hook_post": ("intermediate", "out"),
            "hook_mlp_out": ("output.dense", "out"),
            "hook_resid_post": ("", "out"),
        },
    ),
}
# model_type -> family for architectures that share a layout
ALIASES = {
    "gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "qwen3": "llama", "bert": "bert", "roberta": "bert", "xlm-roberta": "bert",
}


class UnsupportedModelError(ValueError):
    """The model's architecture has no canonical hook map."""


def family_for(config: Any) -> Family | None:
    """The family of a transformers config, or None when only module: hooks can be used."""
    name = ALIASES.get(getattr(config, "model_type", ""))
    return FAMILIES[name] if name else None


def n_layers_of(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return None


def available_kinds(config: Any) -> list[str]:
    """Canonical kinds that exist for this model (parallel-residual NeoX has no resid_mid)."""
    kinds = list(BLOCK_KINDS)
    if getattr(config, "model_type", "") == "gpt_neox" and getattr(config, "use_parallel_residual", False):
        kinds.remove("hook_resid_mid")
    return kinds


def valid_names_text(config: Any) -> str:
    """Valid hook names for a model, one line per kind (for error messages)."""
    n = n_layers_of(config)
    if family_for(config) is None or n is None:
        return "only module:<dotted.path> hooks (list paths with `actstore inspect-model MODEL`)"
    lines = [f"blocks.0..{n - 1}.{k}" for k in available_kinds(config)]
    return "; ".join(lines) + "; or module:<dotted.path>"


def check_hooks(specs: list[HookSpec], config: Any) -> None:
    """Fail before any forward pass when a canonical hook does not exist for this model."""
    fam, n = family_for(config), n_layers_of(config)
    mt = getattr(config, "model_type", "?")
    for s in specs:
        if s.is_module:
            continue
        if fam is None or n is None:
            raise HookNameError(
                f"model type {mt!r} has no canonical hook map, so {s.name!r} cannot be resolved; "
                f"use module:<dotted.path> hooks instead (e.g. module:layers.0)"
            )
        if s.layer >= n or s.kind not in available_kinds(config):
            why = f"layer {s.layer} is out of range (model has {n} layers)" if s.layer >= n else "not available"
            raise HookNameError(f"hook {s.name!r}: {why}; valid names: {valid_names_text(config)}")


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path (integer parts index into ModuleLists)."""
    mod = root
    for part in path.split(".") if path else []:
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def resolve_module_hook(model: nn.Module, path: str) -> nn.Module:
    """Resolve module:<path> on the base model, also accepting paths printed from a *ForCausalLM wrapper."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [path]
    if prefix and path.startswith(prefix + "."):
        candidates.append(path[len(prefix) + 1:])
    for cand in candidates:
        try:
            return get_module(model, cand)
        except (AttributeError, IndexError, ValueError):
            continue
    raise HookNameError(f"module:{path} does not name a submodule of {type(model).__name__}")


def resolve(model: nn.Module, spec: HookSpec) -> tuple[nn.Module, str, int | None]:
    """(module, "in"|"out", block index it lives in or None) for one hook."""
    if spec.is_module:
        return resolve_module_hook(model, spec.module_path), "out", _block_of_path(model, spec.module_path)
    fam = family_for(model.config)
    rel, where = fam.points[spec.kind]
    block = get_module(model, fam.blocks)[spec.layer]
    return get_module(block, rel), where, spec.layer


def blocks_of(model: nn.Module) -> nn.ModuleList | None:
    fam = family_for(model.config)
    return get_module(model, fam.blocks) if fam else None


def _block_of_path(model: nn.Module, path: str) -> int | None:
    """Block index a module path lies inside (for early exit), or None if outside the block list."""
    fam = family_for(model.config)
    if fam is None:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    path = path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else path
    head = fam.blocks + "."
    if path.startswith(head):
        idx = path[len(head):].split(".")[0]
        return int(idx) if idx.isdigit() else None
    return None
