"""Ray executor: a Ray Data pipeline of shard plans through an actor pool of model runners.

Each actor holds one model, runs whole shards and writes them straight to the store; only a small row
(shard id, token count) comes back through Ray, never activations. Actors get fractional CPUs on CPU-only
machines (a pool taking every CPU slot starves Ray Data's own tasks) and one GPU each when GPUs exist.
Without `ray_address`/RAY_ADDRESS a private local Ray is started (never a bare `ray.init()`, which would
join any other Ray on the machine) and stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray

from actstore.schemas.config import ExtractConfig
from actstore.workers.tokenize import Sequence, ShardPlan


def encode_plan(p: ShardPlan) -> dict[str, Any]:
    """A shard plan as one flat row of bytes (cheap to ship, no pickled objects)."""
    cat = (lambda k, dt: np.concatenate([getattr(s, k) for s in p.sequences]).astype(dt).tobytes())
    return {"shard_id": p.shard_id, "seq_start": p.seq_start, "token_start": p.token_start,
            "lens": np.array([len(s.ids) for s in p.sequences], np.int64).tobytes(),
            "ids": cat("ids", np.int32), "doc": cat("doc", np.int64), "special": cat("special", np.bool_)}


def decode_plan(row: dict[str, Any]) -> ShardPlan:
    lens = np.frombuffer(row["lens"], np.int64)
    cuts = np.cumsum(lens)[:-1]
    ids, doc = np.frombuffer(row["ids"], np.int32), np.frombuffer(row["doc"], np.int64)
    sp = np.frombuffer(row["special"], np.bool_)
    seqs = [Sequence(a, b, c) for a, b, c in zip(np.split(ids, cuts), np.split(doc, cuts), np.split(sp, cuts))]
    return ShardPlan(str(row["shard_id"]), int(row["seq_start"]), int(row["token_start"]), seqs)


class ShardActor:
    """Ray Data actor: builds the model runner once, then runs one shard per call.

    With `append_tag` (`append: hooks`) it adds the config's hooks to committed shards instead of writing them.
    """

    def __init__(self, cfg: dict[str, Any], pad_id: int, threads: int, append_tag: str | None = None) -> None:
        import torch

        from actstore.pipeline.local_executor import make_runner, task_options
        from actstore.workers import storage

        # Ray sets OMP_NUM_THREADS from num_cpus; size torch explicitly, never above this node's cores
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        self.cfg = ExtractConfig.model_validate(cfg)
        self.runner = make_runner(self.cfg, pad_id)
        self.opts = task_options(self.cfg)
        self.fs, self.root = storage.get_fs(self.cfg.output, self.cfg.storage_options)
        self.append_tag = append_tag

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from actstore.workers.shard_task import append_shard, run_shard

        ids, counts = [], []
        for i in range(len(batch["shard_id"])):
            plan = decode_plan({k: v[i] for k, v in batch.items()})
            if self.append_tag is not None:
                append_shard(self.runner, plan, self.opts, self.fs, self.root, self.append_tag)
            else:
                run_shard(self.runner, plan, self.opts, self.fs, self.root)
            ids.append(plan.shard_id)
            counts.append(plan.n_tokens)
        return {"shard_id": np.array(ids), "n_tokens": np.array(counts, np.int64)}


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join `address`, reuse an already-initialised Ray, or start (and stop) a private local one."""
    if ray.is_initialized():
        yield
        return
    kw: dict[str, Any] = {"address": address} if address else {
        "address": "local", "include_dashboard": False, "object_store_memory": 256 << 20}
    ray.init(log_to_driver=False, configure_logging=False, **kw)
    try:
        yield
    finally:
        ray.shutdown()


def pool_shape(cfg: ExtractConfig) -> tuple[int, dict[str, float], int]:
    """(actors, per-actor resources, torch threads per actor) for this cluster."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if cfg.device.startswith("cuda") or (gpus and cfg.device == "auto"):
        # An explicit cuda device asks for GPU actors even when none is up yet (an autoscaler adds them).
        n = cfg.num_workers or max(1, gpus)
        return n, {"num_gpus": 1, "num_cpus": 1}, max(1, cpus // n)
    n = cfg.num_workers or 1
    return n, {"num_cpus": 0.5}, max(1, cpus // n)


def run_ray(cfg: ExtractConfig, todo: list[ShardPlan], pad_id: int, progress: Callable[[int], None],
            ray_address: str | None = None, append_tag: str | None = None) -> None:
    """Run pending shards on a Ray actor pool; returns when every shard is committed (or, with `append_tag`,
    when the config's hooks are appended to every shard of `todo`)."""
    with ray_session(ray_address):
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        n, res, threads = pool_shape(cfg)
        ds = ray.data.from_items([encode_plan(p) for p in todo], override_num_blocks=max(1, len(todo)))
        out = ds.map_batches(
            ShardActor, fn_constructor_kwargs={"cfg": cfg.model_dump(), "pad_id": pad_id, "threads": threads,
                                   "append_tag": append_tag},
            batch_size=1, compute=ActorPoolStrategy(size=min(n, len(todo))), **res,
        )
        for row in out.iter_rows():
            progress(int(row["n_tokens"]))
