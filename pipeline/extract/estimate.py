"""`actstore plan`: what an extraction will cost before it runs — tokens, bytes, objects, time, disk.

The numbers come from the same code as the run itself, not from rules of thumb:

- tokens and shards: `make_plan`, i.e. every corpus part is read, tokenized and packed exactly as `extract`
  streams it (here in one process, so planning a very large corpus takes as long as reading and tokenizing it);
- hook widths: `ModelRunner.hook_dims()` (one 2-token forward) when the model is loaded for calibration,
  otherwise the model config (d_model / d_mlp), falling back to loading the model for `module:` hooks;
- bytes: every file the writer produces, sized with the writer's own rules — activation chunks from
  `chunk_rows` including the padding of edge chunks (Zarr stores them full size), Zarr metadata by creating
  the same arrays in memory, tokens.parquet by encoding the planned token index (up to 64 shards, then scaled
  per token), the statistics files, shard.json, docs.parquet and manifest.json by building them with
  placeholder values. With `compression: zstd` the activation bytes are an upper bound;
- time: fixed costs plus tokens / throughput. The throughput comes from a short calibration on this machine: a
  warm-up batch, then the run's own shard task (`run_shard`: forward, storage conversion, statistics, hashes,
  Zarr and Parquet writes) over a few batches of the run's first sequences into a temporary local folder,
  times `gpus` (or the configured num_workers) assuming one model worker per GPU. The fixed costs are measured
  in this process too: start-up (imports), the checks and the corpus planning, and the model load, which the
  run pays again. Starting a private Ray (executor: ray) adds a cost that is not measured (about 10-20 s on one
  machine: `RAY_START_S`), and writes to an object store are slower than the local ones timed here;
- `append` configs are estimated as what they add: `tokens` the new corpus, `hooks` the new hooks over the
  store's tokens (its token-index and metadata bytes are counted too, so that estimate is an upper bound);
- disk: `shutil.disk_usage` of the output (local outputs only; object stores report no capacity): the plan is
  `ok: False` with a reason when the free space is below the bytes still to write.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from actstore.pipeline.extract.commit import kind_of, library_versions, model_info, tokenizer_info
from actstore.pipeline.extract.preflight import check_model, preflight
from actstore.pipeline.extract.sharding import Plan, make_plan, make_plan_v1
from actstore.schemas import layout
from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import ConfigError
from actstore.schemas.hooks import parse_hooks
from actstore.schemas.manifest import CorpusInfo, HookInfo, Manifest, ShardIndex, ShardInfo
from actstore.workers import storage
from actstore.workers.dtypes import NUMPY_STORED
from actstore.workers.runner import load_tokenizer
from actstore.workers.shard_writer import ArraySpec, _codecs, _parquet_bytes, _stats_bytes, chunk_rows
from actstore.workers.stats import HookStats

RAY_START_S = 15.0  # a private local Ray's start and actor spin-up on one machine (not measured by plan)
PARQUET_SAMPLE_SHARDS = 64  # token index files encoded exactly; beyond this, scaled per token
S3_PUTS_PER_PREFIX = 3500  # S3's documented PUT rate per prefix


def plan(config: ExtractConfig | dict | str | Path, gpus: int | None = None, calibrate: bool = True,
         overrides: list[str] | None = None, calibration_batches: int = 3) -> dict[str, Any]:
    """Estimate an extraction (see the module docstring); `ok` is False with a `reason` when it cannot fit."""
    if gpus is not None and gpus < 1:
        raise ConfigError(f"gpus must be at least 1, got {gpus}")
    t0 = time.perf_counter()
    cfg = ExtractConfig.build(config, overrides)
    if cfg.generate is not None:  # its rows and time depend on the responses, unknown before generating
        raise ConfigError("actstore plan does not estimate runs with generate yet (rows and time depend on the "
                          "responses); remove generate to estimate the prompts' part")
    fs, root = storage.get_fs(cfg.output, cfg.storage_options)
    if cfg.append is None:
        model_cfg, tok = preflight(cfg, fs, root)  # the run's own checks: hooks, context length, output state
    else:  # the output holds the store to grow (append() checks the config against it); estimate what is added
        model_cfg, tok = check_model(cfg), load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    p = _plan_for(cfg, tok)
    fixed = {"startup_s": startup_seconds() if calibrate else 0.0, "planning_s": time.perf_counter() - t0}
    dims, calib = _dims_and_calibration(cfg, model_cfg, p, calibrate, calibration_batches)
    sizes = estimate_bytes(cfg, p, dims, model_cfg, tok)
    workers = gpus or cfg.num_workers or 1
    tps = calib["tokens_per_s"] * workers if calib else None
    if calib and gpus and calib["device"] == "cpu":
        calib["note"] = "calibrated on this machine's CPU: a GPU run will be faster than this estimate"
    if calib:
        fixed.update(model_load_s=calib["model_load_s"], ray_start_s=RAY_START_S if cfg.executor == "ray" else 0.0)
    wall = sum(fixed.values()) + p.n_tokens / tps if tps else None
    disk = _disk(fs, root, sizes["total_bytes"])
    out = {
        "ok": True, "reason": None, "model": cfg.model, "output": cfg.output,
        "append": cfg.append, "tokens": p.n_tokens, "sequences": p.n_sequences, "documents": p.docs.num_rows,
        **sizes,
        "calibration": calib, "workers": workers, "tokens_per_s": tps, "wall_time_s": wall, "fixed_costs": fixed,
        "s3": _s3_rates(sizes, wall), "disk": disk,
    }
    if disk["free_bytes"] is not None and disk["free_bytes"] < disk["required_bytes"]:
        out["ok"] = False
        out["reason"] = (f"output {cfg.output!r} has {_gb(disk['free_bytes'])} free but the store needs "
                         f"{_gb(disk['required_bytes'])} more")
    return out


def _plan_for(cfg: ExtractConfig, tok: Any) -> Plan:
    """The run's plan: v2 parts, or, when growing a format v1 store, v1 planning (as `append` does)."""
    if cfg.append is not None:
        from actstore.pipeline.store.store import open_store

        man = open_store(cfg.output, cfg.storage_options).manifest
        if man.parts is None:
            return make_plan_v1(cfg, tok)
        if cfg.append == "tokens":
            return make_plan(cfg, tok, first_part=len(man.parts))
    return make_plan(cfg, tok)


# ---- hook widths and throughput ----------------------------------------------------------------------------
def config_dims(hooks: list[str], model_cfg: Any) -> dict[str, int] | None:
    """Hook widths from the model config (d_model, or d_mlp for mlp.hook_post); None if a hook needs a forward."""
    d_model = next((getattr(model_cfg, a) for a in ("hidden_size", "n_embd", "d_model")
                    if isinstance(getattr(model_cfg, a, None), int)), None)
    d_mlp = next((getattr(model_cfg, a) for a in ("intermediate_size", "n_inner", "d_ff")
                  if isinstance(getattr(model_cfg, a, None), int)), None)
    d_mlp = d_mlp or (4 * d_model if d_model else None)  # GPT-2 leaves n_inner unset: 4 * n_embd
    out = {}
    for spec in parse_hooks(hooks):
        width = None if spec.is_module else d_mlp if spec.kind == "mlp.hook_post" else d_model
        if width is None:
            return None
        out[spec.name] = width
    return out


def _dims_and_calibration(cfg: ExtractConfig, model_cfg: Any, p: Plan, calibrate: bool, n_batches: int,
                          ) -> tuple[dict[str, int], dict[str, Any] | None]:
    dims = None if calibrate else config_dims(list(cfg.hooks), model_cfg)
    if dims is not None:
        return dims, None
    from actstore.pipeline.extract.executors.local import make_runner

    t0 = time.perf_counter()
    runner = make_runner(cfg, p.special.pad)  # the executors' own runner: same dtype, device and hooks
    loaded = time.perf_counter() - t0
    try:
        dims = runner.hook_dims()
        calib = calibration(runner, cfg, p, n_batches) if calibrate else None
        if calib:
            calib["model_load_s"] = loaded
        return dims, calib
    finally:
        runner.close()


def startup_seconds() -> float:
    """What a new `actstore extract` process spends importing actstore and torch (measured)."""
    import subprocess
    import sys

    code = "import actstore.pipeline.extract.run"  # transformers loads lazily, in the planning both runs time
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=300)
    return time.perf_counter() - start


def calibration(runner: Any, cfg: ExtractConfig, p: Plan, n_batches: int = 3) -> dict[str, Any]:
    """Tokens/s of the run's shard task over `n_batches` batches of its first sequences (after one untimed
    warm-up batch), written to a temporary local folder with the run's own writer."""
    from actstore.pipeline.extract.executors.local import task_options
    from actstore.workers.shard_task import run_shard
    from actstore.workers.tokenize import ShardPlan

    seqs = []
    for shard in p.shards:
        seqs.extend(shard.sequences)
        if len(seqs) >= (n_batches + 1) * cfg.batch_size:
            break
    timed = seqs[cfg.batch_size:] or seqs  # a tiny corpus: time the warm-up batch again
    sample = ShardPlan("calibration", 0, 0, timed)
    with tempfile.TemporaryDirectory(prefix="actstore-plan-") as tmp:
        fs, root = storage.get_fs(tmp)
        # warm-up, untimed: lazy init, allocator, kernels, the writer's codecs and buffers
        run_shard(runner, ShardPlan("warmup", 0, 0, seqs[:cfg.batch_size]), task_options(cfg), fs, root)
        start = time.perf_counter()
        run_shard(runner, sample, task_options(cfg), fs, root)
        seconds = time.perf_counter() - start
    return {"device": str(runner.device), "batches": -(-len(timed) // cfg.batch_size), "tokens": sample.n_tokens,
            "seconds": seconds, "tokens_per_s": sample.n_tokens / max(seconds, 1e-9)}


# ---- bytes and objects -------------------------------------------------------------------------------------
def estimate_bytes(cfg: ExtractConfig, p: Plan, dims: dict[str, int], model_cfg: Any = None, tok: Any = None,
                   ) -> dict[str, Any]:
    """Bytes of every file the run writes, grouped per hook, token index and metadata; plus object counts."""
    specs = [ArraySpec(h, dims[h], cfg.dtype) for h in cfg.hooks]
    item = NUMPY_STORED[cfg.dtype].itemsize
    hooks = {s.name: {"d": s.d, "dtype": cfg.dtype, "bytes": 0, "array_bytes": 0} for s in specs}
    stats_shard = len(_stats_bytes(_one_token(), {s.name: np.zeros((1, s.d), NUMPY_STORED[s.dtype]) for s in specs},
                                   specs, {}))
    objects = 0
    per_shard_objects = 0
    for sp in p.shards:
        n_objects = 4  # tokens.parquet, stats.safetensors, shard.json, acts.zarr/zarr.json (group)
        for s in specs:
            data, n_chunks = stored_array_bytes(sp.n_tokens, s.d, cfg.dtype)
            hooks[s.name]["array_bytes"] += data
            hooks[s.name]["bytes"] += data + _zarr_meta(s, sp.n_tokens, chunk_rows(sp.n_tokens, s.d, item),
                                                        cfg.compression)
            n_objects += 1 + n_chunks
        objects += n_objects
        per_shard_objects = max(per_shard_objects, n_objects)
    for s in specs:  # the stats/<hook>/stats.safetensors file of the finished store
        hooks[s.name]["bytes"] += _root_stats_bytes(s)
    token_index = _token_index_bytes(p)
    sums = {s.name: "0" * 64 for s in specs}  # shard.json records one SHA-256 per array
    shard_meta = sum(len(_shard_json(sp, sums)) for sp in p.shards) + len(p.shards) * (stats_shard + _group_meta())
    root_meta = _docs_bytes(p) + _manifest_bytes(cfg, p, dims, model_cfg, tok)
    objects += 2 + len(specs)  # manifest.json, docs.parquet, stats/<hook>/stats.safetensors
    outputs = _outputs_bytes(cfg, p)
    objects += len(p.shards) if outputs else 0
    total = sum(h["bytes"] for h in hooks.values()) + token_index + shard_meta + root_meta + outputs
    return {"hooks": hooks, "token_index_bytes": token_index, "metadata_bytes": shard_meta + root_meta,
            "token_outputs_bytes": outputs, "total_bytes": total, "shards": len(p.shards),
            "objects_per_shard": per_shard_objects + (1 if outputs else 0), "objects": objects,
            "bytes_are_upper_bound": cfg.compression != "none" or bool(outputs)}


def _outputs_bytes(cfg: ExtractConfig, p: Plan) -> int:
    """outputs.parquet (token_outputs), uncompressed: loss, chosen_prob and entropy (float32 each) + k (int32 id,
    float32 log-prob) per token.

    An upper bound: the values depend on the model's predictions, and zstd compresses the ids somewhat."""
    if cfg.token_outputs is None or cfg.append == "hooks":
        return 0
    return p.n_tokens * (12 + 8 * cfg.token_outputs.topk)


def stored_array_bytes(n: int, d: int, dtype: str) -> tuple[int, int]:
    """(bytes, chunk objects) of one uncompressed (n, d) shard array: Zarr writes edge chunks full size, and each
    chunk ends with its 4-byte crc32c."""
    if n == 0:
        return 0, 0
    item = NUMPY_STORED[dtype].itemsize
    rows = chunk_rows(n, d, item)
    n_chunks = math.ceil(n / rows)
    return n_chunks * (rows * d * item + 4), n_chunks


def _one_token() -> pa.Table:
    return pa.table({"token_id": pa.array([0], pa.int32()), "doc_id": pa.array([0], pa.int64()),
                     "seq_id": pa.array([0], pa.int64()), "position": pa.array([0], pa.int32()),
                     "special": pa.array([False])})


def _zarr_meta(spec: ArraySpec, n: int, rows: int, compression: str) -> int:
    """Size of the array's zarr.json, made by creating the same array (no data) in memory."""
    return _meta_sizes(spec.name, spec.d, spec.dtype, n, rows, compression)[f"{spec.name}/zarr.json"]


def _group_meta() -> int:
    return _meta_sizes("x", 1, "float32", 1, 1, "none")["zarr.json"]


def _meta_sizes(name: str, d: int, dtype: str, n: int, rows: int, compression: str) -> dict[str, int]:
    held: dict = {}
    group = zarr.open_group(zarr.storage.MemoryStore(held), mode="w")
    # same arguments as shard_writer._write_arrays
    group.create_array(name, shape=(n, d), chunks=(rows, d), dtype=NUMPY_STORED[dtype],
                       compressors=_codecs(compression), fill_value=0, dimension_names=("token", "d"),
                       attributes={"actstore_dtype": dtype, "hook": name})
    return {k: len(v.to_bytes()) for k, v in held.items()}


def _token_index_bytes(p: Plan) -> int:
    """tokens.parquet bytes: every shard's file encoded exactly, or an even sample scaled per token."""
    n = len(p.shards)
    picks = range(n) if n <= PARQUET_SAMPLE_SHARDS else np.linspace(0, n - 1, PARQUET_SAMPLE_SHARDS).astype(int)
    sampled = [(len(_parquet_bytes(p.shards[i].tokens_table())), p.shards[i].n_tokens) for i in picks]
    if n <= PARQUET_SAMPLE_SHARDS:
        return sum(b for b, _ in sampled)
    per_token = sum(b for b, _ in sampled) / max(1, sum(t for _, t in sampled))
    return int(per_token * p.n_tokens)


def _shard_json(sp: Any, arrays: dict[str, str]) -> bytes:
    info = _shard_info(sp, [s.doc for s in sp.sequences if len(s.doc)], arrays)
    return (info.model_dump_json(indent=1) + "\n").encode()  # as shard_writer._commit


def _shard_info(sp: Any, docs: list[np.ndarray], arrays: dict[str, str]) -> ShardInfo:
    return ShardInfo(id=sp.shard_id, part=sp.part, seq_start=sp.seq_start, seq_end=sp.seq_start + len(sp.sequences),
                     token_start=sp.token_start, token_end=sp.token_start + sp.n_tokens,
                     doc_start=int(docs[0][0]) if docs else -1, doc_end=int(docs[-1][-1]) if docs else -1,
                     n_tokens=sp.n_tokens, arrays=arrays, tokens_sha256="0" * 64)


def _root_stats_bytes(spec: ArraySpec) -> int:
    from safetensors.numpy import save as st_save

    st = HookStats.from_rows(np.zeros((1, spec.d)))
    meta = {"actstore": json.dumps({"format": "actstore-stats-v1", "hook": spec.name})}  # as commit.write_stats
    return len(st_save(st.to_tensors(""), metadata=meta))


def _docs_bytes(p: Plan) -> int:
    from actstore.pipeline.extract.part_records import write_docs_pieces

    buf = io.BytesIO()
    if p.docs_pieces:  # as commit.finalize_parts streams them
        write_docs_pieces(buf, [t.schema for t in p.docs_pieces], lambda: p.docs_pieces)
    else:
        pq.write_table(p.docs, buf, compression="zstd")  # as commit.write_docs (format v1 appends)
    return len(buf.getvalue())


def _manifest_bytes(cfg: ExtractConfig, p: Plan, dims: dict[str, int], model_cfg: Any, tok: Any) -> int:
    """manifest.json (and the shard index, when the run writes one) built with the run's real fields and
    placeholder hashes and statistics."""
    from actstore.pipeline.extract.part_records import part_info
    from actstore.pipeline.store.shard_index import INDEX_MIN_SHARDS, index_bytes

    sums = {h: "0" * 64 for h in cfg.hooks}
    shards, off, last = [], 0, None
    for sp in p.shards:
        if sp.part != last:  # rows restart in each part; the manifest holds global rows
            off, last = sum(s.n_tokens for s in shards), sp.part
        info = _shard_info(sp, [s.doc for s in sp.sequences if len(s.doc)], sums)
        shards.append(info.model_copy(update={"token_start": off + sp.token_start,
                                              "token_end": off + sp.token_start + sp.n_tokens}))
    rng = np.random.default_rng(0)  # typical float lengths in the statistics summary
    stats = {h: HookStats.from_rows(rng.standard_normal((4, dims[h]))).summary(kind_of(h)) for h in cfg.hooks}
    parts = [part_info({**r, "part": {"index": r["index"]}}) for r in p.parts] if p.parts else None
    index = 0
    if parts is not None and len(shards) > INDEX_MIN_SHARDS:
        index, shards = len(index_bytes(shards, list(cfg.hooks))), []
    man = Manifest(
        created_by=library_versions().get("actstore", "0"), config_hash=cfg.config_hash(),
        model=model_info(cfg, model_cfg) if model_cfg is not None else None,
        tokenizer=tokenizer_info(tok, p.special) if tok is not None else None,
        context_length=cfg.context_length, packing=cfg.packing,
        hooks=[HookInfo(name=h, d=dims[h], dtype=cfg.dtype, stored_dtype=NUMPY_STORED[cfg.dtype].name)
               for h in cfg.hooks],
        n_tokens=p.n_tokens, n_sequences=p.n_sequences, n_docs=p.docs.num_rows,
        corpus=CorpusInfo(sha256=p.corpus_sha256, n_docs=p.docs.num_rows), shards=shards, parts=parts,
        shard_index=ShardIndex(path=layout.SHARD_INDEX, sha256="0" * 64, n_shards=len(p.shards)) if index else None,
        extract_config=cfg.public_dict(), versions=library_versions(), stats=stats,
    )
    return len(man.to_json()) + index


# ---- rates and disk ----------------------------------------------------------------------------------------
def _s3_rates(sizes: dict[str, Any], wall: float | None) -> dict[str, Any]:
    """PUTs and bytes per second an object store must absorb at the expected throughput."""
    if not wall:
        return {"objects_per_s": None, "bytes_per_s": None, "note": "no throughput measured (calibrate=False)"}
    rate = sizes["objects"] / wall
    note = None
    if rate > S3_PUTS_PER_PREFIX:
        note = (f"{rate:.0f} PUT/s exceeds S3's {S3_PUTS_PER_PREFIX}/s per prefix; shards use separate "
                "prefixes, but expect throttling (503 SlowDown) until S3 repartitions — raise shard_tokens")
    return {"objects_per_s": rate, "bytes_per_s": sizes["total_bytes"] / wall, "note": note}


def _disk(fs: Any, root: str, total: int) -> dict[str, Any]:
    """Free bytes at a local output (None for object stores) and the bytes still to write there."""
    if not storage.is_local(fs):
        return {"path": root, "free_bytes": None, "required_bytes": total, "existing_bytes": 0}
    existing = _du(root)  # a resumed run only writes what is missing
    probe = root
    while not os.path.exists(probe):  # the output may not exist yet: measure the filesystem it will be on
        probe = os.path.dirname(probe) or "."
    return {"path": root, "free_bytes": int(shutil.disk_usage(probe).free),
            "required_bytes": max(0, total - existing), "existing_bytes": existing}


def _du(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def format_plan(res: dict[str, Any]) -> str:
    """Human-readable plan for the CLI."""
    lines = [f"model        {res['model']}", f"output       {res['output']}"
             + (f" (append: {res['append']}; figures are what the append adds)" if res.get("append") else ""),
             f"tokens       {res['tokens']:,} in {res['sequences']:,} sequences from {res['documents']:,} documents",
             f"shards       {res['shards']:,} ({res['objects_per_shard']} objects each, {res['objects']:,} in all)"]
    for name, h in res["hooks"].items():
        lines.append(f"  {name:34s} d={h['d']:<6d} {h['dtype']:8s} {_gb(h['bytes'])}")
    bound = " (upper bound)" if res["bytes_are_upper_bound"] else ""
    lines += [f"token index  {_gb(res['token_index_bytes'])}", f"metadata     {_gb(res['metadata_bytes'])}"]
    if res["token_outputs_bytes"]:
        lines.append(f"outputs      {_gb(res['token_outputs_bytes'])} (token_outputs, uncompressed)")
    lines.append(f"total        {_gb(res['total_bytes'])}{bound}")
    if res["calibration"]:
        c = res["calibration"]
        lines.append(f"throughput   {c['tokens_per_s']:,.0f} tok/s measured on {c['device']} x {res['workers']} "
                     f"worker(s) = {res['tokens_per_s']:,.0f} tok/s" + (f" ({c['note']})" if c.get("note") else ""))
        f = res["fixed_costs"]
        lines.append(f"wall time    {_duration(res['wall_time_s'])} (start-up {f['startup_s']:.0f}s, planning "
                     f"{f['planning_s']:.0f}s, model load {f['model_load_s']:.0f}s"
                     + (f", Ray start ~{f['ray_start_s']:.0f}s (not measured)" if f.get("ray_start_s") else "")
                     + "; writes timed on local disk)")
        s3 = res["s3"]
        lines.append(f"object store {s3['objects_per_s']:,.1f} PUT/s, {_gb(s3['bytes_per_s'])}/s"
                     + (f" — {s3['note']}" if s3["note"] else ""))
    d = res["disk"]
    free = "unknown (object store)" if d["free_bytes"] is None else _gb(d["free_bytes"])
    lines.append(f"disk         need {_gb(d['required_bytes'])}, free {free}")
    lines.append("OK" if res["ok"] else f"NOT OK: {res['reason']}")
    return "\n".join(lines)


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    h, rem = divmod(round(s), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s" if h else f"{rem // 60}m {rem % 60:02d}s"
