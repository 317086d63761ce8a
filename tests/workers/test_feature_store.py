"""encode_topk equals each SAE architecture's own dense encode, and shards round-trip through plain zarr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from actstore.workers import storage
from actstore.workers.feature_store import encode_topk, read_codes, read_record, write_codes_shard
from actstore.workers.sae.model import SAEConfig, SparseAutoencoder


def _dense_from(ids: np.ndarray, vals: np.ndarray, d_sae: int) -> np.ndarray:
    out = np.zeros((len(ids), d_sae), np.float32)
    r, c = np.nonzero(ids >= 0)
    out[r, ids[r, c]] = vals[r, c]
    return out


@pytest.mark.parametrize("arch,k", [("topk", 6), ("topk", 10), ("relu", 64), ("jumprelu", 64), ("batchtopk", 8)])
def test_codes_equal_the_sae_encode(arch, k):
    sae = SparseAutoencoder(SAEConfig(d_in=16, expansion=4, k=6, architecture=arch), seed=0).eval()
    with torch.no_grad():
        sae.b_enc.add_(0.1)
        if arch == "batchtopk":
            sae.running_threshold.fill_(0.05)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    ids, vals = encode_topk(sae, x, k)
    assert ids.shape == (200, k) and ids.dtype == np.int32 and vals.dtype == np.float16
    with torch.no_grad():
        ref = sae.encode(x).numpy()
    if k >= (ref > 0).sum(1).max():  # every active latent fits: the codes are the SAE's, exactly (in float16)
        np.testing.assert_allclose(_dense_from(ids, vals, 64), ref.astype(np.float16), rtol=0, atol=0)
    assert (np.diff(vals.astype(np.float32), axis=1) <= 0).all()
    assert ((ids >= 0) == (vals > 0)).all()


def test_shard_round_trip(tmp_path):
    fs, root = storage.get_fs(str(tmp_path / "f"))
    ids = np.array([[3, 1], [-1, -1], [0, -1]], np.int32)
    vals = np.array([[2.0, 1.0], [0, 0], [0.5, 0]], np.float16)
    rec = write_codes_shard(fs, root, "000000000", b"PAR1-not-really", ids, vals, {"token_start": 0})
    assert read_record(fs, root, "000000000") == rec
    got = read_codes(fs, root, "000000000")
    assert np.array_equal(got[0], ids) and np.array_equal(got[1], vals)
    g = zarr.open_group(str(tmp_path / "f" / "shards" / "000000000" / "codes.zarr"), mode="r")
    assert g["latent_values"].dtype == np.float16 and g.attrs["k"] == 2
    assert not (tmp_path / "f" / "shards" / ".tmp").exists() or not any((tmp_path / "f" / "shards" / ".tmp").iterdir())
