"""CE-loss and KL scores: splice an SAE's reconstruction (or a transcoder's prediction) into the forward pass.

For held-out sequences of the store, the causal LM named in the manifest (or a given path) is run three ways:
clean, with the hook point replaced by the reconstruction, and with it zero-ablated. ce_loss_score =
(L_zero - L_recon) / (L_zero - L_clean) and kl_score = 1 - KL_recon / KL_zero, so a perfect reconstruction
scores 1.0 and zero-ablation 0.0. Transcoders replace the MLP module's output with their prediction from the
MLP input; several hooks can be replaced in one forward pass (a cross-layer transcoder replaces every layer's
MLP output at once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actstore.schemas.errors import HookNameError
from actstore.schemas.hooks import parse_hook
from actstore.workers import hookmap
from actstore.workers.sae.metrics import ce_kl_scores

Replace = Callable[[torch.Tensor], torch.Tensor]


def _replace_out(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return fn(out)
        return (fn(out[0]), *out[1:])
    return hook


def _replace_in(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


def _losses(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token CE, log-probs) of a batch of equal-length sequences."""
    logits = model(input_ids=ids, use_cache=False).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean()
    return ce, logp


def splice_scores(model: nn.Module, sequences: list[np.ndarray], hook: str | list[str],
                  replace: Replace | list[Replace], transcoder_in: str | list[str] | None = None) -> dict[str, float]:
    """Clean / spliced / zero-ablated losses over `sequences` (each run alone: no padding effects).

    One hook, or several replaced in the same forward pass (`hook` a list, `replace` one function per hook,
    `transcoder_in` one input hook per hook): a cross-layer transcoder replaces every layer's MLP output at once,
    each from the MLP input of the spliced run itself. Zero-ablation zeroes every hook of the list."""
    hooks = [hook] if isinstance(hook, str) else list(hook)
    fns = list(replace) if isinstance(replace, (list, tuple)) else [replace]
    ins = [transcoder_in] if isinstance(transcoder_in, str) else transcoder_in
    if len(fns) != len(hooks) or (ins is not None and len(ins) != len(hooks)):
        raise ValueError(f"splice_scores: {len(hooks)} hooks need as many replace functions (got {len(fns)}) "
                         f"and input hooks (got {None if ins is None else len(ins)})")
    base = model.base_model
    targets = _resolved(base, hooks)
    inputs = _resolved(base, ins) if ins is not None else []
    captured: dict[int, torch.Tensor] = {}
    spliced = [_spliced_fn(fn, i, captured if ins is not None else None) for i, fn in enumerate(fns)]
    sums = {"clean": 0.0, "recon": 0.0, "zero": 0.0, "kl_recon": 0.0, "kl_zero": 0.0}
    grabs: list[Any] = []
    try:  # every hook registered here is removed again, whatever fails
        for i, (module, where) in enumerate(inputs):
            grabs.append(_capture(module, where, i, captured))
        with torch.no_grad():
            for seq in sequences:
                ids = torch.as_tensor(seq, dtype=torch.long)[None]
                clean, lp_clean = _losses(model, ids)
                recon, lp_recon = _spliced(model, targets, ids, spliced)
                zero, lp_zero = _spliced(model, targets, ids, [torch.zeros_like] * len(targets))
                sums["clean"] += float(clean)
                sums["recon"] += float(recon)
                sums["zero"] += float(zero)
                sums["kl_recon"] += float(_kl(lp_clean, lp_recon))
                sums["kl_zero"] += float(_kl(lp_clean, lp_zero))
    finally:
        for g in grabs:
            g.remove()
    n = max(len(sequences), 1)
    m = {k: v / n for k, v in sums.items()}
    return ce_kl_scores(m["clean"], m["recon"], m["zero"], m["kl_recon"], m["kl_zero"])


def _resolved(base: Any, hooks: list[str]) -> list[tuple[nn.Module, str]]:
    """(module, "in"|"out") of each hook, all resolved before any is registered; a hook the model lacks (a model
    other than the store's, with fewer layers) is one HookNameError."""
    try:
        return [tuple(hookmap.resolve(base, parse_hook(h))[:2]) for h in hooks]  # type: ignore[misc]
    except (IndexError, AttributeError, KeyError) as e:
        raise HookNameError(f"splice: the model has no module for one of {', '.join(hooks)} ({e}); score with "
                            "the model the store was extracted from") from None


def _capture(module: nn.Module, where: str, i: int, captured: dict[int, torch.Tensor]) -> Any:
    """Record the input hook's tensor (at `module`, "in" or "out") of the running forward pass as captured[i];
    returns the handle."""
    if where == "in":
        return module.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__(i, a[0] if a else kw["hidden_states"]), with_kwargs=True)
    return module.register_forward_hook(
        lambda m, a, o: captured.__setitem__(i, o if isinstance(o, torch.Tensor) else o[0]))


def _spliced_fn(fn: Replace, i: int, captured: dict[int, torch.Tensor] | None) -> Replace:
    """The replacement of hook i: fn of its captured input (transcoders) or of the hook's own tensor."""
    if captured is not None:
        return lambda t: fn(captured[i]).to(t.dtype)
    return lambda t: fn(t).to(t.dtype)


def _spliced(model: nn.Module, targets: list[tuple[nn.Module, str]], ids: torch.Tensor,
             fns: list[Replace]) -> tuple:
    handles = [module.register_forward_pre_hook(_replace_in(fn), with_kwargs=True) if where == "in"
               else module.register_forward_hook(_replace_out(fn)) for (module, where), fn in zip(targets, fns)]
    try:
        return _losses(model, ids)
    finally:
        for h in handles:
            h.remove()


def _kl(lp_p: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q) from log-probabilities."""
    return (lp_p.exp() * (lp_p - lp_q)).sum(-1).mean()


def load_causal_lm(path: str, revision: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from actstore.workers.model_build import build_model

    return build_model(AutoModelForCausalLM.from_pretrained, path, revision=revision).eval()
