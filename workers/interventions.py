"""Edit hook points of a causal LM during its forward pass, and measure what the edits do to its predictions.

Hooks resolve through the same hook map as extraction (`hookmap.resolve`: every supported family and
`module:` paths), and an edit acts exactly where extraction captures: an "out" point's module output is
replaced, an "in" point's module input (its first positional argument or `hidden_states`). So an edit at
`hook_resid_post` changes the residual stream every later block reads, while one at `hook_resid_mid` (captured
as the input of the MLP's norm) or `hook_mlp_in` changes only what the MLP reads.

Every mode defines a target t(h) for the hook's tensor h, and scale s moves h that far: h + s (t(h) - h), with
s = 1 giving t(h) itself (so zero with s = 1 gives exact zeros) and s = 0 leaving the forward untouched (the
hook returns None, so the module's own output object flows on: bit for bit the plain forward).
  add     t = h + sum of the direction rows v_i             (s = 2 adds 2 v)
  ablate  t = h - Q Q^T h, Q an orthonormal basis of the rows (the component along the span removed)
  clamp   t = h + Q (c - Q^T h), c = `value`                  (the component along each unit row set to c)
  patch   t = the source run's rows for the same tokens (with a direction: only their component in its span)
  zero    t = 0
  mean    t = the hook's mean activation
Edits are computed in float32 and cast back to the model's dtype.

`effects` measures, per token that has a next token in its sequence: the next-token negative log-likelihood
under each edit, the KL divergence from the clean run's next-token distribution to the edited one, top-1
agreement with the clean run, and the change of every vocabulary entry's probability (summed, for the top-k
shifted tokens). All in float64 from the float32 logits, in row chunks to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from actstore.schemas.errors import ConfigError, HookNameError
from actstore.schemas.hooks import parse_hooks
from actstore.workers import hookmap

STAT_CHUNK = 256  # token rows per float64 log-softmax (memory: rows x vocabulary x 8 bytes)


@dataclass
class Edit:
    """One intervention at one hook; only the fields its mode needs are set."""

    mode: str
    scale: float
    vectors: Tensor | None = None  # (k, d) rows whose sum `add` adds
    basis: Tensor | None = None  # (k, d) orthonormal rows (ablate, clamp; patch restricted to a span)
    value: float = 0.0  # clamp target of each component
    mean: Tensor | None = None  # (d,) for mode mean
    source: Tensor | None = None  # (b, t, d) patch rows of the current batch, padded like it
    where: Tensor | None = None  # (b, t) bool: positions to edit (None: all)


def orthonormal(vectors: np.ndarray | Tensor) -> Tensor:
    """Orthonormal rows spanning the given rows (float32), via a float64 QR; a rank-deficient set is refused."""
    v = torch.as_tensor(np.asarray(vectors), dtype=torch.float64)
    q, r = torch.linalg.qr(v.T)
    diag = r.diagonal().abs()
    if (diag <= 1e-10 * max(float(diag.max()), 1e-30)).any():
        raise ConfigError("the direction rows are linearly dependent (or zero); keep independent rows (components)")
    # QR fixes each column only up to sign; clamp needs row i to point along v_i (the component set to `value`)
    return (q * torch.sign(r.diagonal())[None]).T.to(torch.float32).contiguous()


def edited(h: Tensor, e: Edit) -> Tensor:
    """The hook tensor (..., d) after edit `e` (see the module docstring); scale 0 returns `h` itself."""
    if e.scale == 0:
        return h
    x = h.float()
    if e.mode == "add":
        assert e.vectors is not None
        out = x + e.scale * e.vectors.sum(0).to(x.device)
    else:
        target = _target(x, e)
        out = target if e.scale == 1 else x + e.scale * (target - x)
    if e.where is not None:
        out = torch.where(e.where.to(out.device)[..., None], out, x)
    return out.to(h.dtype)


def _target(x: Tensor, e: Edit) -> Tensor:
    q = e.basis.to(x.device) if e.basis is not None else None
    if e.mode == "ablate":
        assert q is not None
        return x - (x @ q.T) @ q
    if e.mode == "clamp":
        assert q is not None
        return x + (e.value - x @ q.T) @ q
    if e.mode == "zero":
        return torch.zeros_like(x)
    if e.mode == "mean":
        assert e.mean is not None
        return e.mean.to(x.device, torch.float32).expand_as(x)
    if e.mode == "patch":
        assert e.source is not None
        src = e.source.to(x.device, torch.float32)
        return src if q is None else x + ((src - x) @ q.T) @ q
    raise ConfigError(f"unknown intervention mode {e.mode!r}")


class Intervener:
    """A causal LM with a hook at every listed point that applies `self.edits[hook]` when set.

    `lm` is a *ForCausalLM model; hooks live on its base model, as in extraction. Set `edits` (hook -> Edit)
    before a forward; hooks without an edit (or with scale 0) leave the forward untouched.
    """

    def __init__(self, lm: nn.Module, hooks: list[str]) -> None:
        self.lm = lm.eval()
        base: Any = lm.base_model
        self.specs = parse_hooks(hooks)
        hookmap.check_hooks(self.specs, base.config)
        self.edits: dict[str, Edit] = {}
        self.observe: Callable[[str, Tensor], None] | None = None  # sees every hook tensor (clean means)
        self.widths: dict[str, int] = {}
        self._handles = [self._register(s.name, *hookmap.resolve(base, s)[:2]) for s in self.specs]

    def _register(self, name: str, module: nn.Module, where: str) -> Any:
        def apply(t: Tensor) -> Tensor | None:
            self.widths[name] = int(t.shape[-1])
            if self.observe is not None:
                self.observe(name, t)
            e = self.edits.get(name)
            if e is None or e.scale == 0:
                return None
            rows = e.basis if e.basis is not None else e.vectors
            if rows is not None and rows.shape[-1] != t.shape[-1]:
                raise ConfigError(f"hook {name!r} has width {t.shape[-1]} but the direction has {rows.shape[-1]}")
            return edited(t, e)

        if where == "in":
            return module.register_forward_pre_hook(_pre_hook(apply), with_kwargs=True)
        return module.register_forward_hook(_post_hook(apply, name))

    @torch.inference_mode()
    def logits(self, ids: Tensor, mask: Tensor | None, edits: dict[str, Edit] | None = None) -> Tensor:
        """float32 logits (b, t, vocab) of a right-padded batch under `edits` (None: the clean forward)."""
        self.edits = edits or {}
        try:
            out = self.lm(input_ids=ids, attention_mask=None if mask is None else mask.long(), use_cache=False)
        finally:
            self.edits = {}
        return out.logits.float()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _pre_hook(apply: Callable[[Tensor], Tensor | None]) -> Callable:
    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args and isinstance(args[0], Tensor):
            new = apply(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        if isinstance(kwargs.get("hidden_states"), Tensor):
            new = apply(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        raise HookNameError(f"{type(mod).__name__} received no tensor input to edit")
    return hook


def _post_hook(apply: Callable[[Tensor], Tensor | None], name: str) -> Callable:
    def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, Tensor):
            return apply(out)
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            new = apply(out[0])
            return None if new is None else (new, *out[1:])
        raise HookNameError(f"hook {name!r}: cannot edit an output of type {type(out).__name__}")
    return hook


# ------------------------------------------------------------------------------------------------ batches


def batches(sequences: list[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Indices of the sequences per batch, sorted by length (stable) so padding stays small."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    for b in range(0, len(order), batch_size):
        yield order[b:b + batch_size]


def padded(sequences: list[np.ndarray], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """(ids (b, t) right-padded, mask (b, t) bool or None when no sequence is padded)."""
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    if min(lengths) == width:
        return ids.to(device), None
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return ids.to(device), mask.to(device)


def position_mask(lengths: list[int], positions: list[int] | None, width: int) -> Tensor | None:
    """(b, width) bool: the listed positions of each sequence (negative from its end); None: all positions."""
    if positions is None:
        return None
    out = torch.zeros((len(lengths), width), dtype=torch.bool)
    for i, n in enumerate(lengths):
        for p in positions:
            q = p if p >= 0 else n + p
            if 0 <= q < n:
                out[i, q] = True
    return out


def scatter_rows(rows: np.ndarray, starts: list[int], lengths: list[int], width: int) -> Tensor:
    """(b, width, d) float32 from stored rows (n, d): sequence i's rows start at starts[i]; padding is zero."""
    out = torch.zeros((len(lengths), width, rows.shape[1]), dtype=torch.float32)
    for i, (a, n) in enumerate(zip(starts, lengths)):
        out[i, :n] = torch.as_tensor(np.asarray(rows[a:a + n], np.float32))
    return out


# ----------------------------------------------------------------------------------------------- measures


def next_token_rows(ids: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor]:
    """(flat indices into (b * t) of every position with a next token, the next token ids)."""
    width = ids.shape[1]
    idx = torch.cat([torch.arange(n - 1) + i * width for i, n in enumerate(lengths)]) if lengths else \
        torch.zeros(0, dtype=torch.long)
    nxt = ids.reshape(-1)[(idx + 1).to(ids.device)]
    return idx.to(ids.device), nxt


def clean_sums(logits: Tensor, idx: Tensor, nxt: Tensor) -> dict[str, np.ndarray]:
    """{"nll": sum of next-token NLL, "n": count} of the clean run (float64)."""
    nll = 0.0
    flat = logits.reshape(-1, logits.shape[-1])
    for a in range(0, len(idx), STAT_CHUNK):
        lp = torch.log_softmax(flat[idx[a:a + STAT_CHUNK]].double(), -1)
        nll -= float(lp.gather(-1, nxt[a:a + STAT_CHUNK, None]).sum())
    return {"nll": np.array(nll), "n": np.array(float(len(idx)))}


def effect_sums(clean: Tensor, edited_logits: Tensor, idx: Tensor, nxt: Tensor, dprob: bool = True) -> dict[str, np.ndarray]:
    """Sums over the rows `idx` of: NLL of the next token under the edit, KL(clean || edited), top-1
    agreement, and (with `dprob`) each vocabulary entry's probability change, all float64."""
    c_flat = clean.reshape(-1, clean.shape[-1])
    e_flat = edited_logits.reshape(-1, edited_logits.shape[-1])
    nll = kl = agree = 0.0
    delta = torch.zeros(clean.shape[-1], dtype=torch.float64, device=clean.device)
    for a in range(0, len(idx), STAT_CHUNK):
        rows = idx[a:a + STAT_CHUNK]
        lc = torch.log_softmax(c_flat[rows].double(), -1)
        le = torch.log_softmax(e_flat[rows].double(), -1)
        nll -= float(le.gather(-1, nxt[a:a + STAT_CHUNK, None]).sum())
        pc = lc.exp()
        kl += float((pc * (lc - le)).sum())
        agree += float((c_flat[rows].argmax(-1) == e_flat[rows].argmax(-1)).sum())
        if dprob:
            delta += (le.exp() - pc).sum(0)
    out = {"nll": np.array(nll), "kl": np.array(kl), "agree": np.array(agree), "n": np.array(float(len(idx)))}
    if dprob:
        out["dprob"] = delta.cpu().numpy()
    return out


def add_sums(total: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Element-wise sum of two partial-sum dicts (keys of either)."""
    out = dict(total)
    for k, v in part.items():
        out[k] = out[k] + v if k in out else np.array(v, copy=True)
    return out


# ---------------------------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate(iv: Intervener, prompt: np.ndarray, edits: dict[str, Edit] | None, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             stop_ids: frozenset[int] = frozenset(), device: torch.device | str = "cpu") -> list[int]:
    """New token ids continuing `prompt` under `edits` (a full forward per token: edits see every position).

    An edit's `where` mask, if any, covers the prompt's positions only; new tokens are edited when it is None.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = [int(t) for t in prompt]
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], dtype=torch.long, device=device)
        step = {h: _grown(e, len(ids)) for h, e in (edits or {}).items()}
        logits = iv.logits(x, None, step)[0, -1].double()
        nxt = _pick(logits, do_sample, temperature, top_p, gen)
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out


def _grown(e: Edit, width: int) -> Edit:
    """The edit for a sequence grown to `width` positions (a position mask padded with False)."""
    if e.where is None:
        return e
    w = torch.zeros((1, width), dtype=torch.bool)
    n = min(width, e.where.shape[-1])
    w[0, :n] = e.where.reshape(-1)[:n]
    return Edit(**{**e.__dict__, "where": w})


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if not do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, -1).cpu()
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
