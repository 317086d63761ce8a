"""Zarr codecs on real MiniLM activations: compression ratio, write and read MB/s, and what that costs extraction.

Data: MiniLM-L6 activations of the pydoc corpus (6 x resid_post and blocks.2.mlp.hook_post, extracted with
actstore and cached), stored as float32, float16 and bfloat16 (uint16 bits, as actstore stores it). Each codec
writes the arrays with actstore's chunking (`chunk_rows`, ~4 MiB full-width chunks) to a local Zarr v3 store and
reads them back (`+crc32c`: followed by Zarr's checksum codec, as actstore writes every chunk, so the rows beside
their plain twins give the checksum's cost). MB/s counts uncompressed bytes. In the same rounds a bare MiniLM forward (batch 16 x 128) runs,
so the table can say what each codec's write would cost an extraction that writes 6 resid_post hooks in the
given dtype: "extraction throughput if written inline" = t_fwd / (t_fwd + t_write) per token (ideal 1.00x).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    Ctx,
    Variant,
    fmt_num,
    fmt_ratio,
    interleave,
    log,
    md_table,
    median_of,
    minilm_activations,
    minilm_path,
    ratio_stats,
)

NAME = "codecs"
TITLE = "5. Compression codecs on real MiniLM activations"
HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(6)] + ["blocks.2.mlp.hook_post"]


def codecs() -> dict[str, Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    # "+crc32c": what actstore writes (the checksum codec last, so every read verifies the stored bytes)
    return {"none": None, "none+crc32c": [Crc32cCodec()], "zstd-1": [ZstdCodec(level=1)],
            "zstd-1+crc32c": [ZstdCodec(level=1), Crc32cCodec()], "zstd-3": [ZstdCodec(level=3)],
            "blosc-zstd-1-shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
            "blosc-zstd-5-shuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")]}


def _stored(acts: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    import torch

    from actstore.workers.dtypes import to_storage

    return {h: to_storage(torch.from_numpy(a), dtype)[0] for h, a in acts.items()}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("zarr.json"))


def codec_variant(name: str, comp: Any, arrays: dict[str, np.ndarray], tmp: Path) -> Variant:
    import zarr

    from actstore.workers.shard_writer import chunk_rows

    raw = sum(a.nbytes for a in arrays.values())

    def run() -> dict[str, Any]:
        path = tmp / f"z-{name}"
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        group = zarr.open_group(zarr.storage.LocalStore(str(path)), mode="w")
        for h, a in arrays.items():
            z = group.create_array(h, shape=a.shape, chunks=(chunk_rows(a.shape[0], a.shape[1], a.itemsize),
                                                             a.shape[1]),
                                   dtype=a.dtype, compressors=comp, fill_value=0)
            z[:] = a
        t_write = time.perf_counter() - t0
        stored = _dir_bytes(path)
        t0 = time.perf_counter()
        group = zarr.open_group(zarr.storage.LocalStore(str(path), read_only=True), mode="r")
        backs = {h: group[h][:] for h in arrays}
        t_read = time.perf_counter() - t0
        assert all(np.array_equal(backs[h].view(np.uint8), a.view(np.uint8)) for h, a in arrays.items())  # lossless
        shutil.rmtree(path, ignore_errors=True)
        return {"s": t_write + t_read, "write_s": t_write, "read_s": t_read, "raw": raw, "stored": stored}

    return name, run


def forward_variant() -> Variant:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path()).eval()
    ids = torch.randint(1000, 20000, (16, 128))

    def run() -> dict[str, Any]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        return {"s": time.perf_counter() - t0, "tokens": ids.numel()}

    return "minilm_forward", run


def run(ctx: Ctx) -> dict[str, Any]:
    import torch

    torch.set_num_threads(ctx.threads)
    # The same cached extraction as the SAE benchmark (16,384 / 65,536 tokens); quick mode uses a slice.
    n = 8192 if ctx.quick else 65536
    acts = {h: a[:n] for h, a in minilm_activations(16384 if ctx.quick else 65536, HOOKS).items()}
    out: dict[str, Any] = {"n": n, "hooks": HOOKS, "dtypes": {}}
    fwd = forward_variant()
    fwd[1]()
    for dtype in ("float32", "float16") if ctx.quick else ("float32", "float16", "bfloat16"):
        arrays = _stored(acts, dtype)
        log(f"codecs {dtype}: {sum(a.nbytes for a in arrays.values()) / 1e6:.0f} MB")
        variants = [codec_variant(name, comp, arrays, ctx.tmp) for name, comp in codecs().items()] + [fwd]
        res = interleave(variants, ctx.rounds, ctx.extra.get("meter"))
        out["dtypes"][dtype] = {"raw": res, "rows": summarize(res, dtype)}
    return out


def summarize(res: dict[str, list[dict]], dtype: str) -> list[dict[str, Any]]:
    itemsize = 4 if dtype == "float32" else 2
    bytes_per_token = 6 * 384 * itemsize  # 6 resid_post hooks of MiniLM
    rows = []
    for name, runs in res.items():
        if name == "minilm_forward":
            continue
        inline = []
        for r, f in zip(runs, res["minilm_forward"]):
            t_fwd = f["s"] / f["tokens"]
            t_write = r["write_s"] / r["raw"] * bytes_per_token
            inline.append(t_fwd / (t_fwd + t_write))
        rows.append({
            "codec": name, "ratio": runs[0]["raw"] / runs[0]["stored"],
            "write_mbs": median_of([{"v": r["raw"] / r["write_s"] / 1e6} for r in runs], "v"),
            "read_mbs": median_of([{"v": r["raw"] / r["read_s"] / 1e6} for r in runs], "v"),
            "write_vs_none": ratio_stats([r["raw"] / r["write_s"] / (b["raw"] / b["write_s"])
                                          for r, b in zip(runs, res["none"])]),
            "read_vs_none": ratio_stats([r["raw"] / r["read_s"] / (b["raw"] / b["read_s"])
                                         for r, b in zip(runs, res["none"])]),
            "inline": ratio_stats(inline),
        })
    return rows


def render(result: dict[str, Any]) -> str:
    parts = [f"Data: {result['n']:,} tokens x {len(result['hooks'])} MiniLM hooks (6 x resid_post, "
             "blocks.2.mlp.hook_post). Compression ratio = raw bytes / bytes on disk (chunk files only). "
             "Write/read MB/s are medians over rounds; the ratios against `none` are median per-round "
             "ratios [min–max]. The last column is the extraction throughput, relative to the bare forward pass "
             "measured in the same rounds, if the 6 resid_post hooks were written with this codec inline (serially "
             "after each forward)."]
    for dtype, d in result["dtypes"].items():
        table = [[r["codec"], f"{r['ratio']:.3f}", fmt_num(r["write_mbs"], " MB/s"), fmt_ratio(r["write_vs_none"]),
                  fmt_num(r["read_mbs"], " MB/s"), fmt_ratio(r["read_vs_none"]), fmt_ratio(r["inline"], 3)]
                 for r in d["rows"]]
        parts.append(f"**{dtype}**")
        parts.append(md_table(["codec", "compression ratio", "write", "write vs none", "read", "read vs none",
                               "extraction if inline"], table))
    return "\n\n".join(parts)


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out = []
    for dtype in ("float16",):
        rows = {r["codec"]: r for r in result["dtypes"].get(dtype, {}).get("rows", [])}
        for c in ("zstd-1", "blosc-zstd-1-shuffle"):
            if c in rows:
                out.append((f"codec {c} on {dtype}: compression ratio {rows[c]['ratio']:.2f}, extraction if inline",
                            fmt_ratio(rows[c]["inline"], 3), "keeps goal 1 (>= 0.95x)",
                            "met" if (rows[c]["inline"]["median"] or 0) >= 0.95 else "**missed**"))
    return out
