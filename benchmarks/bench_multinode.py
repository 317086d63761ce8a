"""Multi-node Ray: tokens/s of one extraction with a model actor on each of 3 nodes vs one actor on one node.

A Ray cluster of three nodes is started in-process (`ray.cluster_utils.Cluster`: a head and two more raylets,
1 logical CPU each), once for the section. Each round runs the same extraction twice on it, round-robin:
- `one_node`: `num_workers=1`, a single model actor (on whichever node Ray picks);
- `three_nodes`: the default CPU pool, one actor per node (SPREAD).
Both use `threads_per_worker=1`, so an actor uses one core. The workload is MiniLM over the pydoc topics (packed
windows of 128, one hook, float16), written to a local store. The cluster's start and the first (untimed) run,
which pays the worker processes' imports, are outside the rounds.

The figure is throughput: tokens / wall seconds of the whole `extract`. On this benchmark machine all three
"nodes" share the same physical cores, so the ceiling is min(3, physical cores) = 2x on 2 cores, not 3x: the
section measures what the pool's spread and the per-node overheads leave of that ceiling, not a real cluster's
network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

from benchmarks.common import (
    CONTEXT,
    Ctx,
    fmt_ratio,
    interleave,
    log,
    md_table,
    median_of,
    minilm_path,
    per_round,
    pydoc_topics,
)

NAME = "multinode"
TITLE = "15. Multi-node Ray: 3 nodes vs 1 (in-process cluster)"
HOOK = "blocks.5.hook_resid_post"
NODES = 3
# Small shards: the work must split into many more shards than actors, or the last wave runs on one node
# (the default 65,536 tokens made 4 shards of this corpus: 3 actors, then 1). Real corpora have thousands.
SHARD_TOKENS = 16384


@contextlib.contextmanager
def _recording_trackers() -> Iterator[list[Any]]:
    """Make every extraction's PartTracker (which counts the shards each Ray node ran) visible here."""
    from actstore.pipeline.extract import run
    from actstore.pipeline.extract.part_records import PartTracker

    seen: list[Any] = []

    class Recorded(PartTracker):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            seen.append(self)

    run.PartTracker = Recorded  # type: ignore[misc]  # this section only: restored below
    try:
        yield seen
    finally:
        run.PartTracker = PartTracker  # type: ignore[misc]


def _variant(name: str, address: str, docs: list[dict], workers: int | None, ctx: Ctx,
             trackers: list[Any]) -> tuple[str, Any]:
    import actstore

    def run() -> dict[str, Any]:
        out = ctx.tmp / f"multinode-{uuid.uuid4().hex[:8]}"
        trackers.clear()
        t0 = time.perf_counter()
        store = actstore.extract({"model": minilm_path(), "corpus": docs, "hooks": [HOOK],
                                  "context_length": CONTEXT, "packing": True, "dtype": "float16", "batch_size": 32,
                                  "shard_tokens": SHARD_TOKENS,
                                  "executor": "ray", "ray_address": address, "num_workers": workers,
                                  "threads_per_worker": 1, "progress": False, "output": str(out)})
        dt = time.perf_counter() - t0
        nodes = sum(1 for v in trackers[-1].nodes.values() if v) if trackers else None
        n = store.n_tokens
        shutil.rmtree(out, ignore_errors=True)
        return {"s": dt, "tokens": n, "nodes": nodes}

    return name, run


def run(ctx: Ctx) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    docs = pydoc_topics(1, first=40) if ctx.quick else pydoc_topics(2)  # quick: CI's smoke run
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 128 << 20})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=1, object_store_memory=128 << 20)
    cluster.wait_for_nodes()
    start_s = time.perf_counter() - t0
    log(f"multinode: {NODES}-node cluster up in {start_s:.1f} s; {len(docs)} documents")
    try:
        with _recording_trackers() as trackers:
            variants = [_variant("one_node", cluster.address, docs, 1, ctx, trackers),
                        _variant("three_nodes", cluster.address, docs, None, ctx, trackers)]
            variants[1][1]()  # untimed: every node's first actor pays its worker process' imports
            res = interleave(variants, 1 if ctx.quick else ctx.rounds, ctx.extra.get("meter"))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    rate = lambda r: r["tokens"] / r["s"]  # noqa: E731
    corpus = "the first 40 pydoc topics" if ctx.quick else "2 x the pydoc topics"
    return {"shard_tokens": SHARD_TOKENS, "corpus": corpus,
            "start_s": start_s, "cores": len(os.sched_getaffinity(0)), "raw": res,
            "tokens": res["one_node"][0]["tokens"], "ratio": per_round(res, "three_nodes", "one_node", rate),
            "s": {k: median_of(v, "s") for k, v in res.items()},
            "nodes": {k: max((r["nodes"] or 0) for r in v) for k, v in res.items()}}


def _ceiling(result: dict[str, Any]) -> float:
    return float(min(NODES, result["cores"]))


def render(result: dict[str, Any]) -> str:
    s, tok = result["s"], result["tokens"]
    nodes = result["nodes"]
    rows = [["one_node (1 actor, 1 thread)", nodes["one_node"], f"{s['one_node']:.1f}",
             f"{tok / s['one_node'] / 1e3:.1f}k", "1", "1x"],
            [f"three_nodes ({NODES} actors, 1 thread each)", nodes["three_nodes"], f"{s['three_nodes']:.1f}",
             f"{tok / s['three_nodes'] / 1e3:.1f}k", fmt_ratio(result["ratio"]), f"{_ceiling(result):.0f}x"]]
    return (f"{tok:,} tokens ({result['corpus']}), MiniLM, 1 hook ({HOOK}, float16), packed windows of "
            f"{CONTEXT}, batch 32, shards of {result['shard_tokens']:,} tokens, `threads_per_worker=1`, on a "
            f"{NODES}-node `ray.cluster_utils.Cluster` (1 logical CPU per node; started once in "
            f"{result['start_s']:.1f} s, not in the runs). Seconds per whole `extract` (median) and throughput per round over one node (median [min–max]). All nodes share "
            f"this machine's {result['cores']} cores, so the ceiling is {_ceiling(result):.0f}x, and the single "
            f"actor's run already uses part of the second core (its writer threads, the read tasks, Ray's own "
            f"processes). The issue sets no goal here: this is a report of what spreading costs.\n\n"
            + md_table(["run", "nodes that ran shards", "seconds", "tokens/s", "vs one node", "ceiling"], rows))


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(f"multi-node Ray: {NODES} nodes vs 1 (in-process, {result['cores']} shared cores)",
             fmt_ratio(result["ratio"]), f"(report only; ceiling {_ceiling(result):.0f}x)", "—")]
