"""`actstore plan` against the extraction it predicts: estimated wall time / measured wall time.

For a tiny random GPT-2 and for MiniLM-L6, over the pydoc corpus, each round runs `actstore plan --json` and then
`actstore extract` on the same config (local executor, a fresh output), both as new processes like a user's, and
divides the plan's `wall_time_s` by the extraction's measured wall time (process start to exit). The goal is a
ratio within [0.5, 2]. The estimate adds measured fixed costs (start-up, planning, model load) to the tokens over
the throughput of a calibration that runs the real shard task; see `actstore.pipeline.extract.estimate`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import ROOT, Ctx, fmt_ratio, log, md_table, minilm_path, ratio_stats

NAME = "plan"
TITLE = "9. `actstore plan`: estimated vs measured extraction time"
GOAL = (0.5, 2.0)


def _corpus(path: Path, n_docs: int | None) -> str:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)][:n_docs]
    path.write_text("\n".join(json.dumps({"text": t}) for t in docs))
    return str(path)


def _tiny_model(tmp: Path) -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.support import build_tiny

    return build_tiny("gpt2", tmp / "models")


def _cli(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "actstore", *args], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"actstore {' '.join(args[:2])} failed: {res.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start, res


def _case(ctx: Ctx, name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    ratios, rows = [], []
    for r in range(1 if ctx.quick else ctx.rounds):  # each round is two new processes: seconds to minutes
        path = ctx.tmp / f"{name}-{r}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "output": str(ctx.tmp / f"{name}-out-{r}"), "progress": False}))
        _, planned = _cli(["plan", str(path), "--json"])
        est = json.loads(planned.stdout)
        measured, _ = _cli(["extract", str(path)])
        ratios.append(est["wall_time_s"] / measured)
        rows.append({"estimate_s": est["wall_time_s"], "measured_s": measured, "tokens": est["tokens"],
                     "fixed_costs": est["fixed_costs"], "tokens_per_s": est["tokens_per_s"]})
        log(f"plan {name} round {r}: estimate {est['wall_time_s']:.1f}s, measured {measured:.1f}s")
    return {"rounds": rows, "ratio": ratio_stats(ratios)}


def run(ctx: Ctx) -> dict[str, Any]:
    corpus_small = _corpus(ctx.tmp / "pydoc-small.jsonl", 60 if ctx.quick else None)
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    cases = {"tiny GPT-2 (3 layers, d=32)": {"model": _tiny_model(ctx.tmp), "corpus": corpus_small, "hooks": hooks,
                                            "context_length": 64, "shard_tokens": 8192, "executor": "local"}}
    if not ctx.quick:
        cases["MiniLM-L6 (6 layers, d=384)"] = {
            "model": minilm_path(), "corpus": corpus_small, "context_length": 128, "shard_tokens": 16384,
            "executor": "local", "hooks": [f"blocks.{i}.hook_resid_post" for i in (1, 3, 5)]}
    return {"cases": {name: _case(ctx, name, cfg) for name, cfg in cases.items()}}


def render(result: dict[str, Any]) -> str:
    rows = []
    for name, case in result["cases"].items():
        last = case["rounds"][-1]
        fixed = ", ".join(f"{k.removesuffix('_s')} {v:.0f}s" for k, v in last["fixed_costs"].items() if v)
        rows.append([name, f"{last['tokens']:,}", f"{last['estimate_s']:.0f} s", f"{last['measured_s']:.0f} s",
                     fmt_ratio(case["ratio"]), fixed])
    return ("Estimated / measured wall time of `actstore extract` (1.00x = exact; goal 0.5x-2x):\n\n"
            + md_table(["model", "tokens", "estimate (last round)", "measured (last round)",
                        "estimate / measured", "fixed costs in the estimate"], rows))


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out = []
    for name, case in result["cases"].items():
        med = case["ratio"]["median"]
        ok = GOAL[0] <= med <= GOAL[1]
        out.append((f"plan estimate / measured time, {name}", fmt_ratio(case["ratio"]), "0.5x-2x",
                    "met" if ok else "**missed**"))
    return out
