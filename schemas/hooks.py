"""Hook-name grammar: parse and validate canonical (TransformerLens-style) hook names.

This module only knows the *syntax* of hook names; which names exist for a given model (layer range,
family-specific kinds) is decided by `actstore.workers.hookmap` once the model config is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from actstore.schemas.errors import HookNameError  # noqa: F401  (defined with its siblings; raised here)

# Kinds of per-block hook, in the order they fire inside a block.
BLOCK_KINDS: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in BLOCK_KINDS) + r")$")
# A dotted Python attribute path with optional integer indices: transformer.h.3.mlp.c_fc
_MODULE_RE = re.compile(r"^module:([A-Za-z_][A-Za-z0-9_]*|\d+)(\.([A-Za-z_][A-Za-z0-9_]*|\d+))*$")


@dataclass(frozen=True)
class HookSpec:
    """A parsed hook name: either a canonical block hook or a raw `module:<path>` hook."""

    name: str
    layer: int | None  # block index for canonical hooks; None for module hooks
    kind: str | None  # one of BLOCK_KINDS; None for module hooks
    module_path: str | None  # dotted path for module hooks

    @property
    def is_module(self) -> bool:
        return self.module_path is not None


def parse_hook(name: str) -> HookSpec:
    """Parse one hook name, raising HookNameError with the accepted forms on failure."""
    if not isinstance(name, str):
        raise HookNameError(f"hook name must be a string, got {type(name).__name__}")
    m = _BLOCK_RE.match(name)
    if m:
        return HookSpec(name=name, layer=int(m.group(1)), kind=m.group(2), module_path=None)
    if name.startswith("module:"):
        if _MODULE_RE.match(name):
            return HookSpec(name=name, layer=None, kind=None, module_path=name[len("module:"):])
        raise HookNameError(
            f"invalid module hook {name!r}: use module:<dotted.path> with identifiers and integer indices only "
            "(no '/', '..' or spaces)"
        )
    raise HookNameError(
        f"unknown hook name {name!r}: expected blocks.<i>.<kind> with kind in "
        f"{', '.join(BLOCK_KINDS)}, or module:<dotted.path>"
    )


def parse_hooks(names: list[str]) -> list[HookSpec]:
    """Parse a list of hook names, rejecting duplicates."""
    specs = [parse_hook(n) for n in names]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise HookNameError(f"hook {s.name!r} is listed twice in hooks")
        seen.add(s.name)
    return specs
