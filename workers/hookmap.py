"""Map canonical hook names (TransformerLens-style) to concrete modules of Hugging Face models, per model family.

Each hook point is a (module path relative to the block, "in" | "out") pair: "in" captures the first
positional input of that module (a forward pre-hook), "out" its first output tensor (a forward hook).

What each name means in each family lives in `actstore.workers.families`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from actstore.schemas.hooks import BLOCK_KINDS, HookNameError, HookSpec
from actstore.workers.families import family_for, n_layers_of


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
        return f"only module:<dotted.path> hooks, e.g. {module_paths_text(config)}"
    lines = [f"blocks.0..{n - 1}.{k}" for k in available_kinds(config)]
    return "; ".join(lines) + "; or module:<dotted.path>"


def module_paths(config: Any, limit: int = 12) -> tuple[str, int, list[str]] | None:
    """(block list path, number of blocks, paths inside block 0) of the model a config describes, or None.

    The model is built on the meta device (no weights, no memory), so this works from the config alone."""
    import torch
    from transformers import AutoModel

    try:
        from actstore.workers.model_build import build_model

        with torch.device("meta"):
            model = build_model(AutoModel.from_config, config)
    except Exception:  # remote code, composite configs, ...: the caller falls back to generic advice
        return None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            inner = [f"{path}.0.{name}" for name, _ in mod[0].named_modules() if name and name.count(".") < 2]
            return path, len(mod), inner[:limit]
    return None


def module_paths_text(config: Any) -> str:
    """Real module: paths of this model for error messages (block outputs and block 0's submodules)."""
    found = module_paths(config)
    if found is None:
        return "module:<path> with a path from print(AutoModel.from_pretrained(MODEL))"
    blocks, n, inner = found
    return (f"module:{blocks}.0 .. module:{blocks}.{n - 1} (block outputs); inside a block: "
            + ", ".join(f"module:{p}" for p in inner))


def check_hooks(specs: list[HookSpec], config: Any) -> None:
    """Fail before any forward pass when a canonical hook does not exist for this model."""
    fam, n = family_for(config), n_layers_of(config)
    mt = getattr(config, "model_type", "?")
    for s in specs:
        if s.is_module:
            continue
        if fam is None or n is None:
            raise HookNameError(
                f"model type {mt!r} has no canonical hook map, so {s.name!r} cannot be resolved; use "
                f"module:<dotted.path> hooks (a module's output) instead: {module_paths_text(config)}"
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
