"""Security: no pickle in stores or on load, trust_remote_code stays off, secrets never leak, paths stay inside."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

import actstore
from tests.support import extract_local

HOOK = "blocks.0.hook_resid_post"
SECRET = "PLANTED-secret-8c1f0e77"
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
KNOWN = {".json", ".parquet", ".safetensors"}


def test_store_files_hold_no_pickle(tmp_path, tiny, texts):
    extract_local(tiny("gpt2"), tmp_path / "s", [HOOK, "blocks.1.mlp.hook_post"], texts[:3], dtype="bfloat16")
    for p in (tmp_path / "s").rglob("*"):
        if p.is_file():
            head = p.read_bytes()[:2]
            assert head not in PICKLE_MAGIC, p
            in_zarr = "acts.zarr" in p.parts
            assert in_zarr or p.suffix in KNOWN, f"unexpected file type {p}"


def test_loading_never_unpickles(tmp_path, tiny, texts, monkeypatch):
    import torch

    store = extract_local(tiny("gpt2"), tmp_path / "s", [HOOK], texts[:3])
    sae = actstore.train_sae(store, HOOK, expansion=2, k=4, training_tokens=4096, batch_size=1024,
                             out_dir=str(tmp_path / "sae"), n_eval_seqs=0)
    del sae

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    ref = actstore.open_store(str(tmp_path / "s")).activations(HOOK).compute()
    # (dask's graph hashing may pickle in-memory objects; what is read from the store never is)
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    s = actstore.open_store(str(tmp_path / "s"))
    got = np.concatenate([s.shard_array(i, HOOK)[:] for i in range(len(s.manifest.shards))])
    np.testing.assert_array_equal(got, ref)
    s.tokens(), s.docs(), s.stats(HOOK), next(s.loader(HOOK, 8))
    assert s.verify().ok
    from actstore.workers.sae.saelens import load_saelens

    load_saelens(str(tmp_path / "sae"))


def test_trust_remote_code_stays_off(tmp_path, tiny, texts):
    """A model whose config asks for custom code is refused unless trust_remote_code is set; its code never runs."""
    src = Path(tiny("gpt2"))
    model = tmp_path / "remote"
    model.mkdir()
    for f in src.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "EXECUTED"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import GPT2Config\n"
                                   "class EvilConfig(GPT2Config):\n    model_type = 'evil'\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    cfg["model_type"] = "evil"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code|cannot load model config"):
        extract_local(str(model), tmp_path / "out", [HOOK], texts[:2])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_secrets_never_reach_manifest_logs_or_errors(tmp_path, tiny, texts, caplog, capfd, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    opts = {"secret_token": SECRET}  # memory:// ignores unknown options: they must still never be written
    store = extract_local(tiny("gpt2"), "memory://sec/run", [HOOK], texts[:2], storage_options=opts)
    fs = store.fs
    for path in fs.find("/sec/run"):
        assert SECRET.encode() not in fs.cat_file(path), path
    assert SECRET not in json.dumps(store.manifest.model_dump(mode="json"))
    # an error while the secret is in the options: the message must not echo it
    from actstore.cli import main

    bad = tmp_path / "bad.yaml"
    import yaml

    bad.write_text(yaml.safe_dump({"model": tiny("gpt2"), "corpus": "s3://nobucket/none.jsonl", "hooks": [HOOK],
                                   "output": str(tmp_path / "o"), "executor": "local",
                                   "storage_options": {"key": "k", "secret": SECRET,
                                                       "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}}))
    assert main(["extract", str(bad)]) != 0
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text


def test_shard_and_hook_paths_stay_inside_the_store(tmp_path):
    store = actstore.from_arrays({HOOK: np.ones((10, 2), np.float32), "module:h.0.mlp": np.ones((10, 2), np.float32)},
                                 str(tmp_path / "s"), shard_tokens=4)
    root = (tmp_path / "s").resolve()
    for p in root.rglob("*"):
        assert root in p.resolve().parents
    assert all(s.id.isdigit() for s in store.manifest.shards)
