"""Streaming, exactly mergeable covariance of activation blocks, and the column-permuted covariances of the
permutation null: the accumulation behind `actstore.spectrum` (pure numpy, no Ray/Dask/scipy).

Each block is shifted by an early mean estimate (the mean of the first block seen, or a shift given by the
caller so that partials computed in parallel share it and merge by plain addition) before its `XᵀX` product, so
the products are of the order of the variance, not of mean²: an offset float16 activation (e.g. +100) loses no
precision to cancellation. The products run either in float32 over row blocks (`precision="float32"`) or in
float64, and every block is accumulated in float64 either way.

Permutation null: `permuted_covariances` permutes every column of a set of rows independently (seeded), which
keeps each column's values (its marginal) and destroys the pairing of rows across columns, i.e. all
cross-column dependence, and returns each permuted copy's covariance. The permutation must run over all the
rows at once: permuting within consecutive blocks would keep any correlated drift of the column means from
block to block (documents are stored in order), which on real activations inflates the null's top eigenvalue
far above that of independent columns (measured on MiniLM with 4,096-row blocks: 1.94 against 1.46).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from actstore.schemas.errors import AnalysisError, ConfigError

PRECISIONS = ("float32", "float64")
_BLOCK_ROWS = 8192  # rows per float64 product: bounds the temporary copy of a large incoming block
# Rows per float32 product. With a float32 (not float16-grid) shift the products' rounding errors are unbiased
# and average out: every eigenvalue stays ~1e-8 of the largest from 1,024 to 43,690-row blocks (BENCHMARKS.md
# section 7); long blocks keep the SYRK near peak speed, and one block covers a whole Dask task of `spectrum`.
_F32_BLOCK_ROWS = 16384
_BLOCK_BYTES = 64 << 20  # ...capped so that a block's float32/float64 work array stays this small at large d


def permute_columns(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of the (rows, d) block with every column permuted independently (row-major result)."""
    xt = np.ascontiguousarray(x.T)  # columns contiguous: each is shuffled in cache
    rng.permuted(xt, axis=1, out=xt)
    return np.ascontiguousarray(xt.T)


class CovarianceAccumulator:
    """Streaming covariance of (rows, d) blocks, accumulated in float64 and exactly mergeable.

    State (all float64): `n` rows, `shift` c (an early mean estimate), `sum` = Σ(x - c), `sxx` = Σ(x - c)(x - c)ᵀ.
    `precision="float32"` shifts by the early mean rounded to float32, multiplies blocks of `block_rows` rows in
    float32 (the column sums and the diagonal from 8-row float32 sums added in float64) and adds the blocks in
    float64: every eigenvalue stays within ~1e-8 of the largest one on real and massive activations (at worst
    ~2e-7 on float16 columns quantized to 2 bits per standard deviation). `precision="float64"` multiplies in
    float64 (~1e-14).
    """

    def __init__(self, d: int, precision: str = "float64", block_rows: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if int(d) < 1:
            raise AnalysisError(f"need at least one column, got d={d}")
        self.d = int(d)
        self.precision = precision
        rows, itemsize = (_BLOCK_ROWS, 8) if precision == "float64" else (_F32_BLOCK_ROWS, 4)
        self.block_rows = int(block_rows or max(1024, min(rows, _BLOCK_BYTES // (itemsize * self.d))))
        self.n = 0
        self.shift = np.zeros(self.d)
        self.sum = np.zeros(self.d)
        self.sxx = np.zeros((self.d, self.d))

    def update(self, block: np.ndarray, shift: np.ndarray | None = None) -> CovarianceAccumulator:
        """Add the rows of a (rows, d) float16/float32/float64 block; returns self.

        `shift` fixes the early mean estimate of an empty accumulator (so that partials computed in parallel
        share it and merge by plain addition); by default it is the mean of the first block.
        """
        x = np.asarray(block)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise AnalysisError(f"block must have shape (rows, {self.d}), got {x.shape}")
        if self.n == 0 and x.shape[0]:
            self.shift = self._early_mean(x) if shift is None else self._on_grid(np.asarray(shift, np.float64))
        for start in range(0, x.shape[0], self.block_rows):
            self._add_block(x[start : start + self.block_rows])
        self.n += x.shape[0]
        return self

    def _early_mean(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported by _block_products
            return self._on_grid(x[: self.block_rows].mean(axis=0, dtype=np.float64))

    def _on_grid(self, shift: np.ndarray) -> np.ndarray:
        """The shift the products actually subtract: float32-rounded for float32 products (so the mean
        reconstructed from shift + Σ(x - shift)/n is exact). It must NOT be rounded to float16 for float16 data:
        differences x - c on the float16 grid have few significant bits, and float32 sums of such products
        round with a systematic bias (measured: ~1e-6 of λ_max on the correlation matrix, any block size,
        against ~1e-8 with a full float32 shift)."""
        return shift.astype(np.float32).astype(np.float64) if self.precision == "float32" else shift

    def _add_block(self, x: np.ndarray) -> None:
        y = self._shifted(x)
        if self.precision == "float32":
            s, sq = _column_sums(y)
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                s = y.sum(axis=0, dtype=np.float64)
        if not np.all(np.isfinite(s)):  # an inf/nan would silently poison every later eigenvalue
            raise AnalysisError("block contains non-finite values")
        self.sum += s
        g = y.T @ y  # contiguous y: one SYRK
        self.sxx += g  # float32 products are widened here: blocks accumulate in float64
        if self.precision == "float32":
            # The diagonal (the variances, which also standardise the correlation matrix) from short float32
            # sums of squares added in float64: a float32 SYRK's long sums of same-sign squares drift (up to
            # ~1e-6 relative on coarsely quantized float16 columns), and with independent columns λ_max is such
            # a diagonal entry.
            diag = np.diag_indices(self.d)
            self.sxx[diag] += sq - g[diag]

    def _shifted(self, x: np.ndarray) -> np.ndarray:
        """x - shift in the products' dtype, in a reused buffer."""
        y = _workspace(x.shape[0], self.d, np.float32 if self.precision == "float32" else np.float64)
        c = self.shift.astype(y.dtype)
        if x.dtype == np.float16 and y.dtype == np.float32:
            _half_minus(x, c, y)
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                np.subtract(x, c, out=y)
        return y

    def _centred(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean - shift, scatter about the mean Σ(x - mean)(x - mean)ᵀ)."""
        m = self.sum / self.n
        return m, self.sxx - self.n * np.outer(m, m)

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Absorb `other` (any shift) into self exactly; returns self.

        Combines the mean-centred scatters (Chan et al. 1979): M = M1 + M2 + n1·n2/n·δδᵀ with δ the difference of
        the means, then re-expresses the result around self's shift. Going through the centred form avoids the
        cancellation that translating raw sums between two distant shifts would cause.
        """
        if other.d != self.d:
            raise AnalysisError(f"cannot merge d={other.d} into d={self.d}")
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.shift, self.sum, self.sxx = other.n, other.shift.copy(), other.sum.copy(), other.sxx.copy()
            return self
        n1, n2 = self.n, other.n
        n = n1 + n2
        m1, c1 = self._centred()
        m2, c2 = other._centred()
        delta = (other.shift - self.shift) + (m2 - m1)  # difference of the two means, kept small-first
        scatter = c1 + c2 + (n1 * n2 / n) * np.outer(delta, delta)
        m = m1 + (n2 / n) * delta  # merged mean relative to self.shift
        self.n, self.sum, self.sxx = n, n * m, scatter + n * np.outer(m, m)
        return self

    def finalize(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(mean (d,), covariance (d, d) with denominator n - 1 (unbiased), n), all float64."""
        if self.n < 2:
            raise AnalysisError(f"need at least 2 rows for a covariance, have {self.n}")
        m, scatter = self._centred()
        return self.shift + m, _symmetric(scatter / (self.n - 1)), self.n

    def to_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no pickle of this class needed), e.g. as a Dask task's partial result."""
        return {"n": np.asarray(self.n, np.int64), "shift": self.shift.copy(), "sum": self.sum.copy(),
                "sxx": self.sxx.copy()}

    @classmethod
    def from_dict(cls, state: dict[str, np.ndarray]) -> CovarianceAccumulator:
        """Inverse of `to_dict`."""
        shift = np.asarray(state["shift"], np.float64)
        acc = cls(shift.shape[0])
        acc.n = int(state["n"])
        acc.shift = shift.copy()
        acc.sum = np.asarray(state["sum"], np.float64).copy()
        acc.sxx = np.asarray(state["sxx"], np.float64).copy()
        return acc


_GROUP = 8  # rows per float32 partial sum in `_column_sums`: longer sums of squares drift (64 rows: ~8e-7)
_WORK = threading.local()


def _workspace(rows: int, d: int, dtype: type) -> np.ndarray:
    """A (rows, d) work array reused by every block this thread processes. A fresh ~30 MB array per block
    costs its page faults (first touch of every page): measured at half the SYRK's own time per Dask task,
    since each task builds a new accumulator. One array per thread, at most _BLOCK_BYTES (64 MiB), grown to the
    largest block seen and kept for the thread's next pass; a larger block gets a transient array."""
    if rows * d * np.dtype(dtype).itemsize > _BLOCK_BYTES:  # a caller's larger blocks: not kept after the pass
        return np.empty((rows, d), dtype)
    buf = getattr(_WORK, "buf", None)
    if buf is None or buf.dtype != dtype or buf.shape[1] != d or buf.shape[0] < rows:
        _WORK.buf = None  # drop the old one before allocating its replacement
        buf = _WORK.buf = np.empty((rows, d), dtype)
    return buf[:rows]


def _column_sums(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Σy, Σy²) per column of a float32 block, in float64. Float32 partial sums over groups of _GROUP rows
    (vectorised, no float64 casting loop, no squared copy of the block), added in float64: ~4x faster than
    `y.sum(dtype=float64)` and `(y * y).sum(dtype=float64)`, and the short float32 sums keep the squares'
    relative error below ~1e-7 where a full-length float32 sum drifts to ~1e-6."""
    whole = y.shape[0] - y.shape[0] % _GROUP
    with np.errstate(invalid="ignore", over="ignore"):
        g = y[:whole].reshape(-1, _GROUP, y.shape[1])
        s = g.sum(axis=1).sum(axis=0, dtype=np.float64)
        sq = np.einsum("gij,gij->gj", g, g).sum(axis=0, dtype=np.float64)
        rest = y[whole:].astype(np.float64)
        return s + rest.sum(axis=0), sq + np.square(rest).sum(axis=0)


def _half_minus(x: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    """out = float32(x) - c for float16 x: torch converts half to float with vector instructions, ~5x faster
    than numpy's casting loop, which otherwise costs a fifth of a float32 SYRK's time at d = 768."""
    import torch

    with warnings.catch_warnings():  # x is often a read-only memory map; it is only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        src = torch.from_numpy(np.ascontiguousarray(x))
    dst = torch.from_numpy(out)
    dst.copy_(src)
    dst.sub_(torch.from_numpy(c))


def _symmetric(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2  # symmetrise away last-bit asymmetry of the sums


def merge_partials(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge `to_dict` partials into one (a ready-made combine step for a Dask tree reduction)."""
    if not parts:
        raise AnalysisError("nothing to merge")
    acc = CovarianceAccumulator.from_dict(parts[0])
    for p in parts[1:]:
        acc.merge(CovarianceAccumulator.from_dict(p))
    return acc.to_dict()


def permuted_covariances(rows: np.ndarray, permutations: int, seed: int = 0,
                         precision: str = "float32") -> list[np.ndarray]:
    """Covariance (denominator n - 1) of `permutations` copies of `rows`, each with every column permuted
    independently over all the rows (seeded): the matrices of the permutation null."""
    if permutations < 1:
        raise ConfigError(f"permutations must be >= 1, got {permutations}")
    x = np.asarray(rows)
    rng = np.random.default_rng(seed)
    return [CovarianceAccumulator(x.shape[1], precision).update(permute_columns(x, rng)).finalize()[1]
            for _ in range(permutations)]
