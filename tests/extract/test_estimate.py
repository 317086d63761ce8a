"""`actstore plan` predicts a real extraction's size, shards and objects, scales throughput by GPU count, and
refuses when the output disk is too small."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple

import numpy as np
import pytest

import actstore
from actstore.pipeline.extract.estimate import config_dims, format_plan, plan, stored_array_bytes
from tests.support import extract_local

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"


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
    fixed = res["fixed_costs"]
    assert set(fixed) == {"startup_s", "planning_s", "model_load_s", "ray_start_s"} and fixed["ray_start_s"] == 0
    assert all(v >= 0 for v in fixed.values()) and fixed["startup_s"] > 0 and fixed["model_load_s"] > 0
    assert cal["tokens"] > 0
    assert res["wall_time_s"] == pytest.approx(sum(fixed.values()) + res["tokens"] / cal["tokens_per_s"])
    assert "total" in format_plan(res) and "model load" in format_plan(res)
    assert not list((tmp_path).glob("actstore-plan-*"))  # the calibration shard went to a temporary folder


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
    """A 20000-row float32 shard of width 128 is cut into 3 chunks of 6667 rows: the last one is padded, and
    every chunk ends with its 4-byte crc32c."""
    x = np.random.default_rng(0).standard_normal((20000, 128)).astype(np.float32)
    actstore.from_arrays({H0: x}, str(tmp_path / "s"), shard_tokens=20000)
    chunks = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "s" / "shards") for f in fs
              if os.sep + "c" + os.sep in os.path.join(d, f)]
    want, n_chunks = stored_array_bytes(20000, 128, "float32")
    assert n_chunks == len(chunks) == 3 and want == 3 * (6667 * 128 * 4 + 4) > x.nbytes
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
    assert b["token_outputs_bytes"] == a["tokens"] * (12 + 8 * 4)
    # the rest differs only by the config recorded in manifest.json
    assert 0 <= b["total_bytes"] - a["total_bytes"] - b["token_outputs_bytes"] < 200 and b["bytes_are_upper_bound"]
