"""Numpy kernels of the layer statistics: which residual/MLP hooks form the stream, and the mergeable
per-block accumulators (norms, consecutive-layer cosines and updates, massive activations, MLP firing).

`actstore.pipeline.analysis.layer_stats` streams a store's row blocks through these and summarises the result;
everything here is pure numpy on in-memory blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actstore.schemas.hooks import parse_hook
from actstore.workers.stats import MASSIVE_ABS, MASSIVE_RATIO

RESID_KINDS = ("hook_resid_pre", "hook_resid_post")  # in stream order within a block
MLP_KIND = "mlp.hook_post"


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


def blocks_spanned(a: str, b: str) -> list[int]:
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
