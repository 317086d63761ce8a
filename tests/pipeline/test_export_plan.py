"""Slice export (npy, safetensors, parquet) equals the store's rows; `plan` predicts a real extraction's size,
shards and objects, scales throughput by GPU count, and refuses when the output disk is too small."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import extract_local
from safetensors import safe_open

import actstore
from actstore.pipeline.export import export_slice, parse_rows
from actstore.pipeline.planner import config_dims, format_plan, plan, stored_array_bytes

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
    with pytest.raises(KeyError):
        export_slice(store, "blocks.7.hook_resid_post", (0, 5), "npy", tmp_path / "x.npy")


def test_parse_rows():
    assert parse_rows("10:20", 100) == (10, 20)
    assert parse_rows(":5", 100) == (0, 5) and parse_rows("90:", 100) == (90, 100)
    assert parse_rows("-10:", 100) == (90, 100) and parse_rows(None, 7) == (0, 7)
    assert parse_rows("50:10", 100) == (50, 50)
    for bad in ("10", "a:b"):
        with pytest.raises(ValueError, match="--rows"):
            parse_rows(bad, 100)


# ---- plan ---------------------------------------------------------------------------------------------------
def _cfg(tiny, texts, out) -> dict:
    return {"model": tiny("gpt2"), "corpus": texts[:5], "hooks": [H0, H1], "output": str(out), "executor": "local",
            "progress": False, "context_length": 32, "shard_tokens": 512, "batch_size": 8}


def _du(root) -> tuple[int, int]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return sum(os.path.getsize(f) for f in files), len(files)


def test_plan_matches_real_extraction(tiny, texts, tmp_path):
    cfg = _cfg(tiny, texts, tmp_path / "store")
    res = plan(cfg, calibration_batches=2)
    assert res["ok"] and res["reason"] is None
    store = extract_local(cfg["model"], cfg["output"], cfg["hooks"], cfg["corpus"], context_length=32,
                          shard_tokens=512, batch_size=8)
    size, n_files = _du(tmp_path / "store")
    assert abs(res["total_bytes"] - size) <= 0.05 * size, (res["total_bytes"], size)
    assert res["tokens"] == store.n_tokens and res["shards"] == len(store.manifest.shards)
    assert res["objects"] == n_files
    assert {h: v["d"] for h, v in res["hooks"].items()} == {h.name: h.d for h in store.manifest.hooks}
    arrays = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "store") for f in fs
                 if os.sep + "c" + os.sep in os.path.join(d, f))
    assert sum(v["array_bytes"] for v in res["hooks"].values()) == arrays  # chunk padding included exactly
    assert res["disk"]["required_bytes"] == res["total_bytes"] and res["disk"]["free_bytes"] > 0
    cal = res["calibration"]
    assert cal["tokens"] > 0 and res["wall_time_s"] == pytest.approx(res["tokens"] / cal["tokens_per_s"])
    assert "total" in format_plan(res)


def test_plan_scales_by_gpus_and_config_dims(tiny, texts, tmp_path):
    cfg = _cfg(tiny, texts, tmp_path / "out")
    res = plan(cfg, gpus=4, calibration_batches=1)
    assert res["workers"] == 4 and res["tokens_per_s"] == pytest.approx(4 * res["calibration"]["tokens_per_s"])
    quick = plan(cfg, calibrate=False)  # widths from the model config, no weights loaded
    assert quick["calibration"] is None and quick["wall_time_s"] is None
    assert quick["total_bytes"] == res["total_bytes"]
    from transformers import AutoConfig

    assert config_dims([H0, H1, "module:h.0"], AutoConfig.from_pretrained(cfg["model"])) is None
    assert not os.path.exists(tmp_path / "out")  # planning writes nothing


def test_plan_refuses_when_disk_too_small(tiny, texts, tmp_path, monkeypatch):
    cfg = _cfg(tiny, texts, tmp_path / "out")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    res = plan(cfg, calibrate=False)
    assert res["ok"] is False and res["disk"]["free_bytes"] == 1000
    assert "free" in res["reason"] and "needs" in res["reason"] and "\n" not in res["reason"]
    assert "NOT OK" in format_plan(res)


def test_array_bytes_include_edge_chunk_padding(tmp_path):
    """A 20000-row float32 shard of width 128 is cut into 3 chunks of 6667 rows: the last one is padded."""
    x = np.random.default_rng(0).standard_normal((20000, 128)).astype(np.float32)
    actstore.from_arrays({H0: x}, str(tmp_path / "s"), shard_tokens=20000)
    chunks = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "s" / "shards") for f in fs
              if os.sep + "c" + os.sep in os.path.join(d, f)]
    want, n_chunks = stored_array_bytes(20000, 128, "float32")
    assert n_chunks == len(chunks) == 3 and want == 3 * 6667 * 128 * 4 > x.nbytes
    assert sum(os.path.getsize(c) for c in chunks) == want


def test_plan_of_append_runs(tiny, texts, tmp_path):
    """append configs are planned as what they add; the store being grown is not refused as foreign output."""
    out = tmp_path / "store"
    extract_local(tiny("gpt2"), out, [H0], texts[:5], context_length=32, shard_tokens=512, batch_size=8)
    before, _ = _du(out)
    cfg = {**_cfg(tiny, texts, out), "hooks": [H1], "append": "hooks"}
    res = plan(cfg, calibrate=False)
    assert res["ok"] and res["append"] == "hooks"
    actstore.extract(cfg)
    added = _du(out)[0] - before
    assert res["hooks"][H1]["array_bytes"] <= added <= res["total_bytes"]  # new arrays exact, the rest a bound
    more = {**_cfg(tiny, texts[5:8], out), "hooks": [H0, H1], "corpus": texts[5:8], "append": "tokens"}
    res = plan(more, calibrate=False)
    assert res["append"] == "tokens" and res["documents"] == 3


def test_plan_counts_token_outputs(tiny, texts, tmp_path):
    base = _cfg(tiny, texts, tmp_path / "s")
    a = plan(base, calibrate=False)
    b = plan({**base, "token_outputs": {"topk": 4}}, calibrate=False)
    assert b["token_outputs_bytes"] == a["tokens"] * (4 + 8 * 4)
    # the rest differs only by the config recorded in manifest.json
    assert 0 <= b["total_bytes"] - a["total_bytes"] - b["token_outputs_bytes"] < 200 and b["bytes_are_upper_bound"]
