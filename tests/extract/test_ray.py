"""Ray executor: identical to the local reference, survives SIGKILL of an actor, refuses a second writer."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

import actstore
from actstore.pipeline.extract.lease import LeaseError
from tests.support import tree_digest

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


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
    assert "char_start" in ray_store.tokens().column_names and ray_store.has_char_spans  # carried by Ray's rows
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


def test_second_writer_refused(tmp_path, tiny, texts, monkeypatch):
    """While a run holds the lease, a second writer always gets the lease error, whatever the first is doing.

    The first run is held just before its commit (inside its lease) until the second has been refused, so the
    outcome never depends on which of the two a loaded machine happens to run faster."""
    from actstore.pipeline.extract import run as run_mod

    out, result, refused = tmp_path / "s", {}, threading.Event()
    real_finalize = run_mod.finalize_parts

    def held_finalize(*a, **k):
        refused.wait(timeout=600)
        return real_finalize(*a, **k)

    monkeypatch.setattr(run_mod, "finalize_parts", held_finalize)
    t = threading.Thread(target=lambda: result.update(store=actstore.extract(_cfg(tiny("gpt2"), out, texts[:8]))))
    t.start()
    try:
        while not (out / "lease.json").exists() and t.is_alive():
            time.sleep(0.02)
        for _ in range(3):  # at different moments of the first run: never anything but the lease error
            with pytest.raises(LeaseError, match="being written by another extract"):
                actstore.extract(_cfg(tiny("gpt2"), out, texts[:8], executor="local"))
    finally:
        refused.set()
        t.join(timeout=600)
    assert result["store"].verify().ok and not (out / "lease.json").exists()


def test_ray_equals_local_with_token_outputs(tmp_path, tiny, texts):
    """outputs.parquet is part of the shard: byte-identical between executors (GPT-2's head is its tied wte)."""
    kw = dict(token_outputs={"topk": 2})
    ray_store = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "ray", texts[:4], **kw))
    local = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "local", texts[:4], executor="local", **kw))
    assert all(s.outputs_sha256 for s in local.manifest.shards)
    assert ray_store.manifest.shards == local.manifest.shards
    assert ray_store.token_outputs().equals(local.token_outputs())


def test_cpu_actor_threads_do_not_depend_on_pool_size(tiny, tmp_path):
    """float32 matmul bits depend on torch's thread count: every CPU actor uses the local executor's count (or,
    on a cluster, threads_per_worker or its node's CPUs), however many actors the pool has."""
    import torch

    from actstore.pipeline.extract.executors.ray_pool import pool_shape
    from actstore.schemas.config import ExtractConfig

    cfgs = [ExtractConfig.build(_cfg(tiny("gpt2"), tmp_path, ["a doc"], num_workers=n)) for n in (1, 2, 3)]
    shapes = [pool_shape(c, same_node=True) for c in cfgs]
    assert [(s.min_size, s.max_size, s.threads) for s in shapes] == [(n, n, torch.get_num_threads()) for n in (1, 2, 3)]
    assert {pool_shape(c, same_node=False).threads for c in cfgs} == {0}


def test_pool_uses_the_cluster_and_can_grow(tiny, tmp_path):
    """Default: one actor per CPU node (this Ray has one, with 2 CPUs) or per threads_per_worker CPUs; with
    min/max_workers an autoscaling pool."""
    from actstore.pipeline.extract.executors.ray_pool import pool_shape
    from actstore.schemas.config import ExtractConfig

    def shape(**kw):
        s = pool_shape(ExtractConfig.build(_cfg(tiny("gpt2"), tmp_path, ["a doc"], **kw)), same_node=False)
        return s.min_size, s.max_size, s.threads

    assert shape() == (1, 1, 0)
    assert shape(threads_per_worker=1) == (2, 2, 1)
    assert shape(max_workers=4) == (1, 4, 0) and shape(min_workers=2, max_workers=3) == (2, 3, 0)


def test_ray_streams_parts_like_local(tmp_path, tiny, texts):
    """Several parts read by Ray tasks, shards run by two actors in any order: the local executor's bytes."""
    kw = dict(part_docs=2, num_workers=2, packing=False)
    ray_store = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "ray", texts[:7], **kw))
    local = actstore.extract(_cfg(tiny("gpt2"), tmp_path / "local", texts[:7], executor="local", **kw))
    assert len(local.manifest.parts) == 4 and ray_store.manifest == local.manifest.model_copy(
        update={"extract_config": ray_store.manifest.extract_config, "versions": ray_store.manifest.versions})
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")
