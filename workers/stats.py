"""Online per-hook statistics that merge exactly across shards (Chan et al. parallel mean/variance).

Computed in float64 over the *stored* values of non-special tokens, so merged results equal numpy statistics
of the stored array restricted to the same rows. Token-norm quantiles come from a fixed log-spaced histogram
(mergeable; relative error bounded by one bin width, ~1.4%) because exact quantiles cannot be merged in O(d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

# Norm histogram: 1024 log-spaced bins over [1e-4, 1e8]; values outside go to the end bins.
NORM_EDGES = np.logspace(-4, 8, 1025)
MASSIVE_ABS = 100.0  # |x| above this ...
MASSIVE_RATIO = 1000.0  # ... and above this multiple of the token's median |x| is a "massive activation"
_BLOCK = 8192  # rows per float64 block: bounds the temporary memory


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
    def from_rows(cls, x: np.ndarray, overflow: int = 0) -> HookStats:
        """Statistics of rows `x` (n, d) — callers pass only the rows that count (non-special tokens)."""
        out = cls.empty(x.shape[1])
        for start in range(0, x.shape[0], _BLOCK):
            out = out.merge(_block_stats(np.asarray(x[start:start + _BLOCK], dtype=np.float64)))
        out.overflow = overflow
        return out

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


def _block_stats(x: np.ndarray) -> HookStats:
    n, d = x.shape
    mean = x.mean(axis=0) if n else np.zeros(d)
    ax = np.abs(x)
    # Bit-reproducible reductions: numpy's SIMD/pairwise sums along a *contiguous* axis depend on memory
    # alignment, which varies between runs. Squares are laid out column-major so the per-row sum runs over
    # the non-contiguous axis (plain sequential adds), and the scalar total uses the exactly rounded fsum.
    norms = np.sqrt(np.square(x, order="F").sum(axis=1))
    big = ax > MASSIVE_ABS
    massive = np.zeros(d, np.int64)
    rows = np.flatnonzero(big.any(axis=1))
    if rows.size:  # the per-token median is only needed where something is large
        med = np.median(ax[rows], axis=1, keepdims=True)
        massive = (big[rows] & (ax[rows] > MASSIVE_RATIO * med)).sum(axis=0)
    return HookStats(
        n, mean, ((x - mean) ** 2).sum(axis=0), ax.max(axis=0, initial=0.0), (x == 0).sum(axis=0),
        (x > 0).sum(axis=0), massive.astype(np.int64), big.sum(axis=0),
        np.bincount(np.searchsorted(NORM_EDGES, norms), minlength=len(NORM_EDGES) + 1), math.fsum(norms.tolist()),
    )


def _finite(d: dict[str, float | int]) -> dict[str, float | int | None]:
    """JSON has no inf/nan: record them as None."""
    return {k: (v if isinstance(v, int) or np.isfinite(v) else None) for k, v in d.items()}
