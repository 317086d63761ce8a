"""Extraction scaling: wall time and peak driver memory at 1x, 2x and 4x the corpus (should be linear and flat).

Every extraction runs in a fresh Python process (`python -m benchmarks.bench_scaling --child ...`) so peak RSS
is not polluted by earlier runs; the child samples its own RSS every 20 ms during `actstore.extract` and reports
wall time (model load included, interpreter start excluded), tokens, peak RSS and RSS before the call. MiniLM,
2 hooks (blocks.1 and blocks.5 resid_post) in float16, packed context 128, batch 16, and shards small enough
that 1x already spans 4 shards, so growth shows up as more shards, not bigger ones. The corpus is the pydoc
corpus, repeated when 4x needs more text. Full mode repeats the sizes with the Ray executor (each child starts
its own local Ray, included in the wall time; the driver's RSS is measured, the actor's is not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import (
    CONTEXT,
    ROOT,
    Ctx,
    Variant,
    fmt_num,
    fmt_ratio,
    goal_status,
    interleave,
    log,
    md_table,
    median_of,
    ratio_stats,
)

NAME = "scaling"
TITLE = "8. Scaling: wall time and driver memory at 1x, 2x, 4x corpus"
HOOKS = ["blocks.1.hook_resid_post", "blocks.5.hook_resid_post"]


def child_variant(label: str, tokens: int, shard_tokens: int, executor: str, ctx: Ctx) -> Variant:
    def run() -> dict[str, Any]:
        out = ctx.tmp / f"s-{label}-{time.monotonic_ns()}"
        cmd = [sys.executable, "-m", "benchmarks.bench_scaling", "--child", "--tokens", str(tokens),
               "--shard-tokens", str(shard_tokens), "--executor", executor, "--out", str(out),
               "--threads", str(ctx.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode != 0:
            raise RuntimeError(f"scaling child failed: {r.stderr.strip()[-1500:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        subprocess.run(["rm", "-rf", str(out)], check=False)
        return res

    return label, run


def run_group(executor: str, base: int, shard_tokens: int, rounds: int, ctx: Ctx) -> dict[str, Any]:
    variants = [child_variant(f"{executor}_{m}x", base * m, shard_tokens, executor, ctx) for m in (1, 2, 4)]
    res = interleave(variants, rounds, ctx.extra.get("meter"))
    one, two, four = (f"{executor}_{m}x" for m in (1, 2, 4))

    def marginal(a: dict, b: dict) -> float:
        return (b["tokens"] - a["tokens"]) / (b["s"] - a["s"]) if b["s"] > a["s"] else float("nan")

    # Linear in the corpus means constant marginal cost: tokens/s of the 2x->4x increment over the 1x->2x one.
    lin = ratio_stats([marginal(b, c) / marginal(a, b) for a, b, c in zip(res[one], res[two], res[four])])
    fixed = ratio_stats([a["s"] - a["tokens"] / marginal(a, c) for a, c in zip(res[one], res[four])])
    rows = []
    for m in (1, 2, 4):
        name = f"{executor}_{m}x"
        runs = res[name]
        rows.append({
            "mult": m, "tokens": runs[0]["tokens"], "shards": runs[0]["shards"], "wall": median_of(runs, "s"),
            "tok_s": median_of([{"v": r["tokens"] / r["s"]} for r in runs], "v"),
            "peak_mb": median_of([{"v": r["peak_rss"] / 2**20} for r in runs], "v"),
            "time_ratio": ratio_stats([r["s"] / b["s"] for r, b in zip(runs, res[one])]),
            "throughput_ratio": ratio_stats([(r["tokens"] / r["s"]) / (b["tokens"] / b["s"])
                                             for r, b in zip(runs, res[one])]),
            "mem_ratio": ratio_stats([r["peak_rss"] / b["peak_rss"] for r, b in zip(runs, res[one])]),
            "other": median_of(runs, "other_share"),
        })
    return {"executor": executor, "base_tokens": base, "shard_tokens": shard_tokens, "raw": res, "rows": rows,
            "linearity": lin, "fixed_s": fixed}


def run(ctx: Ctx) -> dict[str, Any]:
    groups = []
    if ctx.quick:
        groups.append(run_group("local", 2048, 512, 1, ctx))  # smoke test: one round
    else:
        groups.append(run_group("local", 32768, 8192, min(ctx.rounds, 3), ctx))
        groups.append(run_group("ray", 16384, 4096, min(ctx.rounds, 3), ctx))
    rounds = sorted({len(g["raw"][next(iter(g["raw"]))]) for g in groups})
    return {"groups": groups, "hooks": HOOKS, "rounds_note": "/".join(map(str, rounds))}


def render(result: dict[str, Any]) -> str:
    parts = ["Goal (issues 4 and 11): wall time linear in the corpus and driver memory flat. Measured as: "
             "*linearity* = marginal tokens/s of the 2x→4x increment over that of the 1x→2x increment (1.0 = "
             "exactly linear; goal >= 0.9), *fixed cost* = the intercept of the 1x–4x line (model load, lease, "
             "finalize; a fixed cost makes the whole-run time ratios sub-linear, which is fine), and peak driver "
             "RSS at 4x over 1x (goal <= 1.1x). Ratios are per round against the same round's runs: median "
             "[min–max]; the interpreter start and imports are excluded."]
    for g in result["groups"]:
        table = [[f"{r['mult']}x", f"{r['tokens']:,}", r["shards"], f"{r['wall']:.1f} s", fmt_num(r["tok_s"], " tok/s"),
                  fmt_ratio(r["time_ratio"]), fmt_ratio(r["throughput_ratio"]), f"{r['peak_mb']:.0f} MB",
                  fmt_ratio(r["mem_ratio"]), f"{r['other']:.0%}"] for r in g["rows"]]
        parts.append(f"**{g['executor']} executor** — base {g['base_tokens']:,} tokens, shard_tokens "
                     f"{g['shard_tokens']}, hooks {', '.join(result['hooks'])} (float16), batch 16.")
        parts.append(md_table(["corpus", "tokens", "shards", "wall (median)", "tok/s", "time vs 1x", "throughput vs 1x",
                               "peak driver RSS", "RSS vs 1x", "other CPU"], table))
        parts.append(f"Linearity {fmt_ratio(g['linearity'])} ({goal_status(g['linearity'], 0.9)}); fixed cost "
                     f"{_fmt_s(g['fixed_s'])}.")
    return "\n\n".join(parts)


def _fmt_s(st: dict[str, Any]) -> str:
    if st.get("median") is None:
        return "n/a"
    return f"{st['median']:.2f} s [{st['min']:.2f}–{st['max']:.2f}]"


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out = []
    for g in result["groups"]:
        r4 = next(r for r in g["rows"] if r["mult"] == 4)
        out.append((f"scaling ({g['executor']}): linearity (marginal tok/s 2x→4x over 1x→2x)",
                    fmt_ratio(g["linearity"]), ">= 0.9x", goal_status(g["linearity"], 0.9)))
        out.append((f"scaling ({g['executor']}): peak driver RSS at 4x corpus vs 1x", fmt_ratio(r4["mem_ratio"]),
                    "<= 1.1x", goal_status(r4["mem_ratio"], 1.1, higher_is_better=False)))
    return out


# ------------------------------------------------------------------------------------------------- child
def child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--shard-tokens", type=int, required=True)
    ap.add_argument("--executor", default="local")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from benchmarks.common import extraction_child

    extraction_child(a.threads)
    from transformers import AutoTokenizer

    import actstore
    from benchmarks.common import PeakRss, exact_docs, minilm_path

    docs = exact_docs(a.tokens, AutoTokenizer.from_pretrained(minilm_path()))
    cfg = {"model": minilm_path(), "corpus": docs, "hooks": HOOKS, "context_length": CONTEXT, "packing": True,
           "dtype": "float16", "batch_size": 16, "shard_tokens": a.shard_tokens, "executor": a.executor,
           "progress": False, "output": a.out}
    with PeakRss() as rss:
        t0 = time.perf_counter()
        store = actstore.extract(cfg)
        dt = time.perf_counter() - t0
    print(json.dumps({"s": dt, "tokens": store.n_tokens, "shards": len(store.manifest.shards), "peak_rss": rss.peak,
                      "rss_before": rss.start}))
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        sys.exit(child(sys.argv[1:]))
    log("run this module through benchmarks/run.py --only scaling")
