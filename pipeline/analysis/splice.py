"""CE-loss and KL scores: splice an SAE's reconstruction (or a transcoder's prediction) into the forward pass.

For held-out sequences of the store, the causal LM named in the manifest (or a given path) is run three ways:
clean, with the hook point replaced by the reconstruction, and with it zero-ablated. ce_loss_score =
(L_zero - L_recon) / (L_zero - L_clean) and kl_score = 1 - KL_recon / KL_zero, so a perfect reconstruction
scores 1.0 and zero-ablation 0.0. Transcoders replace the MLP module's output with their prediction from the
MLP input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actstore.schemas.hooks import parse_hook
from actstore.workers import hookmap
from actstore.workers.sae.metrics import ce_kl_scores


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


def splice_scores(model: nn.Module, sequences: list[np.ndarray], hook: str, replace: Callable[[torch.Tensor], torch.Tensor],
                  transcoder_in: str | None = None) -> dict[str, float]:
    """Clean / spliced / zero-ablated losses over `sequences` (each run alone: no padding effects)."""
    base = model.base_model
    spec = parse_hook(hook)
    module, where, _ = hookmap.resolve(base, spec)
    captured: dict[str, torch.Tensor] = {}
    pre = None
    if transcoder_in is not None:  # the transcoder reads the MLP input and replaces the MLP output
        in_mod, in_where, _ = hookmap.resolve(base, parse_hook(transcoder_in))
        grab = (lambda m, a, kw: captured.__setitem__("x", a[0] if a else kw["hidden_states"])) if in_where == "in" \
            else (lambda m, a, o: captured.__setitem__("x", o if isinstance(o, torch.Tensor) else o[0]))
        pre = in_mod.register_forward_pre_hook(grab, with_kwargs=True) if in_where == "in" else in_mod.register_forward_hook(grab)
    sums = {"clean": 0.0, "recon": 0.0, "zero": 0.0, "kl_recon": 0.0, "kl_zero": 0.0}
    try:
        with torch.no_grad():
            for seq in sequences:
                ids = torch.as_tensor(seq, dtype=torch.long)[None]
                clean, lp_clean = _losses(model, ids)
                fn = (lambda t: replace(captured["x"]).to(t.dtype)) if transcoder_in else (lambda t: replace(t).to(t.dtype))
                recon, lp_recon = _spliced(model, module, where, ids, fn)
                zero, lp_zero = _spliced(model, module, where, ids, torch.zeros_like)
                sums["clean"] += float(clean)
                sums["recon"] += float(recon)
                sums["zero"] += float(zero)
                sums["kl_recon"] += float(_kl(lp_clean, lp_recon))
                sums["kl_zero"] += float(_kl(lp_clean, lp_zero))
    finally:
        if pre is not None:
            pre.remove()
    n = max(len(sequences), 1)
    m = {k: v / n for k, v in sums.items()}
    return ce_kl_scores(m["clean"], m["recon"], m["zero"], m["kl_recon"], m["kl_zero"])


def _spliced(model: nn.Module, module: nn.Module, where: str, ids: torch.Tensor, fn: Callable) -> tuple:
    h = (module.register_forward_pre_hook(_replace_in(fn), with_kwargs=True) if where == "in"
         else module.register_forward_hook(_replace_out(fn)))
    try:
        return _losses(model, ids)
    finally:
        h.remove()


def _kl(lp_p: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q) from log-probabilities."""
    return (lp_p.exp() * (lp_p - lp_q)).sum(-1).mean()


def load_causal_lm(path: str, revision: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, revision=revision).eval()
