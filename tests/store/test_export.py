"""Slice export (npy, safetensors, parquet) equals the store's rows; bad ranges are refused."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

import actstore
from actstore.pipeline.store.export import export_slice, parse_rows

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"
N = 1000
TOKEN_COLS = ("token_id", "doc_id", "seq_id", "position", "special")


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def store(request, tmp_path_factory):
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((N, 12)).astype(np.float32) * 5).to(getattr(torch, request.param))
    tokens = {"token_id": np.arange(N) % 311, "doc_id": np.arange(N) // 90, "seq_id": np.arange(N) // 30,
              "position": np.arange(N) % 30, "special": np.arange(N) % 30 == 0}
    return actstore.from_arrays({H0: x}, str(tmp_path_factory.mktemp(request.param) / "s"), tokens=tokens,
                                shard_tokens=300)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


@pytest.mark.parametrize("rows", [(250, 910), (0, N), (400, 400)])
def test_export_formats_equal_slice(store, tmp_path, rows):
    a, b = rows
    want = store.activations(H0)[a:b].compute()
    tok = store.tokens().slice(a, b - a)
    info = export_slice(store, H0, rows, "npy", tmp_path / "x.npy")
    got = np.load(tmp_path / "x.npy")
    assert info["shape"] == [b - a, 12] and got.dtype == want.dtype
    np.testing.assert_array_equal(_bits(got), _bits(want))

    export_slice(store, H0, rows, "safetensors", tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        acts = f.get_tensor("activations")
        assert f.metadata()["hook"] == H0 and f.metadata()["rows"] == f"{a}:{b}"
        stored = store.manifest.hook(H0).dtype
        assert acts.dtype == getattr(torch, stored)  # the stored dtype, bfloat16 included
        np.testing.assert_array_equal(_bits(acts.float().numpy()), _bits(want.astype(np.float32)))
        for c in TOKEN_COLS:
            np.testing.assert_array_equal(f.get_tensor(c).numpy(), tok.column(c).to_numpy(zero_copy_only=False))

    export_slice(store, H0, rows, "parquet", tmp_path / "x.parquet")
    t = pq.read_table(tmp_path / "x.parquet")
    assert t.schema.field("activations").type.list_size == 12
    vals = t.column("activations").combine_chunks().flatten().to_numpy().reshape(-1, 12)
    assert vals.dtype == want.dtype
    np.testing.assert_array_equal(_bits(vals), _bits(want))
    assert t.select(list(TOKEN_COLS)).equals(tok.select(list(TOKEN_COLS)))


def test_export_refuses_bad_input(store, tmp_path):
    with pytest.raises(ValueError, match="outside"):
        export_slice(store, H0, (10, N + 1), "npy", tmp_path / "x.npy")
    with pytest.raises(ValueError, match="format"):
        export_slice(store, H0, (0, 5), "csv", tmp_path / "x.csv")
    with pytest.raises(actstore.HookNameError, match="not in this store"):
        export_slice(store, "blocks.7.hook_resid_post", (0, 5), "npy", tmp_path / "x.npy")


def test_parse_rows():
    assert parse_rows("10:20", 100) == (10, 20)
    assert parse_rows(":5", 100) == (0, 5) and parse_rows("90:", 100) == (90, 100)
    assert parse_rows("-10:", 100) == (90, 100) and parse_rows(None, 7) == (0, 7)
    for bad in ("10", "a:b", "50:10", "5:5", "200:"):
        with pytest.raises(ValueError, match="--rows"):
            parse_rows(bad, 100)


def test_exports_carry_char_spans_when_the_store_has_them(tiny, tmp_path, store):
    """An extracted store's character spans travel with the rows; a store without them exports the index only."""
    from tests.support import corpus_texts, extract_local

    hook = "blocks.0.hook_resid_post"
    st = extract_local(tiny("gpt2"), tmp_path / "s", [hook], corpus_texts(6), shard_tokens=64)
    a, b = 10, st.n_tokens - 5
    want = st.tokens().slice(a, b - a)
    export_slice(st, hook, (a, b), "parquet", tmp_path / "x.parquet")
    t = pq.read_table(tmp_path / "x.parquet")
    export_slice(st, hook, (a, b), "safetensors", tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), framework="np") as f:
        for c in ("char_start", "char_end"):
            np.testing.assert_array_equal(t.column(c).to_numpy(), want.column(c).to_numpy())
            np.testing.assert_array_equal(f.get_tensor(c), want.column(c).to_numpy())
    assert (want.column("char_end").to_numpy() > 0).any()
    export_slice(store, H0, (0, 50), "parquet", tmp_path / "plain.parquet")
    assert "char_start" not in pq.read_table(tmp_path / "plain.parquet").column_names
