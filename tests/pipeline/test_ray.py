"""Ray executor: identical to the local reference, survives SIGKILL of an actor, refuses a second writer."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
from test_resume import tree_digest

import actstore
from actstore.pipeline.lease import LeaseError

pytestmark = pytest.mark.ray
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 << 20,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _cfg(model, out, corpus, **kw):
    cfg = dict(model=model, corpus=corpus, hooks=HOOKS, context_length=32, shard_tokens=256, batch_size=4,
               output=str(out), progress=False, executor="ray")
    cfg.update(kw)
    return cfg


def test_ray_equals_local(tmp_path, tiny, texts):
    ray_store = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "ray", texts[:6]))
    local = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "local", texts[:6], executor="local"))
    assert ray_store.manifest.shards == local.manifest.shards
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")
    assert ray_store.tokens().equals(local.tokens())
    for h in HOOKS:
        np.testing.assert_array_equal(ray_store.activations(h).compute(), local.activations(h).compute())


def _actor_pids() -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any("ShardActor" in part for part in (p.info["cmdline"] or [])):
            out.append(p.pid)
    return out


def test_sigkill_actor_mid_run(tmp_path, tiny, texts):
    ref = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "ref", texts[:10], executor="local"))
    out = tmp_path / "run"
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(store=actstore.extract(_cfg(tiny("gpt2"), out, texts[:10]))))
    t.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and killed is None and t.is_alive():
        if len(list((out / "shards").glob("*/shard.json"))) >= 2 and _actor_pids():
            killed = _actor_pids()[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    t.join(timeout=300)
    assert killed is not None, "the run ended before an actor could be killed"
    store = result["store"]
    assert store.verify().ok and store.manifest.shards == ref.manifest.shards
    assert tree_digest(out) == tree_digest(tmp_path / "ref")


def test_second_writer_refused(tmp_path, tiny, texts):
    out = tmp_path / "s"
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(store=actstore.extract(_cfg(tiny("gpt2"), out, texts[:8]))))
    t.start()
    deadline = time.time() + 60
    while not (out / "lease.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(LeaseError, match="being written by another extract"):
        actstore.extract(_cfg(tiny("gpt2"), out, texts[:8], executor="local"))
    t.join(timeout=300)
    assert result["store"].verify().ok and not (out / "lease.json").exists()


def test_ray_equals_local_with_token_outputs(tmp_path, tiny, texts):
    """outputs.parquet is part of the shard: byte-identical between executors (GPT-2's head is its tied wte)."""
    kw = dict(token_outputs={"topk": 2})
    ray_store = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "ray", texts[:4], **kw))
    local = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "local", texts[:4], executor="local", **kw))
    assert all(s.outputs_sha256 for s in local.manifest.shards)
    assert ray_store.manifest.shards == local.manifest.shards
    assert ray_store.token_outputs().equals(local.token_outputs())


def test_ray_tokenize_tasks_give_the_same_plan(tiny, texts, monkeypatch, tmp_path):
    """Tokenizing in Ray tasks (many small batches, several in flight) plans exactly what in-process does."""
    from actstore.pipeline import plan as plan_mod
    from actstore.pipeline.ray_tokenize import ray_tokenizer
    from actstore.schemas.config import ExtractConfig
    from actstore.workers.runner import load_tokenizer

    monkeypatch.setattr(plan_mod, "_TOKENIZE_BATCH", 3)  # 12 documents -> 4 tasks, results must stay in order
    for packing in (True, False):
        cfg = ExtractConfig.build(_cfg(tiny("gpt2"), tmp_path / "p", texts, packing=packing))
        tok = load_tokenizer(cfg.model)
        a, b = plan_mod.make_plan(cfg, tok), plan_mod.make_plan(cfg, tok, ray_tokenizer(cfg, in_flight=2))
        assert a.corpus_sha256 == b.corpus_sha256 and a.docs.equals(b.docs)
        assert [s.tokens_table() for s in a.shards] == [s.tokens_table() for s in b.shards]
