"""Store reads vs the same bytes in a numpy memory-map and in Parquet (FixedSizeList<float32>, fixed_size_binary).

One float32 hook (n x 768, random normal values: read speed does not depend on them) is written once as an
actstore store (`from_arrays`, default chunking, no compression), as a .npy file and as two uncompressed
Parquet files whose row groups match the store's chunk rows. Files are read once before timing, so every
variant reads from the page cache (what a second epoch sees; cold-disk reads would measure the disk).

- full scan: materialize the whole (n, d) array: `Store.activations(h).compute()` (Dask, threaded),
  `Store.to_numpy(h)` (one preallocated array filled chunk by chunk from a few threads), a chunk-wise loop over `Store.read_rows`, `np.array(memmap)`, a chunk-wise memmap copy, and Parquet
  `read_table` + zero-copy numpy views.
- shuffled batches (one epoch, 4096 rows, float32 torch tensors): `Store.loader` (chunk blocks in random order,
  64k-row shuffle window) vs a memmap read with a fresh random permutation per epoch (sorted row indices per
  batch: a full random shuffle), and Parquet row groups in random order with the same 64k-row window.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.common import (
    Ctx,
    Variant,
    best_ratio,
    fmt_num,
    fmt_ratio,
    fmt_x,
    goal_status,
    interleave,
    log,
    md_table,
    median_of,
    per_round,
)

NAME = "reads"
TITLE = "4. Store reads vs numpy memory-map and Parquet"
HOOK = "blocks.0.hook_resid_post"
BATCH = 4096
WINDOW = 1 << 16


def make_data(ctx: Ctx, n: int, d: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    import actstore

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    store = actstore.from_arrays({HOOK: x}, str(ctx.tmp / "store"), shard_tokens=min(n, 65536))
    npy = ctx.tmp / "acts.npy"
    np.save(npy, x)
    rows_per_group = store.shard_array(0, HOOK).chunks[0]
    flat = pa.array(x.reshape(-1))
    fsl = pa.FixedSizeListArray.from_arrays(flat, d)
    fsb = pa.FixedSizeBinaryArray.from_buffers(pa.binary(d * 4), n, [None, pa.py_buffer(x.tobytes())])
    paths = {"fsl": ctx.tmp / "fsl.parquet", "fsb": ctx.tmp / "fsb.parquet"}
    for kind, arr in (("fsl", fsl), ("fsb", fsb)):
        pq.write_table(pa.table({"x": arr}), paths[kind], compression="none", use_dictionary=False,
                       row_group_size=rows_per_group, write_statistics=False)
    return {"store": store, "npy": npy, "pq": paths, "n": n, "d": d, "bytes": x.nbytes, "chunk_rows": rows_per_group}


def _fsl_numpy(table: Any, d: int) -> np.ndarray:
    col = table.column("x").combine_chunks() if table.column("x").num_chunks > 1 else table.column("x").chunk(0)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def _fsb_numpy(table: Any, d: int) -> np.ndarray:
    chunks = [np.frombuffer(c.buffers()[1], np.float32, count=len(c) * d, offset=c.offset * d * 4)
              for c in table.column("x").chunks]
    return (chunks[0] if len(chunks) == 1 else np.concatenate(chunks)).reshape(-1, d)


def _materialize(a: np.ndarray) -> np.ndarray:
    """Bytes in RAM: a memory-mapped result (lazy until touched; read-only views of a map included) is copied,
    an in-memory one kept as it is."""
    mapped = isinstance(a, np.memmap) or not a.flags.writeable or not a.flags.owndata and isinstance(a.base, np.memmap)
    return np.array(a) if mapped else a


def _repeat(fn, reps: int):
    """Run fn reps times (a single scan of a cached file takes tens of ms: too short to time alone)."""
    def run() -> dict[str, Any]:
        out = [fn() for _ in range(reps)]
        return {"s": sum(r["s"] for r in out), "bytes": sum(r["bytes"] for r in out)}
    return run


def scan_variants(data: dict[str, Any]) -> list[Variant]:
    import pyarrow.parquet as pq

    store, n, d = data["store"], data["n"], data["d"]
    from actstore.pipeline.store.loader import ActivationLoader

    blocks = ActivationLoader(store, HOOK, BATCH).blocks()

    def timed(fn):
        def run() -> dict[str, Any]:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            assert out is None or out.shape == (n, d), out.shape
            return {"s": dt, "bytes": data["bytes"]}
        return run

    def store_chunks() -> None:
        for i, a, b in blocks:
            _materialize(store.read_rows(HOOK, i, a, b))

    def mm_chunks() -> None:
        mm = np.load(data["npy"], mmap_mode="r")
        for i, a, b in blocks:
            start = store.manifest.shards[i].token_start
            np.array(mm[start + a:start + b])

    return [
        ("memmap_scan", timed(lambda: np.array(np.load(data["npy"], mmap_mode="r")))),
        ("store_dask_compute", timed(lambda: _materialize(store.activations(HOOK).compute()))),
        ("store_to_numpy", timed(lambda: store.to_numpy(HOOK))),
        ("memmap_chunks", timed(mm_chunks)),
        ("store_read_rows_chunks", timed(store_chunks)),
        ("parquet_fsl_scan", timed(lambda: _fsl_numpy(pq.read_table(data["pq"]["fsl"]), d))),
        ("parquet_fsb_scan", timed(lambda: _fsb_numpy(pq.read_table(data["pq"]["fsb"]), d))),
    ]


def shuffle_variants(data: dict[str, Any]) -> list[Variant]:
    import pyarrow.parquet as pq
    import torch

    store, n, d = data["store"], data["n"], data["d"]
    epoch = {"i": 0}

    def timed(fn):
        def run() -> dict[str, Any]:
            epoch["i"] += 1
            t0 = time.perf_counter()
            rows = fn(epoch["i"])
            dt = time.perf_counter() - t0
            assert rows == n, (rows, n)
            return {"s": dt, "bytes": data["bytes"]}
        return run

    def loader(seed: int) -> int:
        return sum(b.shape[0] for b in store.loader(HOOK, BATCH, shuffle=True, seed=seed))

    def memmap(seed: int) -> int:
        mm = np.load(data["npy"], mmap_mode="r")
        perm = np.random.default_rng(seed).permutation(n)
        rows = 0
        for s in range(0, n, BATCH):
            rows += torch.from_numpy(mm[np.sort(perm[s:s + BATCH])]).shape[0]
        return rows

    def parquet(seed: int) -> int:
        f = pq.ParquetFile(data["pq"]["fsl"])
        rng = np.random.default_rng(seed)
        rows, buf, size = 0, [], 0
        groups = rng.permutation(f.num_row_groups)
        for j, g in enumerate(groups):
            buf.append(_fsl_numpy(f.read_row_group(int(g)), d))
            size += len(buf[-1])
            if size >= WINDOW or j == len(groups) - 1:
                x = np.concatenate(buf)
                perm = rng.permutation(len(x))
                for s in range(0, len(x), BATCH):
                    rows += torch.from_numpy(x[perm[s:s + BATCH]]).shape[0]
                buf, size = [], 0
        return rows

    return [("memmap_random_batches", timed(memmap)), ("store_loader", timed(loader)),
            ("parquet_rowgroup_shuffle", timed(parquet))]


def _rate(r: dict) -> float:
    return r["bytes"] / r["s"] / 1e6


def run(ctx: Ctx) -> dict[str, Any]:
    n = 65536 if ctx.quick else 262144
    d = 768
    data = make_data(ctx, n, d)
    log(f"reads: {n} x {d} float32 = {data['bytes'] / 1e6:.0f} MB, chunk rows {data['chunk_rows']}")
    meter = ctx.extra.get("meter")
    scans, shuffles = scan_variants(data), shuffle_variants(data)
    for _, fn in scans[:1] + scans[1:2] + shuffles[2:]:
        fn()  # page-cache warm-up: every file read once before timing
    reps = 3 if ctx.quick else 5
    res = interleave([(name, _repeat(fn, reps)) for name, fn in scans], ctx.rounds, meter)
    res.update(interleave([(name, _repeat(fn, reps)) for name, fn in shuffles], ctx.rounds, meter))
    rows = []

    def row(what: str, num: str, den: str, goal: float | None) -> None:
        rows.append({"what": what, "variant": num, "baseline": den, "goal": goal,
                     "rate": median_of([{"r": _rate(r)} for r in res[num]], "r"),
                     "base_rate": median_of([{"r": _rate(r)} for r in res[den]], "r"),
                     "ratio": per_round(res, num, den, _rate), "best": best_ratio(res, num, den, _rate),
                     "other": median_of(res[num] + res[den], "other_share")})

    row("full scan: `Store.activations(h).compute()`", "store_dask_compute", "memmap_scan", 0.8)
    row("full scan: `Store.to_numpy(h)` (no Dask)", "store_to_numpy", "memmap_scan", 0.8)
    row("full scan, chunk-wise `Store.read_rows`", "store_read_rows_chunks", "memmap_chunks", 0.8)
    row("full scan: Parquet FixedSizeList<float32>", "parquet_fsl_scan", "memmap_scan", None)
    row("full scan: Parquet fixed_size_binary", "parquet_fsb_scan", "memmap_scan", None)
    row("shuffled batches: `Store.loader` (4096 rows)", "store_loader", "memmap_random_batches", 0.5)
    row("shuffled batches: Parquet row groups + 64k window", "parquet_rowgroup_shuffle", "memmap_random_batches", None)
    return {"n": n, "d": d, "reps": reps, "mb": data["bytes"] / 1e6, "chunk_rows": data["chunk_rows"], "raw": res,
            "rows": rows}


def render(result: dict[str, Any]) -> str:
    table = [[r["what"], r["baseline"], fmt_num(r["base_rate"], " MB/s"), fmt_num(r["rate"], " MB/s"),
              fmt_ratio(r["ratio"]), fmt_x(r["best"]), f"{r['other']:.0%}",
              "—" if r["goal"] is None else f">= {r['goal']}x", goal_status(r["ratio"], r["goal"])]
             for r in result["rows"]]
    return "\n\n".join([
        f"Goals (issue 11): full scan >= 0.8x the memory-map, shuffled loader >= 0.5x. Data: {result['n']:,} x "
        f"{result['d']} float32 ({result['mb']:.0f} MB), one hook, chunk rows {result['chunk_rows']} (~4 MiB), "
        f"no compression; all files in the page cache; each timed run repeats the read {result['reps']} times. "
        "MB/s counts the array bytes delivered (medians over "
        "rounds); the ratio is the median per-round throughput ratio [min–max], best/best the fastest run of "
        "each.",
        md_table(["read", "baseline", "baseline MB/s", "MB/s", "ratio", "best/best", "other CPU", "goal", "status"],
                 table),
    ])


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(r["what"] + f" vs {r['baseline']}", fmt_ratio(r["ratio"]), f">= {r['goal']}x",
             goal_status(r["ratio"], r["goal"])) for r in result["rows"] if r["goal"] is not None]

