"""Store format v1: dtypes, verification, commit semantics, fsspec backends, manifest schema, statistics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

import actstore
from actstore.pipeline.store.multistore import open_stores
from actstore.pipeline.store.store import StoreError
from actstore.workers.dtypes import Float16OverflowError
from tests.support import extract_local

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


@pytest.fixture(scope="module")
def f32_store(tmp_path_factory, tiny, texts):
    return extract_local(tiny("gpt2"), tmp_path_factory.mktemp("f32") / "s", HOOKS, texts[:6])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_round_trip(tmp_path, tiny, texts, f32_store, dtype):
    store = extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:6], dtype=dtype)
    for h in HOOKS:
        ref = torch.from_numpy(f32_store.activations(h).compute()).to(getattr(torch, dtype)).float().numpy()
        got = store.activations(h).compute()
        assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
        np.testing.assert_array_equal(got.astype(np.float32), ref)
    arr = store.shard_array(0, HOOKS[0])
    assert arr.dtype == (np.uint16 if dtype == "bfloat16" else np.float16) and arr.attrs["actstore_dtype"] == dtype
    assert store.manifest.hook(HOOKS[0]).dtype == dtype


def test_from_arrays_bfloat16_lossless(tmp_path):
    x = torch.randn(300, 8).to(torch.bfloat16)
    store = actstore.from_arrays({"blocks.0.hook_resid_post": x}, str(tmp_path / "s"), shard_tokens=128)
    assert store.manifest.hooks[0].dtype == "bfloat16" and len(store.manifest.shards) == 3
    np.testing.assert_array_equal(store.activations("blocks.0.hook_resid_post").compute(), x.float().numpy())


@pytest.fixture(scope="module")
def huge_model(tmp_path_factory, tiny):
    """A tiny GPT-2 whose embeddings are scaled far beyond float16's range."""
    import transformers as T

    src = tiny("gpt2")
    model = T.AutoModel.from_pretrained(src)
    with torch.no_grad():
        model.wte.weight.mul_(1e6)
    out = tmp_path_factory.mktemp("huge") / "m"
    model.save_pretrained(out)
    T.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


def test_float16_overflow_is_an_error(tmp_path, huge_model, texts):
    out = tmp_path / "s"
    with pytest.raises(Float16OverflowError, match="beyond float16's range.*bfloat16"):
        extract_local(huge_model, out, ["blocks.0.hook_resid_pre"], texts[:2], dtype="float16")
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="incomplete"):
        actstore.open_store(str(out))


def test_float16_overflow_counted_when_allowed(tmp_path, huge_model, texts):
    store = extract_local(huge_model, tmp_path / "s", ["blocks.0.hook_resid_pre"], texts[:2], dtype="float16",
                          on_overflow="inf")
    x = store.activations("blocks.0.hook_resid_pre").compute()
    n_inf = int(np.isinf(x).sum())
    assert n_inf > 0 and store.manifest.stats["blocks.0.hook_resid_pre"]["n_overflow"] == n_inf


def _chunk_files(root: Path, hook: str) -> list[Path]:
    return sorted((root / "shards").glob(f"*/acts.zarr/{hook}/c/*/*"))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_ordinary_reads_detect_a_flipped_byte(tmp_path, tiny, texts, compression):
    """Every activation chunk carries a crc32c: a changed byte fails every read path with a StoreError naming the
    chunk or shard, instead of returning wrong numbers (raw local reader, Zarr, Dask, numpy, loader)."""
    store = extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:6], compression=compression)
    meta = json.loads((tmp_path / "s" / "shards" / store.manifest.shards[1].id / "acts.zarr" / HOOKS[0] /
                       "zarr.json").read_text())
    assert meta["codecs"][-1] == {"name": "crc32c"}
    chunk = sorted((tmp_path / "s" / "shards" / store.manifest.shards[1].id / "acts.zarr" / HOOKS[0]).glob("c/*/*"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    fresh = actstore.open_store(str(tmp_path / "s"))
    reads = [lambda: fresh.read_rows(HOOKS[0], 1, 0, 2), lambda: fresh.activations(HOOKS[0]).compute(),
             lambda: fresh.to_numpy(HOOKS[0]), lambda: fresh.shard_array(1, HOOKS[0])[:],
             lambda: next(fresh.loader(HOOKS[0], batch_size=10**6))]
    for read in reads:
        with pytest.raises(actstore.StoreError, match="corrupt.*crc32c"):
            read()
    fresh.read_rows(HOOKS[1], 1, 0, 2)  # the other hook of the same shard is intact


def test_checked_chunks_are_not_rechecked_until_they_change(tmp_path, monkeypatch):
    """A scan larger than the map cache re-maps every chunk but checks each unchanged chunk's crc32c once; a
    chunk rewritten after its check (new mtime/ctime) is checked again and its corruption reported."""
    from actstore.pipeline.store import raw_chunks
    from actstore.workers import shard_writer

    monkeypatch.setattr(shard_writer, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(raw_chunks, "_MAX_MAPS", 2)  # far fewer maps than chunks: every scan re-maps
    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    store = actstore.from_arrays({HOOKS[0]: x}, str(tmp_path / "s"), shard_tokens=600)
    chunks = _chunk_files(tmp_path / "s", HOOKS[0])
    assert len(chunks) > 4
    checks: list[str] = []
    real = raw_chunks.check_crc
    monkeypatch.setattr(raw_chunks, "check_crc", lambda data, fname: (checks.append(fname), real(data, fname)))
    for _ in range(3):
        np.testing.assert_array_equal(store.activations(HOOKS[0]).compute(), x)
    assert sorted(checks) == sorted(str(c) for c in chunks)  # each chunk once, over three scans
    data = bytearray(chunks[2].read_bytes())
    data[len(data) // 2] ^= 0x10
    # replaced as a new file (a new inode): the key changes even where file times tick in whole seconds
    chunks[2].with_suffix(".new").write_bytes(bytes(data))
    os.replace(chunks[2].with_suffix(".new"), chunks[2])
    with pytest.raises(actstore.StoreError, match="corrupt.*crc32c"):
        store.activations(HOOKS[0]).compute()
    data[len(data) // 2] ^= 0x10  # repaired: the new file is checked, passes and reads back
    chunks[2].with_suffix(".new").write_bytes(bytes(data))
    os.replace(chunks[2].with_suffix(".new"), chunks[2])
    np.testing.assert_array_equal(store.activations(HOOKS[0]).compute(), x)


def test_shard_arrays_survive_pickling(f32_store):
    """A Dask scheduler unpickles task graphs holding shard arrays: the round trip reads the same values."""
    import pickle

    arr = f32_store.shard_array(0, HOOKS[0])
    back = pickle.loads(pickle.dumps(arr))
    assert back.shape == arr.shape and back.where == arr.where
    np.testing.assert_array_equal(back[:], arr[:])


def test_verify_catches_flipped_byte_and_missing_shard(tmp_path, tiny, texts):
    store = extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:6])
    assert store.verify().ok
    chunk = _chunk_files(tmp_path / "s", HOOKS[0])[1]
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0x01
    chunk.write_bytes(bytes(data))
    rep = actstore.open_store(str(tmp_path / "s")).verify()
    assert not rep.ok and any("checksum" in p and HOOKS[0] in p for p in rep.problems)
    victim = tmp_path / "s" / "shards" / store.manifest.shards[-1].id
    import shutil

    shutil.rmtree(victim)
    rep = actstore.open_store(str(tmp_path / "s")).verify()
    assert any(store.manifest.shards[-1].id in p and "missing" in p for p in rep.problems)


def test_cli_verify_exit_codes(tmp_path, tiny, texts, capsys):
    from actstore.cli import main

    extract_local(tiny("gpt2"), tmp_path / "s", HOOKS[:1], texts[:3])
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.startswith("OK")
    chunk = _chunk_files(tmp_path / "s", HOOKS[0])[0]
    chunk.write_bytes(b"\x00" * chunk.stat().st_size)
    assert main(["verify", str(tmp_path / "s"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and "checksum" in report["problems"][0] and HOOKS[0] in report["problems"][0]


def test_store_without_manifest_is_not_complete(tmp_path, tiny, texts):
    extract_local(tiny("gpt2"), tmp_path / "s", HOOKS[:1], texts[:3])
    os.remove(tmp_path / "s" / "manifest.json")
    with pytest.raises(StoreError, match="no manifest.json"):
        actstore.open_store(str(tmp_path / "s"))


def test_memory_and_file_urls(tmp_path, tiny, texts, f32_store):
    mem = extract_local(tiny("gpt2"), "memory://actstore-test/s1", HOOKS, texts[:6])
    fileurl = extract_local(tiny("gpt2"), f"file://{tmp_path}/s2", HOOKS, texts[:6])
    for s in (mem, fileurl, actstore.open_store("memory://actstore-test/s1")):
        assert s.verify().ok and s.manifest.shards == f32_store.manifest.shards
        np.testing.assert_array_equal(s.activations(HOOKS[1]).compute(), f32_store.activations(HOOKS[1]).compute())


def test_manifest_validates_against_committed_schema(f32_store, tmp_path):
    from actstore.schemas import manifest as m

    schema = json.loads((Path(m.__file__).with_name("manifest.schema.json")).read_text())
    assert schema == json.loads(json.dumps(m.json_schema())), "regenerate: python -m actstore.schemas.manifest"
    doc = json.loads((Path(f32_store.url) / "manifest.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)
    imported = actstore.from_arrays({"blocks.0.hook_resid_pre": np.ones((5, 3), np.float32)}, str(tmp_path / "i"))
    jsonschema.Draft202012Validator(schema).validate(json.loads((Path(imported.url) / "manifest.json").read_text()))
    doc["shards"][0]["n_tokens"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(doc)


def test_token_index_and_docs(f32_store, texts):
    tok = f32_store.tokens()
    assert tok.column_names[:4] == ["token_id", "doc_id", "seq_id", "position"]
    assert [str(tok.schema.field(c).type) for c in tok.column_names[:4]] == ["int32", "int64", "int64", "int32"]
    docs = f32_store.docs()
    assert docs.column("doc_id").to_pylist() == list(range(6))
    counts = np.bincount(tok.column("doc_id").to_numpy(), minlength=6)
    assert docs.column("n_tokens").to_pylist() == counts.tolist()
    # packing: every window starts with BOS, flagged special
    t = tok.to_pandas()
    assert t[t.position == 0].special.all()


def test_merged_stats_equal_numpy(f32_store):
    keep = ~f32_store.special_mask()
    for h in HOOKS:
        x = f32_store.activations(h).compute()[keep].astype(np.float64)
        st = f32_store.stats(h)
        assert st.n == len(x)
        np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(st.var, x.var(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(st.max_abs, np.abs(x).max(0))
        np.testing.assert_array_equal(st.fire_count, (x > 0).sum(0))
        np.testing.assert_array_equal(st.zero_count, (x == 0).sum(0))
        summ = f32_store.manifest.stats[h]
        norms = np.linalg.norm(x, axis=1)
        assert summ["mean_norm"] == pytest.approx(norms.mean(), rel=1e-9)
        assert summ["norm_p50"] == pytest.approx(np.median(norms), rel=0.03)
    assert 0 < f32_store.manifest.stats[HOOKS[1]]["firing_rate_mean"] < 1


def test_import_isolation():
    import subprocess
    import sys

    code = ("import sys, actstore.workers, actstore.schemas, actstore.workers.runner, actstore.workers.shard_task;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('ray','dask','distributed')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_raw_chunk_maps_follow_rewritten_files(tmp_path):
    """Cached chunk maps are keyed by the file's identity: a rewritten store at the same path reads anew."""
    import shutil

    path = str(tmp_path / "re")
    for value in (1.0, 2.0):
        shutil.rmtree(path, ignore_errors=True)
        x = np.full((3000, 8), value, np.float32)
        store = actstore.from_arrays({"blocks.0.hook_resid_post": x}, path, shard_tokens=3000)
        np.testing.assert_array_equal(store.read_rows("blocks.0.hook_resid_post", 0, 0, 10), x[:10])
        np.testing.assert_array_equal(store.activations("blocks.0.hook_resid_post").compute(), x)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_to_numpy_equals_dask_read(tmp_path, monkeypatch, dtype):
    """Store.to_numpy (preallocated, chunk copies from threads) == activations().compute(), many chunks per shard."""
    from actstore.pipeline.store.blocks import chunk_blocks
    from actstore.workers import shard_writer

    monkeypatch.setattr(shard_writer, "CHUNK_BYTES", 1000)  # ~31 float32 rows of width 8 per chunk
    x = np.random.default_rng(3).standard_normal((1000, 8)).astype(np.float32)
    store = actstore.from_arrays({"blocks.0.hook_resid_post": x}, str(tmp_path / "s"), shard_tokens=300, dtype=dtype)
    assert len(chunk_blocks(store, "blocks.0.hook_resid_post")) > 2 * len(store.manifest.shards)
    got = store.to_numpy("blocks.0.hook_resid_post", threads=3)
    ref = store.activations("blocks.0.hook_resid_post").compute()
    assert got.dtype == ref.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, ref)
    view = open_stores([store.url, store.url])  # MultiStore has the same reading surface
    np.testing.assert_array_equal(view.to_numpy("blocks.0.hook_resid_post"), np.concatenate([ref, ref]))
