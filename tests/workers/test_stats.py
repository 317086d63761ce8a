"""HookStats.from_rows: chunked float64 statistics equal a numpy float64 reference and are bit-reproducible."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from actstore.workers.dtypes import decode
from actstore.workers.stats import MASSIVE_ABS, MASSIVE_RATIO, NORM_EDGES, HookStats


def _block(n: int = 1000, d: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) * 3 + 20  # offset mean: M2 must not cancel
    x[:, 5] = 0.0  # a dead dimension
    x[rng.random((n, d)) < 0.05] = 0.0
    x[7] = 0.5
    x[7, 3] = 5000.0  # a massive activation (row median 0.5) ...
    x[9, 4] = -150.0  # ... and a large one that is not (|x| < 1000 x the row median)
    return x


def _bytes(st: HookStats) -> bytes:
    return b"".join(v.tobytes() for v in st.to_tensors("").values())


def _misaligned(x: np.ndarray, offset: int) -> np.ndarray:
    raw = np.empty(x.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[:] = x
    return out


def test_equals_float64_reference():
    x = _block()
    st = HookStats.from_rows(x)
    r = x.astype(np.float64)
    ax = np.abs(r)
    np.testing.assert_allclose(st.mean, r.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.var, r.var(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(st.max_abs, ax.max(0))
    np.testing.assert_array_equal(st.zero_count, (r == 0).sum(0))
    np.testing.assert_array_equal(st.fire_count, (r > 0).sum(0))
    np.testing.assert_array_equal(st.big_count, (ax > MASSIVE_ABS).sum(0))
    massive = (ax > MASSIVE_ABS) & (ax > MASSIVE_RATIO * np.median(ax, axis=1, keepdims=True))
    np.testing.assert_array_equal(st.massive_count, massive.sum(0))
    assert st.massive_count.sum() == 1 and st.big_count.sum() == 2
    norms = np.linalg.norm(r, axis=1)
    assert st.norm_sum == pytest.approx(norms.sum(), rel=1e-13)
    np.testing.assert_array_equal(st.norm_hist, np.bincount(np.searchsorted(NORM_EDGES, norms),
                                                            minlength=len(NORM_EDGES) + 1))


def test_keep_mask_finite_only_and_decode():
    x = _block(600, 40)
    keep = np.arange(600) % 7 != 0
    ref = HookStats.from_rows(x[keep])
    assert _bytes(HookStats.from_rows(x, keep=keep)) == _bytes(ref)
    h = x.astype(np.float16)
    h[[10, 11, 300], [0, 2, 9]] = [np.inf, -np.inf, np.nan]
    fin = np.isfinite(h).all(1)
    got = HookStats.from_rows(h, 3, keep=keep, finite_only=True)
    assert got.n == int((keep & fin).sum()) and got.overflow == 3
    ref = HookStats.from_rows(h[keep & fin])  # chunks hold other rows here: equal up to rounding
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-13)
    np.testing.assert_allclose(got.m2, ref.m2, rtol=1e-12)
    for f in ("max_abs", "zero_count", "fire_count", "big_count", "norm_hist"):
        np.testing.assert_array_equal(getattr(got, f), getattr(ref, f))
    assert got.norm_sum == ref.norm_sum  # fsum of the same norms: exact
    bits = (np.ascontiguousarray(x).view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bit patterns
    via = HookStats.from_rows(bits, decode=lambda p: decode(p, "bfloat16"))
    assert _bytes(via) == _bytes(HookStats.from_rows(decode(bits, "bfloat16")))


def test_empty_rows():
    st = HookStats.from_rows(np.zeros((0, 8), np.float32))
    assert _bytes(st) == _bytes(HookStats.empty(8))


@pytest.mark.parametrize("offset", [4, 8, 24, 36])
def test_bit_identical_across_memory_alignment(offset):
    x = _block(2000, 384, seed=1)
    assert _bytes(HookStats.from_rows(_misaligned(x, offset))) == _bytes(HookStats.from_rows(_misaligned(x, 0)))


def test_bit_identical_across_processes():
    code = ("import hashlib, numpy as np; from actstore.workers.stats import HookStats; "
            "x = (np.random.default_rng(3).standard_normal((3000, 384)) * 4).astype(np.float32); "
            "st = HookStats.from_rows(x, keep=np.arange(3000) % 5 != 0); "
            "print(hashlib.sha256(b''.join(v.tobytes() for v in st.to_tensors('').values())).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    x = (np.random.default_rng(3).standard_normal((3000, 384)) * 4).astype(np.float32)
    here = hashlib.sha256(_bytes(HookStats.from_rows(x, keep=np.arange(3000) % 5 != 0))).hexdigest()
    assert runs == {here + "\n"}
