"""Multi-store views: compatible stores concatenate row-wise (activations, tokens with a store column, loader,
adapters, export); mismatched widths, dtypes or (strict) hook sets are refused with a one-line message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import actstore
from actstore.pipeline.store.export import export_slice
from actstore.pipeline.store.multistore import open_stores

H0, H1, H2 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"


def _make(path, n: int, first: float, widths: dict[str, int], dtype=np.float32, shard_tokens: int = 200):
    """Row i of every hook holds first + i, so rows identify themselves after concatenation."""
    arrays = {h: (first + np.arange(n, dtype=np.float32))[:, None].repeat(d, 1).astype(dtype) for h, d in widths.items()}
    tokens = {"doc_id": np.arange(n) // 40, "special": np.arange(n) % 40 == 0}
    return actstore.from_arrays(arrays, str(path), tokens=tokens, shard_tokens=shard_tokens)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    a = _make(root / "a", 700, 0, {H0: 6, H1: 6, H2: 3})
    b = _make(root / "b", 500, 700, {H1: 6, H0: 6})
    return a, b


def test_matched_stores_concatenate(pair):
    a, b = pair
    view = open_stores([a.url, b.url])
    assert view.hooks == [H0, H1] and view.n_tokens == 1200 and len(view.manifest.shards) == 7
    for h in view.hooks:
        np.testing.assert_array_equal(view.activations(h).compute(),
                                      np.concatenate([a.activations(h).compute(), b.activations(h).compute()]))
    tok = view.tokens()
    assert tok.num_rows == 1200
    np.testing.assert_array_equal(tok.column("store").to_numpy(), np.repeat([0, 1], [700, 500]))
    np.testing.assert_array_equal(tok.column("doc_id").to_numpy()[700:], b.tokens().column("doc_id").to_numpy())
    assert view.store_of_row(699) == (0, 699) and view.store_of_row(700) == (1, 0)
    assert view.docs().column("store").to_numpy().tolist() == [0] * 18 + [1] * 13


def test_loader_and_adapters_span_stores(pair, tmp_path):
    view = open_stores(list(pair))
    rows = torch.cat([x[:, 0] for x in view.loader(H0, 64, seed=1)]).long().numpy()
    assert sorted(rows.tolist()) == list(range(1200))
    it = view.torch_dataset([H0, H1], kind="iterable", batch_size=50, seed=2, window_chunks=2, with_row_ids=True)
    got = [batch for batch in DataLoader(it, batch_size=None, num_workers=2)]
    ids = torch.cat([g["row"] for g in got]).numpy()
    assert sorted(ids.tolist()) == list(range(1200))
    np.testing.assert_array_equal(torch.cat([g[H1][:, 0] for g in got]).numpy(), ids.astype(np.float32))
    ds = view.torch_dataset(H0)
    assert float(ds[699][0]) == 699 and float(ds[700][0]) == 700
    xa = view.to_xarray()
    np.testing.assert_array_equal(xa["store"].values, np.repeat([0, 1], [700, 500]))
    export_slice(view, H1, (650, 760), "npy", tmp_path / "x.npy")  # crosses from store a into store b
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy")[:, 0], np.arange(650, 760, dtype=np.float32))


def test_mismatched_dims_refused(pair, tmp_path):
    a, _ = pair
    c = _make(tmp_path / "c", 100, 0, {H0: 6, H1: 8})
    with pytest.raises(ValueError) as e:
        open_stores([a, c])
    msg = str(e.value)
    assert "\n" not in msg and H1 in msg and "d=6" in msg and "d=8" in msg


def test_mismatched_dtype_refused(pair, tmp_path):
    a, _ = pair
    c = _make(tmp_path / "c", 100, 0, {H0: 6}, dtype=np.float16)
    with pytest.raises(ValueError, match=r"float32 .* float16"):
        open_stores([a, c])


def test_hook_sets_strict_and_no_shared_hook(pair, tmp_path):
    a, b = pair
    with pytest.raises(ValueError, match=f"{H2} only in"):
        open_stores([a, b], strict=True)
    assert open_stores([b, b], strict=True).n_tokens == 1000
    c = _make(tmp_path / "c", 100, 0, {"blocks.5.hook_resid_post": 6})
    with pytest.raises(ValueError, match="share no hook"):
        open_stores([a, c])
    with pytest.raises(actstore.HookNameError, match="not in every store"):
        open_stores([a, b]).activations(H2)
