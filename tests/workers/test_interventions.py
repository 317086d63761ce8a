"""Edit kernels: each mode's defining property, checked in float64 on random tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.schemas.errors import ConfigError
from actstore.workers.interventions import Edit, edited, orthonormal, position_mask, scatter_rows


@pytest.fixture
def h():
    return torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0))


def test_orthonormal_keeps_each_rows_sign_and_span():
    v = np.random.default_rng(0).standard_normal((3, 16))
    q = orthonormal(v).double().numpy()
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-6)
    assert q[0] @ v[0] > 0 and np.allclose(q[0], v[0] / np.linalg.norm(v[0]), atol=1e-6)
    proj = v @ q.T @ q  # every row lies in the span
    np.testing.assert_allclose(proj, v, atol=1e-5)
    with pytest.raises(ConfigError, match="linearly dependent"):
        orthonormal(np.stack([v[0], 2 * v[0]]))


def test_modes(h):
    v = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    q = orthonormal(v)
    x = h.double()
    ablated = edited(h, Edit("ablate", 1.0, basis=q)).double()
    np.testing.assert_allclose((ablated @ q.double().T).numpy(), 0, atol=1e-5)  # no component left in the span
    np.testing.assert_allclose((x - ablated - (x @ q.double().T) @ q.double()).numpy(), 0, atol=1e-5)
    clamped = edited(h, Edit("clamp", 1.0, basis=q, value=2.5)).double()
    np.testing.assert_allclose((clamped @ q.double().T).numpy(), 2.5, atol=1e-5)
    half = edited(h, Edit("clamp", 0.5, basis=q, value=2.5)).double()
    np.testing.assert_allclose(half.numpy(), ((x + clamped) / 2).numpy(), atol=1e-5)
    added = edited(h, Edit("add", -1.5, vectors=v)).double()
    np.testing.assert_allclose((added - x).numpy(), np.broadcast_to(-1.5 * v.double().sum(0).numpy(), x.shape),
                               atol=1e-5)
    assert torch.equal(edited(h, Edit("zero", 1.0)), torch.zeros_like(h))
    mean = torch.randn(16)
    assert torch.equal(edited(h, Edit("mean", 1.0, mean=mean)), mean.expand_as(h))
    src = torch.randn_like(h)
    assert torch.equal(edited(h, Edit("patch", 1.0, source=src)), src)
    only_span = edited(h, Edit("patch", 1.0, source=src, basis=q)).double()
    np.testing.assert_allclose((only_span @ q.double().T).numpy(), (src.double() @ q.double().T).numpy(), atol=1e-5)
    np.testing.assert_allclose((only_span - only_span @ q.double().T @ q.double()).numpy(),
                               (x - x @ q.double().T @ q.double()).numpy(), atol=1e-5)


def test_scale_zero_is_identity_and_positions_restrict(h):
    for e in (Edit("zero", 0.0), Edit("add", 0.0, vectors=torch.ones(1, 16))):
        assert edited(h, e) is h
    where = position_mask([7, 4, 2], [0, -1], 7)
    assert where.tolist()[1] == [True, False, False, True, False, False, False]
    out = edited(h, Edit("zero", 1.0, where=where))
    assert torch.equal(out[~where], h[~where]) and torch.equal(out[where], torch.zeros_like(out[where]))
    half = edited(h.half(), Edit("zero", 0.5))
    assert half.dtype == torch.float16


def test_scatter_rows_lays_stored_rows_out_like_the_batch():
    rows = np.arange(20, dtype=np.float32).reshape(10, 2)
    out = scatter_rows(rows, [6, 0], [4, 6], 6)
    assert out[0, :4].tolist() == rows[6:10].tolist() and out[0, 4:].abs().sum() == 0
    assert out[1].tolist() == rows[0:6].tolist()
