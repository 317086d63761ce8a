"""Extraction vs the peers on the same model, tokens, batch and threads: SAELens' activation caching and a plain
TransformerLens `run_with_cache` loop (issue 11 item 3).

Model: the GPT-2-small-shaped random-weight checkpoint of bench_extract (12 x 768). actstore loads it with
transformers; the peer process (benchmarks/peer_extract.py, in the peers' venv) builds a TransformerLens
`HookedTransformer` from a config and the same weights (TransformerLens' GPT-2 conversion, no folding or
centering) and checks it against HF and against the rows actstore stored. Tokens: one untimed actstore run packs
the corpus (context 128, full windows only); its stored token ids, in row order, are what the peers get as an
in-memory tokenized `datasets.Dataset` (or tensor batches), so every side computes exactly the same windows,
batch 8 sequences, float32 storage, torch threads as the run.

Timed, all sides: everything after the model is in memory up to the last activation stored (actstore, SAELens
cache: on disk) or in hand (in-memory loops). Not timed: interpreter start, imports, model load (actstore: the
`make_runner` call, timed and subtracted; SAELens: `load_model` is replaced by the prebuilt model), deleting the
outputs. actstore's time additionally includes loading the tokenizer, tokenizing and planning the corpus (the
peers get it tokenized), the statistics, checksums and manifest.

- actstore: `actstore.extract(executor=local)`, all hooks in one run; *steady* = time inside the shard tasks.
- saelens_cache: `CacheActivationsRunner`, one run per hook (one `hook_name` per config), `stop_at_layer`.
- saelens_store: `ActivationsStore.get_raw_llm_batch` loop per hook, in memory.
- saelens_multi (4 hooks, reference): SAELens' multi-hook store (one forward for all hooks, in memory); its
  CacheActivationsRunner cannot use it.
- tl_rwc: `HookedTransformer.run_with_cache(batch, names_filter=hooks)` loop, whole model (no stop_at_layer).
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    CONTEXT,
    Ctx,
    PeerProcess,
    Variant,
    best_ratio,
    exact_docs,
    fmt_num,
    fmt_ratio,
    fmt_x,
    goal_status,
    gpt2_small_path,
    interleave,
    log,
    md_table,
    median_of,
    peers_ready,
    per_round,
)

NAME = "peers_extract"
TITLE = "3. Extraction vs SAELens' activation cache and TransformerLens `run_with_cache`"
BATCH, SHARD_TOKENS = 8, 8192
MID = ["blocks.5.hook_resid_post"]
FOUR = [f"blocks.{i}.hook_resid_post" for i in (2, 5, 8, 11)]
GOALS = {("1", "saelens_cache"): 1.0, ("4", "saelens_cache"): 2.0}

PEER_VARIANTS = [(f"{n}_{k}", impl, hooks) for k, hooks in (("1", MID), ("4", FOUR))
                 for n, impl in (("saelens_cache", "cache"), ("saelens_store", "store"), ("tl_rwc", "rwc"))]
PEER_VARIANTS.append(("saelens_multi_4", "store_multi", FOUR))
SLOW = {"saelens_store_4", "tl_rwc_4"}  # left out in quick mode: their code paths run in the 1-hook variants
WARM = {"saelens_cache_1", "saelens_store_1", "tl_rwc_1", "saelens_multi_4"}

_TIMES: dict[str, list[float]] = {"load": []}


# ------------------------------------------------------------------------------------------------ actstore
def _install_timers() -> None:
    """Time the local executor's shard loop (steady state: bench_extract's timer, planning excluded) and its model
    load (subtracted from end to end)."""
    import actstore.pipeline.extract.executors.local as le
    from benchmarks import bench_extract

    bench_extract._install_timers()
    if getattr(le.make_runner, "_bench_peers", False):
        return
    orig = le.make_runner

    def timed_load(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            _TIMES["load"].append(time.perf_counter() - t0)

    timed_load._bench_peers = True  # type: ignore[attr-defined]
    le.make_runner = timed_load


def _shard_times() -> list[float]:
    """The shard-loop times bench_extract's timer records (one entry per run)."""
    from benchmarks import bench_extract

    return bench_extract._SHARD_TIMES


def _config(docs: list[dict], hooks: list[str], out: Path) -> dict[str, Any]:
    return {"model": gpt2_small_path(), "corpus": docs, "hooks": hooks, "context_length": CONTEXT, "packing": True,
            "dtype": "float32", "batch_size": BATCH, "shard_tokens": SHARD_TOKENS, "executor": "local",
            "progress": False, "output": str(out)}


def actstore_variant(name: str, docs: list[dict], hooks: list[str], ctx: Ctx) -> Variant:
    import actstore

    def run() -> dict[str, Any]:
        out = ctx.tmp / f"x-{uuid.uuid4().hex[:8]}"
        for v in _TIMES.values():
            v.clear()
        _shard_times().clear()
        t0 = time.perf_counter()
        store = actstore.extract(_config(docs, hooks, out))
        dt = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        n = store.n_tokens
        return {"s": dt - sum(_TIMES["load"]), "s_steady": sum(_shard_times()), "load_s": sum(_TIMES["load"]),
                "tokens": n, "hook_tokens": n * len(hooks)}

    return name, run


def windows_and_rows(docs: list[dict], ctx: Ctx, n_check: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One untimed extraction of the four hooks: the packed windows in row order, and the first n_check windows'
    stored rows per hook (for the parity check against TransformerLens)."""
    import actstore

    store = actstore.extract(_config(docs, FOUR, ctx.tmp / "setup"))
    tok = store.tokens()
    ids = np.asarray(tok.column("token_id"), np.int64)
    pos = np.asarray(tok.column("position"), np.int64)
    assert len(ids) % CONTEXT == 0 and (pos == np.tile(np.arange(CONTEXT), len(ids) // CONTEXT)).all(), \
        "expected full packed windows in row order"
    rows = {h: np.concatenate([store.read_rows(h, 0, 0, n_check * CONTEXT)]) for h in FOUR}
    shutil.rmtree(ctx.tmp / "setup", ignore_errors=True)
    return ids.reshape(-1, CONTEXT), rows


# ----------------------------------------------------------------------------------------------------- peer
class Peer(PeerProcess):
    """The peer process of peer_extract.py; each variant sends one JSON command."""

    def __init__(self, windows: Path, threads: int, log_path: Path) -> None:
        super().__init__("peer_extract.py", ["--model", gpt2_small_path(), "--windows", str(windows),
                                             "--threads", str(threads)], log_path)

    def variant(self, name: str, impl: str, hooks: list[str], tmp: Path) -> Variant:
        def run() -> dict[str, Any]:
            cmd = {"impl": impl, "hooks": hooks, "batch": BATCH}
            if impl == "cache":
                cmd["out"] = str(tmp / f"cache-{uuid.uuid4().hex[:8]}")
            return self.call(cmd)
        return name, run


def actstore_parity(peer: Peer, rows: dict[str, np.ndarray], n_check: int, tmp: Path) -> dict[str, float]:
    """Max abs / relative difference between actstore's stored rows and TransformerLens' activations."""
    path = tmp / "tl_dump.npz"
    peer.call({"dump": str(path), "hooks": FOUR, "n_seq": n_check})
    tl = np.load(path)
    diff = max(float(np.abs(tl[h] - rows[h]).max()) for h in FOUR)
    scale = max(float(np.abs(rows[h]).max()) for h in FOUR)
    return {"max_abs": diff, "max_rel": diff / scale}


# ------------------------------------------------------------------------------------------------------ run
def _rate(key: str):
    return lambda r: r["hook_tokens"] / r[key] if r.get(key) else 0.0


def run(ctx: Ctx) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(ctx.threads)
    _install_timers()
    n_tokens = 1024 if ctx.quick else 4096
    docs = exact_docs(n_tokens, AutoTokenizer.from_pretrained(gpt2_small_path()))
    n_check = 2
    windows, rows = windows_and_rows(docs, ctx, n_check)
    np.save(ctx.tmp / "windows.npy", windows)
    rounds = 1 if ctx.quick else ctx.rounds  # quick: a smoke test of every code path, < 60 s on a quiet box
    out: dict[str, Any] = {"tokens": int(windows.size), "n_seq": len(windows), "batch": BATCH,
                           "shard_tokens": SHARD_TOKENS, "mid": MID, "four": FOUR, "rounds_note": str(rounds)}
    status = peers_ready(bool(ctx.extra.get("install_peers")) or not ctx.quick)
    peer = None
    if status == "ok":
        try:
            log("starting the peer process (SAELens / TransformerLens imports, model build, HF parity check)")
            peer = Peer(ctx.tmp / "windows.npy", ctx.threads, ctx.tmp / "peer.log")
            out["peer_versions"], out["parity_hf"] = peer.hello["versions"], peer.hello["parity_hf"]
            out["parity_actstore"] = actstore_parity(peer, rows, n_check, ctx.tmp)
        except Exception as e:  # e.g. an offline failure: record why, still measure actstore alone
            status = f"failed to start: {type(e).__name__}: {e}"
            peer = None
    out["peer_status"] = status
    log(f"peers_extract: {windows.size} tokens ({len(windows)} windows), batch {BATCH}; peers: {status}; "
        f"parity {out.get('parity_hf')}, {out.get('parity_actstore')}")
    variants = [actstore_variant("actstore_1", docs, MID, ctx), actstore_variant("actstore_4", docs, FOUR, ctx)]
    if peer is not None:
        variants += [peer.variant(name, impl, hooks, ctx.tmp) for name, impl, hooks in PEER_VARIANTS
                     if not ctx.quick or name not in SLOW]
    try:
        if not ctx.quick:
            # Untimed: one pass of each peer code path (TransformerLens' first full-size forwards and datasets'
            # first writes are several times slower than later ones); actstore was warmed by the setup run.
            for name, fn in variants:
                if name in WARM:
                    log(f"warm-up {name}")
                    fn()
        out["raw"] = interleave(variants, rounds, ctx.extra.get("meter"))
    finally:
        if peer is not None:
            peer.close()
    out["rows"] = summarize(out["raw"])
    return out


def summarize(res: dict[str, list[dict]]) -> list[dict[str, Any]]:
    rows = []
    for k in ("1", "4"):
        ours = f"actstore_{k}"
        for base in ("saelens_cache", "saelens_store", "saelens_multi", "tl_rwc"):
            name = f"{base}_{k}"
            if name not in res:
                continue
            rows.append({"hooks": k, "baseline": base, "variant": ours,
                         "rate": median_of([{"r": _rate("s")(r)} for r in res[ours]], "r"),
                         "rate_steady": median_of([{"r": _rate("s_steady")(r)} for r in res[ours]], "r"),
                         "base_rate": median_of([{"r": _rate("s")(r)} for r in res[name]], "r"),
                         "e2e": per_round(res, ours, name, _rate("s")), "best": best_ratio(res, ours, name, _rate("s")),
                         "steady": per_round(res, ours, name, lambda r: _rate("s_steady")(r) or _rate("s")(r)),
                         "other": median_of(res[ours] + res[name], "other_share"), "goal": GOALS.get((k, base))})
    return rows


# --------------------------------------------------------------------------------------------------- report
LABELS = {"saelens_cache": "SAELens `CacheActivationsRunner` (disk)", "saelens_store":
          "SAELens `get_raw_llm_batch` loop (memory)", "saelens_multi": "SAELens multi-hook store (memory; ref.)",
          "tl_rwc": "TransformerLens `run_with_cache` loop (memory)"}


def _case(k: str) -> str:
    return "1 hook, after block 5 of 12" if k == "1" else "4 hooks, after blocks 2, 5, 8, 11"


def render(result: dict[str, Any]) -> str:
    parts = [
        "Goals (issue 11 item 3): one hook at mid-depth >= 1.0x SAELens' `CacheActivationsRunner` (which stops at "
        "the hook's layer: ceiling ~1.1x); four hooks >= 2x it in total hook-tokens/s (it caches one hook per run, "
        "so four runs; ceiling ~2.5x). Ratio = actstore hook-tokens/s over the peer's, per round (median "
        "[min–max]); *end to end* = from the config to the last activation stored / in hand, without interpreter "
        "start, imports and model load on either side (actstore's model load is timed and subtracted; SAELens gets "
        "the prebuilt model in place of `load_model`), with tokenization and planning on actstore's side only (the "
        "peers get the packed token windows); *steady* = actstore's time inside the shard tasks over the same "
        "peer time. Peers run in their own venv in one long-lived process; storage float32 on every side; "
        "SAELens' cache also stores int32 token ids, actstore a token index, statistics and checksums.",
        f"GPT-2-small shape (12x768, random weights); {result['tokens']:,} tokens per run = {result['n_seq']} "
        f"windows of {CONTEXT} (packed `pydoc_data.topics`, the exact windows actstore stored), batch "
        f"{result['batch']} sequences, actstore shard_tokens {result['shard_tokens']} (local executor).",
    ]
    table = []
    for r in result["rows"]:
        goal = r["goal"]
        table.append([_case(r["hooks"]), LABELS[r["baseline"]], fmt_num(r["base_rate"], " hook-tok/s"),
                      fmt_num(r["rate"], " hook-tok/s"), fmt_ratio(r["e2e"]), fmt_x(r["best"]),
                      fmt_ratio(r["steady"]), f"{r['other']:.0%}", "—" if goal is None else f">= {goal}x",
                      goal_status(r["e2e"], goal) if goal else "—"])
    if table:
        parts.append(md_table(["case", "baseline", "baseline rate", "actstore rate (end to end)",
                               "ratio end to end", "best/best", "ratio steady", "other CPU", "goal", "status"],
                              table))
    else:
        parts.append("No peer measured (see below); actstore alone: "
                     + ", ".join(f"{n}: {fmt_num(median_of([{'r': _rate('s')(r)} for r in v], 'r'), ' hook-tok/s')}"
                                 for n, v in result["raw"].items()))
    if result.get("parity_hf"):
        p, a = result["parity_hf"], result.get("parity_actstore") or {}
        parts.append(f"Same computation: TransformerLens vs HF GPT-2 on 2 windows, `hook_resid_post` of every block "
                     f"max abs diff {p['resid_post_max_abs']:.1e} (relative {p['resid_post_max_rel']:.1e}), logits "
                     f"{p['logits_max_abs']:.1e}; TransformerLens vs the rows actstore stored (4 hooks, first 2 "
                     f"windows) {a.get('max_abs', float('nan')):.1e} (relative {a.get('max_rel', float('nan')):.1e}).")
    if result.get("peer_versions"):
        parts.append("Peer versions: " + ", ".join(f"{k} {v}" for k, v in result["peer_versions"].items()) + ".")
    if result["peer_status"] != "ok":
        parts.append(f"Peers not measured: {result['peer_status']}")
    return "\n\n".join(parts)


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out = []
    for r in result["rows"]:
        if r["goal"] is not None:
            out.append((f"extraction {_case(r['hooks'])}: actstore vs SAELens CacheActivationsRunner (hook-tok/s)",
                        fmt_ratio(r["e2e"]), f">= {r['goal']}x", goal_status(r["e2e"], r["goal"])))
    if not result["rows"]:
        out.append(("extraction vs SAELens / TransformerLens", "not measured", ">= 1.0x / 2.0x",
                    result["peer_status"][:80]))
    return out
