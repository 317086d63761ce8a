"""The logit lens: a causal LM's final norm and unembedding applied to residual-stream rows.

`Lens(lm)` takes the final norm from the family table (`families.Family.final_norm`, a path on the base model)
and the unembedding from the LM head (`get_output_embeddings`), so lens(h) = W_U final_norm(h) (+ bias): for the
last block's `hook_resid_post`, which is taken before the final norm, that is the model's own output. Post-LN
encoders (BERT) have no final norm and no next-token head: the lens does not apply to them.

`lens_sums` compares one hook's lens distributions with the final ones, row by row in float64: next-token NLL,
KL(final || layer), top-1 agreement with the final argmax, entropy, and the rank of the true next token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from actstore.schemas.errors import AnalysisError
from actstore.workers.families import MODEL_TYPES, family_for
from actstore.workers.hookmap import get_module

RESIDUAL_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def check_lens_applies(model_type: str | None) -> None:
    """Refuse models the lens cannot read: encoders (post-LN, no next-token head) and unmapped families."""
    known = MODEL_TYPES.get(model_type or "")
    fam = family_for(type("C", (), {"model_type": model_type})())
    if known is not None and not known.causal:
        raise AnalysisError(f"the logit lens does not apply to {model_type!r}: a post-LN encoder has no final norm "
                            "and no next-token unembedding (its block outputs are already normalised)")
    if fam is None or fam.final_norm is None:
        raise AnalysisError(f"the logit lens needs the final norm of model type {model_type!r}, which actstore's "
                            "family table (workers/families.py) does not know")


class Lens(nn.Module):
    """h -> logits through the model's final norm and unembedding (float32)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        check_lens_applies(getattr(lm.config, "model_type", None))
        fam = family_for(lm.config)
        assert fam is not None and fam.final_norm is not None
        self.norm = get_module(lm.base_model, fam.final_norm)
        self.unembed = lm.get_output_embeddings()
        if self.unembed is None:
            raise AnalysisError(f"{type(lm).__name__} has no output embedding (LM head) to unembed with")

    @torch.inference_mode()
    def forward(self, h: Tensor) -> Tensor:
        p = next(self.unembed.parameters())
        return self.unembed(self.norm(h.to(p.device, p.dtype))).float()


def chunk_stats(lens: Lens, final_rows: np.ndarray, hook_rows: dict[str, np.ndarray],
                nxt: np.ndarray) -> dict[str, tuple[dict[str, float], np.ndarray]]:
    """For one chunk of token rows: per hook, the sums {nll, kl, agree, entropy, n} against the final rows'
    distributions (KL(final || hook), top-1 agreement with the final argmax) and the 0-based rank of each true
    next token `nxt` (int32). float64 log-softmax; memory: a few (rows x vocabulary) float64 tensors."""
    fin = torch.log_softmax(lens(torch.as_tensor(np.asarray(final_rows))).double(), -1)
    target = torch.as_tensor(np.asarray(nxt, np.int64), device=fin.device)[:, None]
    p_fin, top_fin = fin.exp(), fin.argmax(-1)
    out = {}
    for hook, rows in hook_rows.items():
        lp = torch.log_softmax(lens(torch.as_tensor(np.asarray(rows))).double(), -1)
        true = lp.gather(-1, target)
        sums = {"nll": -float(true.sum()), "kl": float((p_fin * (fin - lp)).sum()),
                "agree": float((lp.argmax(-1) == top_fin).sum()), "entropy": -float((lp.exp() * lp).sum()),
                "n": float(len(rows))}
        out[hook] = (sums, (lp > true).sum(-1).to(torch.int32).cpu().numpy())
    return out
