"""Online per-hook statistics that merge exactly across shards (Chan et al. parallel mean/variance).

Computed in float64 over the *stored* values of non-special tokens, so merged results equal numpy statistics
of the stored array restricted to the same rows. Token-norm quantiles come from a fixed log-spaced histogram
(mergeable; relative error bounded by one bin width, ~1.4%) because exact quantiles cannot be merged in O(d).

Speed and reproducibility: rows are converted to float64 a small chunk at a time into a reused, 64-byte
aligned scratch buffer that stays in the CPU cache while every statistic reads it (one pass over the stored
bytes, no full float64 copy). Every floating-point reduction has a fixed order that depends only on the
shape: column sums add rows one after another (element-wise adds), token norms use numpy's pairwise sum
over one row (fixed 8-way unrolled order) and the total uses the exactly rounded fsum; no FMA-contracting
kernels (einsum, BLAS) and no multi-threaded reductions. So the bytes are the same in every process, for
any memory alignment of the input and on any x86/ARM SIMD width, which is what lets a Ray run and a local
run write identical stats files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

# Norm histogram: 1024 log-spaced bins over [1e-4, 1e8]; values outside go to the end bins.
NORM_EDGES = np.logspace(-4, 8, 1025)
MASSIVE_ABS = 100.0  # |x| above this ...
MASSIVE_RATIO = 1000.0  # ... and above this multiple of the token's median |x| is a "massive activation"
# float64 elements per chunk: 512 KiB of scratch (x2) stays in L2; fewer, larger chunks cost cache misses,
# smaller ones Python overhead. At most 255 rows so per-chunk counts fit uint8 (a fast, cast-free reduction).
_CHUNK_ELEMS = 1 << 16
_CHUNK_MAX_ROWS = 255


@dataclass
class HookStats:
    """Mergeable statistics of one hook over a set of token rows."""

    n: int
    mean: np.ndarray  # (d,) float64
    m2: np.ndarray  # (d,) float64, sum of squared deviations from the mean
    max_abs: np.ndarray  # (d,) float64
    zero_count: np.ndarray  # (d,) int64, exact zeros
    fire_count: np.ndarray  # (d,) int64, strictly positive entries (neuron firing for mlp.hook_post)
    massive_count: np.ndarray  # (d,) int64, |x| > 100 and > 1000 x the token's median |x|
    big_count: np.ndarray  # (d,) int64, |x| > 100
    norm_hist: np.ndarray  # (len(NORM_EDGES)+1,) int64, token L2 norms
    norm_sum: float
    overflow: int = 0  # float16 entries stored as inf (only with on_overflow: inf)

    @classmethod
    def empty(cls, d: int) -> HookStats:
        z = np.zeros(d, np.int64)
        return cls(0, np.zeros(d), np.zeros(d), np.zeros(d), z, z.copy(), z.copy(), z.copy(),
                   np.zeros(len(NORM_EDGES) + 1, np.int64), 0.0)

    @classmethod
    def from_rows(
        cls, x: np.ndarray, overflow: int = 0, *, keep: np.ndarray | None = None, finite_only: bool = False,
        decode: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> HookStats:
        """Statistics of the rows of `x` (n, d) that count.

        keep: boolean row mask (e.g. non-special tokens; None: all rows). finite_only: also skip rows holding
        inf or nan (float16 overflow stored as inf). decode: maps stored rows to numbers (bfloat16 bits),
        applied chunk by chunk so no decoded copy of the whole array is made.
        """
        n, d = x.shape
        rows = max(1, min(_CHUNK_MAX_ROWS, _CHUNK_ELEMS // max(d, 1)))
        idx = np.flatnonzero(keep) if keep is not None else None
        total = n if idx is None else len(idx)
        acc = _Accumulator(d, rows)
        for start in range(0, total, rows):
            part = x[start:start + rows] if idx is None else x[idx[start:start + rows]]
            acc.add(part if decode is None else decode(part), finite_only)
        return acc.result(overflow)

    def merge(self, other: HookStats) -> HookStats:
        """Exact combination of two disjoint row sets."""
        n = self.n + other.n
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return HookStats(
            n, mean, m2, np.maximum(self.max_abs, other.max_abs), self.zero_count + other.zero_count,
            self.fire_count + other.fire_count, self.massive_count + other.massive_count,
            self.big_count + other.big_count, self.norm_hist + other.norm_hist, self.norm_sum + other.norm_sum,
            self.overflow + other.overflow,
        )

    @property
    def var(self) -> np.ndarray:
        """Population variance per dimension (ddof=0)."""
        return self.m2 / max(self.n, 1)

    def norm_quantiles(self, qs: tuple[float, ...] = (0.01, 0.5, 0.99)) -> dict[str, float]:
        """Approximate token-norm quantiles from the histogram (geometric bin centres)."""
        if self.n == 0:
            return {f"p{int(q * 100)}": float("nan") for q in qs}
        cdf = np.cumsum(self.norm_hist)
        centres = np.sqrt(NORM_EDGES[:-1] * NORM_EDGES[1:])
        centres = np.concatenate([[NORM_EDGES[0]], centres, [NORM_EDGES[-1]]])
        return {f"p{round(q * 100)}": float(centres[np.searchsorted(cdf, q * self.n, side="left")]) for q in qs}

    def summary(self, kind: str | None = None) -> dict[str, float | int]:
        """Scalar summary recorded per hook in manifest.json."""
        d = len(self.mean)
        n = max(self.n, 1)
        out: dict[str, float | int] = {
            "n_tokens": self.n,
            "mean_norm": self.norm_sum / n,
            **{f"norm_{k}": v for k, v in self.norm_quantiles().items()},
            "max_abs": float(self.max_abs.max(initial=0.0)),
            "mean_variance": float(self.var.mean()) if d else 0.0,
            "norm_of_mean": float(np.linalg.norm(self.mean)),
            "zero_fraction": float(self.zero_count.sum() / (n * d)) if d else 0.0,
            "n_massive": int(self.massive_count.sum()),
            "n_above_100": int(self.big_count.sum()),
            "n_overflow": self.overflow,
        }
        if kind == "mlp.hook_post":
            rate = self.fire_count / n
            out["firing_rate_mean"] = float(rate.mean())
            out["dead_neuron_fraction"] = float((self.fire_count == 0).mean())
        return _finite(out)

    def to_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """Flat dict of arrays for safetensors (no pickle)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f"{prefix}{f.name}"] = np.atleast_1d(np.asarray(v))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], prefix: str) -> HookStats:
        kw = {}
        for f in fields(cls):
            v = tensors[f"{prefix}{f.name}"]
            kw[f.name] = v.item() if f.name in ("n", "norm_sum", "overflow") else v
        kw["n"], kw["overflow"] = int(kw["n"]), int(kw["overflow"])
        return cls(**kw)


def _scratch(rows: int, d: int, align: int = 64) -> np.ndarray:
    """A (rows, d) float64 buffer starting on an `align`-byte boundary, so SIMD kernels see the same layout
    in every process (numpy's own allocations are only 16-byte aligned)."""
    nbytes = rows * d * 8
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(np.float64).reshape(rows, d)


class _Accumulator:
    """Running statistics over chunks of rows; chunks are merged with Chan's formula in a fixed order."""

    def __init__(self, d: int, rows: int) -> None:
        self.n = 0
        self.mean, self.m2 = np.zeros(d), np.zeros(d)
        self.hi, self.lo = np.zeros(d), np.zeros(d)  # column max / min (start at 0, like max|x| of no rows)
        self.zero, self.fire = np.zeros(d, np.int64), np.zeros(d, np.int64)
        self.big, self.massive = np.zeros(d, np.int64), np.zeros(d, np.int64)
        self.norms: list[np.ndarray] = []
        self.buf, self.sq = _scratch(rows, d), _scratch(rows, d)

    def add(self, part: np.ndarray, finite_only: bool) -> None:
        c = self.buf[:len(part)]
        np.copyto(c, part)  # the one float64 conversion; everything below reads the cached chunk
        # token norms: exact squares, then a per-row pairwise sum (order fixed by d alone)
        sq = np.add.reduce(np.multiply(c, c, out=self.sq[:len(c)]), axis=1)
        if finite_only and not np.isfinite(sq).all():  # a row's sum of squares is finite iff all its values are
            ok = np.isfinite(sq)
            c, sq = self.buf[:int(ok.sum())], sq[ok]
            c[:] = part[ok]  # compact in place: stays in the aligned buffer
        m = len(c)
        if m == 0:
            return
        self.norms.append(np.sqrt(sq))
        hi, lo = c.max(axis=0), c.min(axis=0)
        np.maximum(self.hi, hi, out=self.hi)
        np.minimum(self.lo, lo, out=self.lo)
        if not (np.maximum(hi, -lo) <= MASSIVE_ABS).all():  # rare: something large (or nan) in this chunk
            self._large(c)
        # <= 255 rows: count in uint8 without a cast, then widen
        self.zero += np.add.reduce((c == 0).view(np.uint8), axis=0, dtype=np.uint8)
        self.fire += np.add.reduce((c > 0).view(np.uint8), axis=0, dtype=np.uint8)
        self._merge_moments(c, m)

    def _merge_moments(self, c: np.ndarray, m: int) -> None:
        """Exact two-pass mean/M2 of the chunk (it is in cache), merged into the running totals (Chan)."""
        mu = np.add.reduce(c, axis=0) / m
        np.subtract(c, mu, out=c)
        m2 = np.add.reduce(np.multiply(c, c, out=c), axis=0)
        tot = self.n + m
        delta = mu - self.mean
        self.mean += delta * (m / tot)
        self.m2 += m2 + delta * delta * (self.n * m / tot)
        self.n = tot

    def _large(self, c: np.ndarray) -> None:
        ax = np.abs(c)
        big = ax > MASSIVE_ABS
        self.big += big.sum(axis=0)
        rows = np.flatnonzero(big.any(axis=1))
        if rows.size:  # the per-token median is only needed where something is large
            med = np.median(ax[rows], axis=1, keepdims=True)
            self.massive += (big[rows] & (ax[rows] > MASSIVE_RATIO * med)).sum(axis=0)

    def result(self, overflow: int) -> HookStats:
        norms = np.concatenate(self.norms) if self.norms else np.zeros(0)
        return HookStats(
            self.n, self.mean, self.m2, np.maximum(self.hi, -self.lo) + 0.0, self.zero, self.fire, self.massive,
            self.big, np.bincount(np.searchsorted(NORM_EDGES, norms), minlength=len(NORM_EDGES) + 1),
            math.fsum(norms.tolist()), overflow,  # fsum: exactly rounded, independent of order
        )


def _finite(d: dict[str, float | int]) -> dict[str, float | int | None]:
    """JSON has no inf/nan: record them as None."""
    return {k: (v if isinstance(v, int) or np.isfinite(v) else None) for k, v in d.items()}
