"""Layer-by-layer statistics of a store's residual stream and MLP neurons, from one streaming pass.

`layer_statistics(store)` reads every stored residual hook (`hook_resid_pre` / `hook_resid_post`) and every
`mlp.hook_post` hook block by block (row blocks aligned to the dask arrays' chunks; a block holds at most two
residual blocks at a time, so memory is bounded by the block size, not by the store) and reports:

- norm growth: the mean token L2 norm of each residual hook, in stream order;
- consecutive layers: for each pair of consecutive points of the residual stream, the mean cosine similarity of
  the same token's two vectors and the mean norm of the update between them (the blocks' contribution);
- massive activations: per residual hook, the top entries by |x| (dimension, token row / token_id / position,
  value, ratio to the token's median |x|) and per-dimension counts of |x| > 100 and of "massive" entries
  (|x| > 100 and > 1000 x the token's median |x|, the criterion of `actstore.workers.stats`);
- MLP sparsity: per `mlp.hook_post` hook, the fraction of entries > 0 and the fraction of dead neurons
  (never > 0 on any counted token).

Stream points: TransformerLens defines `blocks.{i}.hook_resid_pre` as the same tensor as
`blocks.{i-1}.hook_resid_post`, so when both are stored the pre hook is not a separate point of the chain (its
norm is still reported). An update therefore is `resid_post[i] - resid_post[i-1]`, or `resid_post[i] -
resid_pre[i]` when layer i-1 is not stored; with gaps it spans several blocks (listed in `blocks`).

Special tokens (BOS/CLS/SEP/padding) are excluded unless `exclude_special=False`. Sums run in float64 per
block and partial results merge in block order, so the result does not depend on thread timing. The returned
dict holds only lists, ints, floats (non-finite ones as None) and strings: `to_json` writes it.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actstore.schemas.hooks import parse_hook
from actstore.workers.stats import MASSIVE_ABS, MASSIVE_RATIO

RESID_KINDS = ("hook_resid_pre", "hook_resid_post")  # in stream order within a block
MLP_KIND = "mlp.hook_post"
_BLOCK_ELEMS = 1 << 22  # default block: ~4M entries of the widest hook (32 MiB as float64)


# --------------------------------------------------------------------------------------------------------------
# Which hooks, in which order
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """Residual hooks in stream order, the chain of distinct stream points, and the MLP hooks by layer."""

    resid: list[str]
    chain: list[str]
    mlp: list[str]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.chain[:-1], self.chain[1:]))


def _sort_key(hook: str) -> tuple[int, int]:
    spec = parse_hook(hook)
    return spec.layer, RESID_KINDS.index(spec.kind) if spec.kind in RESID_KINDS else 0


def plan_layers(hooks: list[str]) -> LayerPlan:
    """Order the residual and MLP hooks of `hooks` (other hooks are ignored)."""
    specs = {h: parse_hook(h) for h in hooks}
    resid = sorted((h for h, s in specs.items() if s.kind in RESID_KINDS), key=_sort_key)
    mlp = sorted((h for h, s in specs.items() if s.kind == MLP_KIND), key=_sort_key)
    posts = {specs[h].layer for h in resid if specs[h].kind == "hook_resid_post"}
    chain = [h for h in resid if not (specs[h].kind == "hook_resid_pre" and specs[h].layer - 1 in posts)]
    return LayerPlan(resid, chain, mlp)


def _blocks_spanned(a: str, b: str) -> list[int]:
    """Blocks whose update lies between stream points a and b."""
    sa, sb = parse_hook(a), parse_hook(b)
    first = sa.layer + (1 if sa.kind == "hook_resid_post" else 0)
    last = sb.layer - (1 if sb.kind == "hook_resid_pre" else 0)
    return list(range(first, last + 1))


# --------------------------------------------------------------------------------------------------------------
# Mergeable partial statistics
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TopK:
    """The k entries of largest |x| seen so far (global row, dim, value, ratio to the token's median |x|)."""

    k: int
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dim: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    value: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def merge(self, other: TopK) -> TopK:
        cat = [np.concatenate([getattr(self, f), getattr(other, f)]) for f in ("row", "dim", "value", "ratio")]
        # Ties are broken by row then dim, so the result does not depend on how rows were split into blocks.
        order = np.lexsort((cat[1], cat[0], -np.abs(cat[2])))[: self.k]
        return TopK(self.k, *(c[order] for c in cat))

    @classmethod
    def of_block(cls, x: np.ndarray, ax: np.ndarray, rows: np.ndarray, k: int) -> TopK:
        """Top-k of a (rows, d) block; `rows` are the global row numbers of its rows."""
        kk = min(k, ax.size)
        if kk == 0:
            return cls(k)
        # The top-k entries lie in the rows whose max |x| is at least the k-th largest row max: select within
        # those rows only (a partition over the whole block would cost more than all the other statistics).
        row_max = ax.max(axis=1)
        kr = min(kk, len(row_max))
        cand = np.flatnonzero(row_max >= -np.partition(-row_max, kr - 1)[kr - 1])
        flat = ax[cand].ravel()
        t = -np.partition(-flat, kk - 1)[kk - 1]  # the k-th largest |x|
        above = np.flatnonzero(flat > t)
        # Among entries tied at t keep the first in (row, dim) order, as the merge's tie-break does.
        idx = np.concatenate([above, np.flatnonzero(flat == t)[: kk - above.size]])
        r, c = np.divmod(idx, x.shape[1])
        r = cand[r]
        med = np.median(ax[r], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(med > 0, ax[r, c] / np.where(med > 0, med, 1.0), np.inf)
        return cls(k, rows[r].astype(np.int64), c.astype(np.int64), x[r, c], ratio).merge(cls(k))  # sorted


@dataclass
class ResidAcc:
    """Per residual hook: norm sum and massive-activation counts."""

    norm_sum: float
    big: np.ndarray  # (d,) int64 entries with |x| > MASSIVE_ABS
    massive: np.ndarray  # (d,) int64 entries that also exceed MASSIVE_RATIO x the token's median |x|
    top: TopK

    def merge(self, o: ResidAcc) -> ResidAcc:
        return ResidAcc(self.norm_sum + o.norm_sum, self.big + o.big, self.massive + o.massive, self.top.merge(o.top))


@dataclass
class PairAcc:
    """Per consecutive pair of stream points: cosine and update-norm sums."""

    n: int = 0
    cos_sum: float = 0.0
    cos_n: int = 0
    upd_sum: float = 0.0
    rel_sum: float = 0.0
    rel_n: int = 0

    def merge(self, o: PairAcc) -> PairAcc:
        return PairAcc(self.n + o.n, self.cos_sum + o.cos_sum, self.cos_n + o.cos_n, self.upd_sum + o.upd_sum,
                       self.rel_sum + o.rel_sum, self.rel_n + o.rel_n)


@dataclass
class Partial:
    """Everything one row block contributes; `merge` combines disjoint row sets exactly (up to float sums)."""

    n: int = 0
    resid: dict[str, ResidAcc] = field(default_factory=dict)
    pairs: dict[tuple[str, str], PairAcc] = field(default_factory=dict)
    fire: dict[str, np.ndarray] = field(default_factory=dict)  # mlp hook -> (d,) int64 count of x > 0

    def merge(self, o: Partial) -> Partial:
        def join(a: dict, b: dict, f) -> dict:
            return {k: f(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}

        return Partial(self.n + o.n, join(self.resid, o.resid, ResidAcc.merge),
                       join(self.pairs, o.pairs, PairAcc.merge), join(self.fire, o.fire, np.add))


def _norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def resid_block(x: np.ndarray, rows: np.ndarray, k: int) -> tuple[ResidAcc, np.ndarray]:
    """Statistics of one residual block (float64 rows) and its token norms."""
    ax = np.abs(x)
    big = ax > MASSIVE_ABS
    massive = np.zeros(x.shape[1], np.int64)
    hit = np.flatnonzero(big.any(axis=1))
    if hit.size:  # the per-token median is only needed where something is large
        med = np.median(ax[hit], axis=1, keepdims=True)
        massive = (big[hit] & (ax[hit] > MASSIVE_RATIO * med)).sum(axis=0).astype(np.int64)
    norms = _norms(x)
    acc = ResidAcc(float(norms.sum()), big.sum(axis=0).astype(np.int64), massive, TopK.of_block(x, ax, rows, k))
    return acc, norms


def pair_block(a: np.ndarray, na: np.ndarray, b: np.ndarray, nb: np.ndarray) -> PairAcc:
    """Cosine of the same token at two stream points, and the norm of the update b - a."""
    den = na * nb
    ok = den > 0  # a zero vector has no direction: left out of the cosine mean
    cos = np.einsum("ij,ij->i", a[ok], b[ok]) / den[ok]
    upd = _norms(b - a)
    rel = na > 0
    return PairAcc(len(na), float(cos.sum()), int(ok.sum()), float(upd.sum()), float((upd[rel] / na[rel]).sum()),
                   int(rel.sum()))


# --------------------------------------------------------------------------------------------------------------
# The streaming pass
# --------------------------------------------------------------------------------------------------------------


def row_blocks(chunks: tuple[int, ...], target: int) -> list[tuple[int, int]]:
    """Group consecutive chunks into [start, stop) row blocks of at least `target` rows."""
    out, start, stop = [], 0, 0
    for c in chunks:
        stop += int(c)
        if stop - start >= target:
            out.append((start, stop))
            start = stop
    if stop > start:
        out.append((start, stop))
    return out


def _read(arr: Any, start: int, stop: int, keep: np.ndarray) -> np.ndarray:
    """Rows [start, stop) of a hook restricted to `keep`, as stored (float16/float32)."""
    x = np.asarray(arr[start:stop].compute(scheduler="sync"))
    return x if keep.all() else x[keep]


def block_partial(arrs: dict[str, Any], plan: LayerPlan, start: int, stop: int, keep: np.ndarray,
                  k: int) -> Partial:
    """One row block over all hooks, holding at most two residual blocks at a time."""
    rows = start + np.flatnonzero(keep)
    part = Partial(n=int(keep.sum()))
    prev: tuple[str, np.ndarray, np.ndarray] | None = None
    chain = set(plan.chain)
    for h in plan.resid:
        x = _read(arrs[h], start, stop, keep).astype(np.float64)  # float64 sums, as workers.stats does
        part.resid[h], norms = resid_block(x, rows, k)
        if h in chain:
            if prev is not None:
                part.pairs[(prev[0], h)] = pair_block(prev[1], prev[2], x, norms)
            prev = (h, x, norms)
    for h in plan.mlp:
        part.fire[h] = (_read(arrs[h], start, stop, keep) > 0).sum(axis=0).astype(np.int64)
    return part


def _stream(store: Any, plan: LayerPlan, keep: np.ndarray, k: int, block_rows: int | None,
            workers: int) -> Partial:
    hooks = plan.resid + plan.mlp
    arrs = {h: store.activations(h) for h in hooks}
    ref = arrs[hooks[0]]
    target = block_rows or max(1, _BLOCK_ELEMS // max(a.shape[1] for a in arrs.values()))
    blocks = row_blocks(ref.chunks[0], target)

    def run(b: tuple[int, int]) -> Partial:
        return block_partial(arrs, plan, b[0], b[1], keep[b[0]:b[1]], k)

    total = Partial()
    # Threads, not processes: numpy and the zarr codecs release the GIL. map() keeps block order, so the merge
    # order (and every float sum) is the same on every run.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for part in pool.map(run, blocks):
            total = total.merge(part)
    return total


# --------------------------------------------------------------------------------------------------------------
# Public entry point and the JSON-able result
# --------------------------------------------------------------------------------------------------------------


def layer_statistics(store: Any, exclude_special: bool = True, massive_top: int = 10,
                     hooks: list[str] | None = None, block_rows: int | None = None,
                     workers: int | None = None) -> dict[str, Any]:
    """Norm growth, consecutive-layer cosine and update norms, massive activations and MLP sparsity.

    `store` is a Store or URL; `hooks` restricts the hooks read (default: every residual and mlp.hook_post
    hook); `block_rows` overrides the rows per streamed block; `workers` threads read blocks concurrently.
    """
    if isinstance(store, (str, os.PathLike)):
        from actstore.pipeline.store import open_store

        store = open_store(str(store))
    plan = plan_layers([h for h in (hooks or store.hooks) if not h.startswith("module:")])
    tokens = store.tokens() if store.n_tokens else None
    special = _column(tokens, "special", bool, store.n_tokens)
    keep = ~special if exclude_special else np.ones(store.n_tokens, bool)
    out = {"n_tokens": int(keep.sum()), "n_excluded": int((~keep).sum()), "exclude_special": exclude_special,
           "massive_abs": MASSIVE_ABS, "massive_ratio": MASSIVE_RATIO}
    if (not plan.resid and not plan.mlp) or not store.n_tokens:
        return _clean({**out, "residual": [], "consecutive": [], "massive": [], "mlp": []})
    total = _stream(store, plan, keep, massive_top, block_rows, workers or min(4, os.cpu_count() or 1))
    return _clean({**out, **_summarise(store, plan, total, tokens)})


def _column(tokens: Any, name: str, dtype: Any, n: int) -> np.ndarray:
    if tokens is None or name not in tokens.column_names:
        return np.zeros(n, dtype)
    return tokens.column(name).to_numpy(zero_copy_only=False).astype(dtype)


def _summarise(store: Any, plan: LayerPlan, total: Partial, tokens: Any) -> dict[str, Any]:
    n = max(total.n, 1)
    residual = []
    for h in plan.resid:
        mean_norm = total.resid[h].norm_sum / n if total.n else math.nan
        prev = residual[-1]["mean_norm"] if residual else None
        spec = parse_hook(h)
        residual.append({"hook": h, "layer": spec.layer, "kind": spec.kind, "d": store.manifest.hook(h).d,
                         "mean_norm": mean_norm, "growth": mean_norm / prev if prev else None})
    return {
        "residual": residual,
        "consecutive": [_pair_row(a, b, total.pairs[(a, b)]) for a, b in plan.pairs],
        "massive": [_massive_row(h, total.resid[h], tokens) for h in plan.resid],
        "mlp": [_mlp_row(h, total.fire[h], total.n) for h in plan.mlp],
    }


def _div(a: float, b: int) -> float:
    return a / b if b else math.nan


def _pair_row(a: str, b: str, acc: PairAcc) -> dict[str, Any]:
    return {"from": a, "to": b, "layer": parse_hook(b).layer, "blocks": _blocks_spanned(a, b),
            "mean_cosine": _div(acc.cos_sum, acc.cos_n), "mean_update_norm": _div(acc.upd_sum, acc.n),
            "mean_relative_update": _div(acc.rel_sum, acc.rel_n)}


def _massive_row(h: str, acc: ResidAcc, tokens: Any) -> dict[str, Any]:
    n_rows = 0 if tokens is None else tokens.num_rows
    top = []
    for r, c, v, q in zip(acc.top.row, acc.top.dim, acc.top.value, acc.top.ratio):
        tok = {k: (tokens.column(k)[int(r)].as_py() if tokens is not None and k in tokens.column_names
                   and r < n_rows else None) for k in ("token_id", "position", "doc_id")}
        top.append({"dim": int(c), "row": int(r), **tok, "value": float(v), "ratio_to_median": float(q)})
    dims = np.flatnonzero((acc.big > 0) | (acc.massive > 0))
    dims = dims[np.lexsort((dims, -acc.big[dims], -acc.massive[dims]))]
    return {"hook": h, "layer": parse_hook(h).layer, "n_massive": int(acc.massive.sum()),
            "n_above_abs": int(acc.big.sum()), "max_abs": float(abs(acc.top.value[0])) if len(acc.top.value) else None,
            "top": top, "dims": [{"dim": int(d), "n_massive": int(acc.massive[d]), "n_above_abs": int(acc.big[d])}
                                 for d in dims]}


def _mlp_row(h: str, fire: np.ndarray, n: int) -> dict[str, Any]:
    return {"hook": h, "layer": parse_hook(h).layer, "d": int(fire.shape[0]),
            "fraction_positive": _div(float(fire.sum()), n * fire.shape[0]),
            "mean_active_neurons": _div(float(fire.sum()), n),
            "dead_fraction": float((fire == 0).mean()) if n else math.nan,
            "n_dead": int((fire == 0).sum())}


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null; numpy scalars become Python numbers."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


def to_json(stats: dict[str, Any], path: str | os.PathLike | None = None, indent: int | None = 1) -> str:
    """`layer_statistics` output as JSON text (NaN/inf as null); also written to `path` when given."""
    text = json.dumps(_clean(stats), indent=indent)
    if path is not None:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text

