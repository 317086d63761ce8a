"""Extraction throughput vs a bare `model(**batch)` loop, early exit vs its ceiling, and first-third hooks.

Both sides run the same model (from the same directory), the same packed token batches (taken from actstore's
own shard plan, so the batches are identical), the same batch size and torch threads, in this process.

- bare: `AutoModel` forward over the batches, nothing captured (the baseline of goal 1).
- ceiling: the same weights with the block list cut after the deepest hooked block and a forward hook that
  copies that block's output to numpy (what a hand-written early-exit loop does; the baseline of goal 2).
- extract: `actstore.extract(..., executor=local)` into a fresh directory. "steady" time is the time spent in
  the shard loop (forwards, and the conversion, Zarr writes, statistics and commits they do not overlap:
  measured by wrapping the local executor's `run_rows`, less the time spent reading and tokenizing the corpus);
  "end to end" adds model loading, tokenization, planning and the manifest.
- ray (full mode): the same config on the Ray executor in an already-started local Ray; steady throughput
  from the shards' commit records (their mtimes: tokens of shards 2..n over the time from the first commit to
  the last; the driver sees completions late and in bursts through Ray Data, so its clock would flatter Ray),
  end to end includes the actor pool start and the model load in the actor.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from actstore.schemas.layout import SHARD_RECORD as COMMIT_FILE
from benchmarks.common import (
    CONTEXT,
    Ctx,
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
    minilm_path,
    per_round,
)

NAME = "extract"
TITLE = "1–2. Extraction vs the bare forward pass, early exit vs its ceiling"

_SHARD_TIMES: list[float] = []
_SHARD_DONE: list[tuple[float, int]] = []


@dataclass
class Case:
    label: str
    path: str
    n_layers: int
    batch_size: int
    n_tokens: int
    six: list[str]
    mid: int  # deepest block of the early-exit case
    third: list[str]


def cases(quick: bool) -> list[Case]:
    mini = [f"blocks.{i}.hook_resid_post" for i in range(6)]
    gpt = [f"blocks.{i}.hook_resid_post" for i in (1, 3, 5, 7, 9, 11)]
    return [
        Case("MiniLM-L6 (BERT, 6x384)", minilm_path(), 6, 16 if quick else 32, 2048 if quick else 16384,
             mini, 2, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]),
        Case("GPT-2-small shape (12x768, random weights)", gpt2_small_path(), 12, 8, 1024 if quick else 4096,
             gpt, 5, ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]),
    ]


def _install_timers() -> None:
    """Wrap the local executor's shard loop and the Ray executor's result callback to time shards from outside.

    Local: the time of the shard loop (forward passes and the writes that do not overlap them) less the time
    spent producing its rows (reading, tokenizing and packing the corpus, which is planning, not shard work)."""
    import actstore.pipeline.extract.executors.local as le
    import actstore.pipeline.extract.executors.ray_pool as re_

    if getattr(le.run_rows, "_bench", False):
        return
    orig_rows, orig_ray = le.run_rows, re_.run_ray_parts

    def timed_rows(cfg: Any, rows: Any, *a: Any, **kw: Any) -> Any:
        planning = [0.0]

        def timed(it: Any) -> Any:
            it = iter(it)
            while True:
                t = time.perf_counter()
                try:
                    row = next(it)
                except StopIteration:
                    return
                finally:
                    planning[0] += time.perf_counter() - t
                yield row

        t0 = time.perf_counter()
        try:
            return orig_rows(cfg, timed(rows), *a, **kw)
        finally:
            _SHARD_TIMES.append(time.perf_counter() - t0 - planning[0])

    def timed_ray(cfg: Any, parts: Any, job: Any, pad_id: int, on_result: Any, *a: Any, **kw: Any) -> Any:
        def done(row: dict[str, Any]) -> None:
            _SHARD_DONE.append((time.perf_counter(), int(row["n_tokens"])))
            on_result(row)
        return orig_ray(cfg, parts, job, pad_id, done, *a, **kw)

    timed_rows._bench = True  # type: ignore[attr-defined]
    le.run_rows, re_.run_ray_parts = timed_rows, timed_ray


class Batches:
    """The exact batches the shard task forms (per shard, sequences sorted by length, padded on the right)."""

    def __init__(self, case: Case, docs: list[dict], shard_tokens: int) -> None:
        import torch

        from actstore.pipeline.extract.sharding import make_plan
        from actstore.schemas.config import ExtractConfig
        from actstore.workers.runner import load_tokenizer

        cfg = ExtractConfig.build(_config(case, docs, case.six, "float32", shard_tokens, "local", "/unused"))
        plan = make_plan(cfg, load_tokenizer(case.path))
        self.n_tokens, self.pad = plan.n_tokens, plan.special.pad
        self.batches: list[dict[str, Any]] = []
        for shard in plan.shards:
            lengths = np.array([len(s.ids) for s in shard.sequences])
            order = np.argsort(lengths, kind="stable")
            for b in range(0, len(order), case.batch_size):
                seqs = [shard.sequences[i].ids for i in order[b:b + case.batch_size]]
                lens = [len(s) for s in seqs]
                ids = torch.full((len(seqs), max(lens)), self.pad, dtype=torch.long)
                for i, s in enumerate(seqs):
                    ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
                mask = None
                if min(lens) != max(lens):
                    mask = (torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]).long()
                self.batches.append({"input_ids": ids, "attention_mask": mask})


def _config(case: Case, docs: list[dict], hooks: list[str], dtype: str, shard_tokens: int, executor: str,
            out: str) -> dict[str, Any]:
    return {"model": case.path, "corpus": docs, "hooks": hooks, "context_length": CONTEXT, "packing": True,
            "dtype": dtype, "batch_size": case.batch_size, "shard_tokens": shard_tokens, "executor": executor,
            "progress": False, "output": out}


def bare_loop(case: Case, batches: Batches, truncate_after: int | None = None) -> Variant:
    """The baseline loop; with truncate_after=k the early-exit ceiling (blocks cut after k, numpy copy hook)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(case.path).eval()
    name = "bare"
    if truncate_after is not None:
        name = f"ceiling@{truncate_after}"
        owner, attr = (model, "h") if hasattr(model, "h") else (model.encoder, "layer")
        blocks = getattr(owner, attr)[: truncate_after + 1]
        setattr(owner, attr, blocks)
        kept: list[np.ndarray] = []

        def copy_out(mod: Any, args: Any, out: Any) -> None:
            t = out if isinstance(out, torch.Tensor) else out[0]
            kept.append(t.reshape(-1, t.shape[-1]).numpy().copy())

        blocks[-1].register_forward_hook(copy_out)

    def run() -> dict[str, Any]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches.batches:
                model(**b, use_cache=False)
        dt = time.perf_counter() - t0
        if truncate_after is not None:
            kept.clear()
        return {"s": dt, "tokens": batches.n_tokens}

    return name, run


def extract_variant(name: str, case: Case, docs: list[dict], hooks: list[str], dtype: str, shard_tokens: int,
                    ctx: Ctx, executor: str = "local") -> Variant:
    import actstore

    def run() -> dict[str, Any]:
        out = ctx.tmp / f"x-{uuid.uuid4().hex[:8]}"
        _SHARD_TIMES.clear()
        _SHARD_DONE.clear()
        t0 = time.perf_counter()
        store = actstore.extract(_config(case, docs, hooks, dtype, shard_tokens, executor, str(out)))
        dt = time.perf_counter() - t0
        n = store.n_tokens
        commits = sorted((p.stat().st_mtime, info.n_tokens) for info in store.manifest.shards
                         for p in [out / "shards" / info.id / COMMIT_FILE] if p.exists())
        shutil.rmtree(out, ignore_errors=True)
        res: dict[str, Any] = {"s_e2e": dt, "tokens": n}
        if executor == "local":
            res["s"] = sum(_SHARD_TIMES)
        elif len(commits) >= 3:
            # Shard commit records are written by the actor as each shard completes: their mtimes time the
            # shards where they run (the driver sees completions late and in bursts through Ray Data).
            (t_first, _), (t_last, _) = commits[0], commits[-1]
            res["s"] = (t_last - t_first) * n / sum(k for _, k in commits[1:])  # steady time for n tokens
            res["s_driver"] = _driver_steady(n)
        else:
            res["s"] = dt
        return res

    return name, run


def _driver_steady(n: int) -> float | None:
    """Steady time for n tokens from the completion times the driver saw (for comparison with the mtimes)."""
    if len(_SHARD_DONE) < 3:
        return None
    (t_first, _), (t_last, _) = _SHARD_DONE[0], _SHARD_DONE[-1]
    return (t_last - t_first) * n / sum(k for _, k in _SHARD_DONE[1:])


def _rate(key: str):
    """tokens/s from the timing `key`; baselines (bare loops) only have "s", which is their whole run."""
    return lambda r: r["tokens"] / (r.get(key) or r["s"]) if (r.get(key) or r.get("s")) else 0.0


def run_case(case: Case, ctx: Ctx) -> dict[str, Any]:
    from transformers import AutoTokenizer

    docs = exact_docs(case.n_tokens, AutoTokenizer.from_pretrained(case.path))
    shard_tokens = 8192
    batches = Batches(case, docs, shard_tokens)
    last = f"blocks.{case.n_layers - 1}.hook_resid_post"
    mid = [f"blocks.{case.mid}.hook_resid_post"]
    variants = [bare_loop(case, batches), bare_loop(case, batches, truncate_after=case.mid),
                extract_variant("x_1hook_fp32", case, docs, [last], "float32", shard_tokens, ctx),
                extract_variant("x_mid_fp32", case, docs, mid, "float32", shard_tokens, ctx),
                extract_variant("x_third_fp32", case, docs, case.third, "float32", shard_tokens, ctx)]
    if not ctx.quick or case.n_layers == 6:  # quick mode: the 6-hook dtype sweep on MiniLM only
        variants += [extract_variant(f"x_6hooks_{short}", case, docs, case.six, dt, shard_tokens, ctx)
                     for short, dt in (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"))]
    log(f"{case.label}: {batches.n_tokens} tokens per run, {len(batches.batches)} batches of {case.batch_size}")
    # Untimed first passes: first-touch costs (imports, page cache, allocator) are not extraction work.
    variants[0][1]()
    if not (ctx.quick and case.n_layers != 6):
        variants[2][1]()
    res = interleave(variants, ctx.rounds, ctx.extra.get("meter"))
    rows = summarize(case, res, last, mid[0])
    out = {"case": case.label, "tokens": batches.n_tokens, "batch_size": case.batch_size, "shard_tokens": shard_tokens,
           "raw": res, "rows": rows}
    if not ctx.quick and case.n_layers == 6:
        out["ray"] = run_ray_group(case, docs, batches, ctx)
    return out


def summarize(case: Case, res: dict[str, list[dict]], last: str, mid: str) -> list[dict[str, Any]]:
    rows = []
    ceil = f"ceiling@{case.mid}"

    def row(what: str, hooks: str, dtype: str, num: str, den: str, goal: float | None) -> None:
        if num not in res:
            return
        rows.append({"what": what, "hooks": hooks, "dtype": dtype, "variant": num, "baseline": den,
                     "rate": median_of([{"r": _rate("s")(r)} for r in res[num]], "r"),
                     "base_rate": median_of([{"r": _rate("s")(r)} for r in res[den]], "r"),
                     "steady": per_round(res, num, den, _rate("s")), "best": best_ratio(res, num, den, _rate("s")),
                     "e2e": per_round(res, num, den, _rate("s_e2e")) if "s_e2e" in res[num][0] else None,
                     "other": median_of(res[num] + res[den], "other_share"), "goal": goal})

    row("1 hook (last block)", last, "float32", "x_1hook_fp32", "bare", 0.95)
    for dt in ("fp32", "fp16", "bf16"):
        row("6 hooks", ", ".join(h.split(".")[1] for h in case.six), dt, f"x_6hooks_{dt}", "bare", 0.95)
    row(f"early exit: 1 hook after block {case.mid}", mid, "float32", "x_mid_fp32", ceil, 0.95)
    row(f"ceiling (cut after block {case.mid}) vs full bare", mid, "float32", ceil, "bare", None)
    row("hooks only in first third", ", ".join(case.third), "float32", "x_third_fp32", "bare", 2.5)
    return rows


def run_ray_group(case: Case, docs: list[dict], batches: Batches, ctx: Ctx) -> dict[str, Any]:
    """Full mode: Ray executor vs bare loop vs local executor, in a local Ray started once (startup timed)."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False,
             configure_logging=False)
    startup = time.perf_counter() - t0
    shard_tokens = max(CONTEXT * case.batch_size, case.n_tokens // 4)
    try:
        variants = [bare_loop(case, batches),
                    extract_variant("ray_6hooks_fp16", case, docs, case.six, "float16", shard_tokens, ctx, "ray"),
                    extract_variant("local_6hooks_fp16", case, docs, case.six, "float16", shard_tokens, ctx)]
        variants[1][1]()  # untimed: first actor start pays worker-process imports
        res = interleave(variants, ctx.rounds, ctx.extra.get("meter"))
    finally:
        ray.shutdown()
    rows = []
    for num in ("ray_6hooks_fp16", "local_6hooks_fp16"):
        rows.append({"what": f"6 hooks, {num.split('_')[0]} executor, {case.n_tokens // shard_tokens} shards",
                     "hooks": ", ".join(h.split(".")[1] for h in case.six), "dtype": "fp16", "variant": num,
                     "baseline": "bare", "rate": median_of([{"r": _rate("s")(r)} for r in res[num]], "r"),
                     "base_rate": median_of([{"r": _rate("s")(r)} for r in res["bare"]], "r"),
                     "steady": per_round(res, num, "bare", _rate("s")),
                     "best": best_ratio(res, num, "bare", _rate("s")),
                     "e2e": per_round(res, num, "bare", _rate("s_e2e")),
                     "other": median_of(res[num] + res["bare"], "other_share"), "goal": 0.9})
    return {"ray_init_s": startup, "shard_tokens": shard_tokens, "raw": res, "rows": rows}


def run(ctx: Ctx) -> dict[str, Any]:
    import torch

    torch.set_num_threads(ctx.threads)
    _install_timers()
    return {"cases": [run_case(c, ctx) for c in cases(ctx.quick)]}


def render(result: dict[str, Any]) -> str:
    parts = [
        "Goals (issues 4 and 11): extraction >= 0.95x the bare loop (0.9x at least; steady state), early exit "
        ">= 0.95x its ceiling, hooks only in the first third >= 2.5x the full-depth bare loop. Ratios are "
        "throughput ratios (> 1: faster than the baseline). *steady* = time inside the shard tasks (forward + "
        "conversion + Zarr write + statistics + commit); *end to end* = the whole `actstore.extract` call "
        "(adds model load, tokenization, planning, manifest). *best/best* = fastest run over fastest run (noise "
        "only slows runs down, so it estimates the uncontended ratio); *other CPU* = median share of the machine "
        "used by other processes during the two variants' runs; tok/s columns are medians over rounds.",
    ]
    for c in result["cases"]:
        rows = c["rows"] + (c.get("ray", {}).get("rows", []))
        table = [[r["what"], r["dtype"], r["baseline"], fmt_num(r["base_rate"], " tok/s"), fmt_num(r["rate"], " tok/s"),
                  fmt_ratio(r["steady"]), fmt_x(r["best"]), fmt_ratio(r["e2e"]), f"{r['other']:.0%}",
                  "—" if r["goal"] is None else f">= {r['goal']}x", goal_status(r["steady"], r["goal"])]
                 for r in rows]
        parts.append(f"**{c['case']}** — {c['tokens']:,} tokens per run (context {CONTEXT}, packed), batch "
                     f"{c['batch_size']} sequences, shard_tokens {c['shard_tokens']}, local executor unless named.")
        parts.append(md_table(["case", "storage", "baseline", "baseline tok/s", "tok/s (steady)",
                               "ratio steady", "best/best", "ratio end to end", "other CPU", "goal", "status"], table))
        if "ray" in c:
            parts.append(f"Ray: `ray.init` took {c['ray']['ray_init_s']:.1f} s (excluded); shard_tokens "
                         f"{c['ray']['shard_tokens']}; its end-to-end ratio includes the actor start and model load.")
    return "\n\n".join(parts)


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out = []
    for c in result["cases"]:
        short = c["case"].split(" (")[0]
        for r in c["rows"] + c.get("ray", {}).get("rows", []):
            if r["goal"] is not None:
                out.append((f"{short}: {r['what']} ({r['dtype']}) vs {r['baseline']}", fmt_ratio(r["steady"]),
                            f">= {r['goal']}x", goal_status(r["steady"], r["goal"])))
    return out
