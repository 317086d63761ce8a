"""Extraction to an object store whose every write takes +30 ms, vs the same extraction to local disk.

The slow store is fsspec's in-memory filesystem with a 30 ms sleep before each write (`pipe_file`, and each
file opened for writing), registered as `slowmem://`: an object store's per-request latency without its
bandwidth limits, so the ratio shows whether the write path hides latency (writer threads, shards in flight,
Zarr's concurrent chunk writes) or waits on it request by request. A plain `memory://` run (the same
filesystem without the sleep) separates the latency from the difference between memory and disk. Same model,
corpus, config and bytes everywhere; the local executor (one process, so the in-memory filesystem is shared
with the writer threads). Goal (issue 18): >= 0.9x local disk.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from benchmarks.common import (
    Ctx,
    exact_docs,
    fmt_ratio,
    goal_status,
    interleave,
    log,
    md_table,
    median_of,
    minilm_path,
    per_round,
)

NAME = "latency"
TITLE = "14. Extraction to a store with +30 ms per write vs local disk"
GOAL = 0.9
DELAY_S = 0.030
HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(6)]


def _slow_fs_class() -> type:
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class SlowMemoryFileSystem(MemoryFileSystem):
        """memory:// with a fixed latency before every write."""

        protocol = "slowmem"
        store: dict[str, Any] = {}  # its own objects, apart from memory://'s
        pseudo_dirs = [""]
        writes = 0

        def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> Any:
            self._wait()
            return super().pipe_file(path, value, *args, **kwargs)

        def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode or "a" in mode:
                self._wait()
            return super()._open(path, mode, *args, **kwargs)

        @classmethod
        def _wait(cls) -> None:
            cls.writes += 1
            time.sleep(DELAY_S)

    fsspec.register_implementation("slowmem", SlowMemoryFileSystem, clobber=True)
    return SlowMemoryFileSystem


def _variant(name: str, docs: list[dict], url: Any) -> tuple[str, Any]:
    import actstore

    def run() -> dict[str, Any]:
        out = url()
        t0 = time.perf_counter()
        store = actstore.extract({"model": minilm_path(), "corpus": docs, "hooks": HOOKS, "context_length": 128,
                                  "packing": True, "dtype": "float16", "batch_size": 32, "shard_tokens": 8192,
                                  "executor": "local", "progress": False, "output": out})
        dt = time.perf_counter() - t0
        n = store.n_tokens
        store.fs.rm(store.root, recursive=True)
        return {"s": dt, "tokens": n}

    return name, run


def run(ctx: Ctx) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(ctx.threads)
    slow = _slow_fs_class()
    n_tokens = 16384 if ctx.quick else 131072
    docs = exact_docs(n_tokens, AutoTokenizer.from_pretrained(minilm_path()))
    log(f"latency: {n_tokens:,} tokens, {len(HOOKS)} hooks float16, shards of 8,192 tokens, +{DELAY_S * 1e3:.0f} ms "
        "per write")
    variants = [_variant("disk", docs, lambda: str(ctx.tmp / f"d-{uuid.uuid4().hex[:8]}")),
                _variant("memory", docs, lambda: f"memory://bench/{uuid.uuid4().hex[:8]}"),
                _variant("slow", docs, lambda: f"slowmem://bench/{uuid.uuid4().hex[:8]}")]
    variants[0][1]()  # untimed: model load, page cache
    before = slow.writes
    variants[2][1]()
    writes = slow.writes - before
    res = interleave(variants, 1 if ctx.quick else ctx.rounds, ctx.extra.get("meter"))
    rate = lambda r: r["tokens"] / r["s"]  # noqa: E731
    return {"tokens": n_tokens, "writes_per_run": writes, "delay_ms": DELAY_S * 1e3, "raw": res,
            "slow": per_round(res, "slow", "disk", rate), "memory": per_round(res, "memory", "disk", rate),
            "s": {k: median_of(v, "s") for k, v in res.items()}}


def render(result: dict[str, Any]) -> str:
    s = result["s"]
    rows = [["local disk", f"{s['disk']:.2f}", "1", "—"],
            ["memory:// (no delay)", f"{s['memory']:.2f}", fmt_ratio(result["memory"]), "—"],
            [f"+{result['delay_ms']:.0f} ms per write", f"{s['slow']:.2f}", fmt_ratio(result["slow"]),
             goal_status(result["slow"], GOAL)]]
    serial = result["writes_per_run"] * result["delay_ms"] / 1e3
    return (f"MiniLM, {result['tokens']:,} tokens, {len(HOOKS)} hooks float16, shards of 8,192 tokens, local "
            f"executor. Each slow run makes {result['writes_per_run']} writes: {serial:.1f} s of latency if they "
            f"were waited for one after another. Seconds per run (median) and throughput per round over local "
            f"disk. Goal: >= {GOAL}x.\n\n" + md_table(["output", "seconds", "vs local disk", "goal"], rows))


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(f"extraction with +{result['delay_ms']:.0f} ms per write vs local disk", fmt_ratio(result["slow"]),
             f">= {GOAL}x", goal_status(result["slow"], GOAL))]
