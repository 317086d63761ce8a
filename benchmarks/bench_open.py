"""`open_store` on a format v2 store of 10^5 shards vs reading the same records' bytes with pyarrow.

A real store is written (from_arrays, one shard), then its manifest is replaced by one that names a Parquet shard
index of N records (the real shard's record repeated with consecutive row ranges and distinct ids), exactly what
`commit_manifest` writes for a long shard list. `open_store` reads the manifest, checks the index's SHA-256 and
builds N ShardInfo records; the baseline reads the same two files and decodes the index to Python lists
(`pq.read_table(...).to_pydict()`), the floor any reader of those bytes pays. Goal: `open_store` under 1 s at
10^5 shards; the table also shows the ratio to the baseline and the old layout (the records inline in
manifest.json, as format v1 stores keep them) for comparison.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import Ctx, fmt_ratio, interleave, log, md_table, per_round, ratio_stats

NAME = "open"
TITLE = "12. `open_store` at 10^5 shards"
GOAL_S = 1.0


def _fake_store(root: Path, n_shards: int, indexed: bool) -> str:
    """A store whose manifest lists `n_shards` records (in the Parquet index, or inline when not `indexed`)."""
    import actstore
    from actstore.pipeline.store.shard_index import index_bytes
    from actstore.schemas import layout
    from actstore.schemas.manifest import ShardIndex

    store = actstore.from_arrays({"blocks.0.hook_resid_post": np.zeros((64, 8), np.float32)}, str(root))
    man, one = store.manifest, store.manifest.shards[0]
    rows = one.n_tokens
    shards = [one.model_copy(update={"id": f"{i // 4096:05d}-{i % 4096:06d}", "token_start": i * rows,
                                     "token_end": (i + 1) * rows, "seq_start": i, "seq_end": i + 1})
              for i in range(n_shards)]
    totals = {"n_tokens": n_shards * rows, "n_sequences": n_shards}
    if indexed:
        raw = index_bytes(shards, [h.name for h in man.hooks])
        (root / "shards.parquet").write_bytes(raw)
        index = ShardIndex(path="shards.parquet", sha256=hashlib.sha256(raw).hexdigest(), n_shards=n_shards)
        new = man.model_copy(update={"shards": [], "shard_index": index, **totals})
    else:
        new = man.model_copy(update={"shards": shards, "shard_index": None, **totals})
    (root / layout.MANIFEST).write_bytes(new.to_json())
    return str(root)


def _open(url: str) -> dict[str, Any]:
    import actstore

    t = time.perf_counter()
    store = actstore.open_store(url)
    s = time.perf_counter() - t
    return {"s": s, "shards": len(store.manifest.shards)}


def _floor(url: str) -> dict[str, Any]:
    import json

    t = time.perf_counter()
    json.loads((Path(url) / "manifest.json").read_bytes())
    raw = (Path(url) / "shards.parquet").read_bytes()
    hashlib.sha256(raw).hexdigest()
    n = len(pq.read_table(pa.BufferReader(raw)).to_pydict()["id"])
    return {"s": time.perf_counter() - t, "shards": n}


def run(ctx: Ctx) -> dict[str, Any]:
    n = 10_000 if ctx.quick else 100_000
    indexed = _fake_store(ctx.tmp / "indexed", n, True)
    inline = _fake_store(ctx.tmp / "inline", n, False)
    log(f"open: {n:,} shard records written")
    res = interleave([("open_store (index)", lambda: _open(indexed)), ("read + decode the index", lambda: _floor(indexed)),
                      ("open_store (inline manifest)", lambda: _open(inline))], ctx.rounds, ctx.extra.get("meter"),
                     warmup=True)
    speed = lambda r: 1.0 / r["s"]  # noqa: E731
    return {"n_shards": n, "runs": res,
            "open_s": ratio_stats([r["s"] for r in res["open_store (index)"]]),
            "vs_floor": per_round(res, "open_store (index)", "read + decode the index", speed),
            "vs_inline": per_round(res, "open_store (index)", "open_store (inline manifest)", speed),
            "index_bytes": (Path(indexed) / "shards.parquet").stat().st_size,
            "inline_manifest_bytes": (Path(inline) / "manifest.json").stat().st_size}


def render(result: dict[str, Any]) -> str:
    o = result["open_s"]
    rows = [[f"{result['n_shards']:,}", f"{o['median']:.3f} s [{o['min']:.3f}–{o['max']:.3f}]",
             fmt_ratio(result["vs_floor"]), fmt_ratio(result["vs_inline"]),
             f"{result['index_bytes'] / 1e6:.1f} MB", f"{result['inline_manifest_bytes'] / 1e6:.1f} MB"]]
    return ("`open_store` of a store whose manifest names a Parquet shard index, timed against reading and decoding "
            "the same bytes with pyarrow (speed ratio: > 1 = faster than that floor) and against the old layout "
            f"(records inline in manifest.json). Goal: under {GOAL_S:.0f} s.\n\n"
            + md_table(["shards", "open_store (median [min–max])", "vs read + decode", "vs inline manifest",
                        "shards.parquet", "inline manifest.json"], rows))


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    med = result["open_s"]["median"]
    return [(f"`open_store` at {result['n_shards']:,} shards", f"{med:.3f} s", f"< {GOAL_S:.0f} s",
             "met" if med < GOAL_S else "**missed**")]
