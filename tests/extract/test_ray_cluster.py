"""A Ray cluster of three nodes started in-process: the default pool puts model actors on every node and the store
is byte-identical to the local executor's.

Slow (three raylets on a small machine take a minute to start) and marked so; CI runs it with the slow tests.
"""

from __future__ import annotations

import pytest

import actstore
from tests.support import tree_digest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                     "object_store_memory": 100 << 20})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=100 << 20)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def test_three_nodes_each_run_shards_and_match_local(tmp_path, tiny, texts, cluster, monkeypatch):
    import torch

    from actstore.pipeline.extract import run
    from actstore.pipeline.extract.part_records import PartTracker

    trackers: list[PartTracker] = []

    class Recorded(PartTracker):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            trackers.append(self)

    monkeypatch.setattr(run, "PartTracker", Recorded)

    # threads_per_worker = this process' torch threads: float32 bits then equal the local executor's
    kw = dict(model=tiny("gpt2"), corpus=texts[:8], hooks=HOOKS, context_length=16, shard_tokens=32, batch_size=4,
              progress=False, part_docs=2, threads_per_worker=torch.get_num_threads(), shards_in_flight=1)
    ray_store = actstore.extract(dict(kw, executor="ray", ray_address=cluster.address, output=str(tmp_path / "r")))
    local = actstore.extract(dict(kw, executor="local", output=str(tmp_path / "l")))
    assert len(local.manifest.shards) >= 12
    assert ray_store.manifest.shards == local.manifest.shards
    assert tree_digest(tmp_path / "r") == tree_digest(tmp_path / "l")
    ran = trackers[0].nodes  # node id -> shards its actor ran
    assert set(ran) == {n.node_id for n in cluster.list_all_nodes()} and all(ran.values())
