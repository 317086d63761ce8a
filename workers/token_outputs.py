"""Per-token model outputs: next-token loss, entropy and top-k log-probabilities, stored next to the token index.

With `token_outputs` in the config, each shard gets `outputs.parquet`, one row per token row of the shard (same
order as tokens.parquet): `loss` is the negative log-probability the model gave the *next* token of the same
sequence and `chosen_prob` that probability (both null at a sequence's last position, which has no next token),
`entropy` is the entropy (nats) of the full next-token distribution at that position, and
`topk_ids`/`topk_logprobs` are the k most likely next tokens and their log-probabilities (fixed-size lists, most
likely first). Stores written before `chosen_prob`/`entropy` existed simply lack those columns. Needs a causal LM
head, so the whole forward pass runs (no early exit).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def from_logits(logits: torch.Tensor, ids: torch.Tensor, lengths: list[int], topk: int) -> dict[str, np.ndarray]:
    """Outputs of one padded batch, flattened over the non-padding tokens in (sequence, position) order.

    `logits` is (batch, width, vocab) in any float dtype; log-probabilities are taken in float32 so the stored
    numbers do not depend on the model's compute dtype beyond the logits themselves. One sequence at a time:
    a whole batch of float32 log-probabilities over a 50k vocabulary would be gigabytes.
    """
    parts = [_one(logits[i, :n], ids[i, :n], topk) for i, n in enumerate(lengths)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _one(logits: torch.Tensor, ids: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    loss = torch.full((ids.shape[0],), float("nan"), device=logp.device)
    loss[:-1] = -logp[:-1].gather(-1, ids[1:, None].long()).squeeze(-1)
    # -sum p log p with p = exp(logp): tokens with p == 0 give 0 * -inf = nan, so they are zeroed first
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    out = {"loss": loss.cpu().numpy(), "chosen_prob": torch.exp(-loss).cpu().numpy(),
           "entropy": entropy.cpu().numpy()}
    if topk:
        vals, idx = torch.topk(logp, topk, dim=-1)  # sorted, most likely first
        out["topk_logprobs"] = vals.cpu().numpy()
        out["topk_ids"] = idx.to(torch.int32).cpu().numpy()
    return out


def empty(n: int, topk: int) -> dict[str, np.ndarray]:
    """Preallocated shard-sized buffers that `from_logits` rows are scattered into."""
    out = {key: np.empty(n, np.float32) for key in ("loss", "chosen_prob", "entropy")}
    if topk:
        out["topk_logprobs"] = np.empty((n, topk), np.float32)
        out["topk_ids"] = np.empty((n, topk), np.int32)
    return out


def to_table(out: dict[str, np.ndarray]) -> pa.Table:
    """Arrow table of one shard's outputs (NaN loss and chosen_prob -> null)."""
    cols: dict[str, pa.Array] = {key: pa.array(out[key], type=pa.float32(), mask=np.isnan(out[key]))
                                 for key in ("loss", "chosen_prob", "entropy") if key in out}
    if "topk_ids" in out:
        k = out["topk_ids"].shape[1]
        cols["topk_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(out["topk_ids"].ravel()), k)
        cols["topk_logprobs"] = pa.FixedSizeListArray.from_arrays(pa.array(out["topk_logprobs"].ravel()), k)
    return pa.table(cols)
