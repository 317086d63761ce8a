"""Driver scale: peak driver RSS and time to the first committed shard, for synthetic corpora of growing size.

Each size runs in a fresh Python process (`python -m benchmarks.bench_driver --child ...`), so peak RSS is not
polluted by earlier runs. The child writes a synthetic .jsonl corpus (documents of random words, ~1000 tokens
each) of about the requested number of tokens, then runs `actstore.extract` with the local executor and a tiny
random GPT-2 (3 layers, d=32; one hook, float16, context 128, 64k-token shards), while two threads watch it: one
samples the process' RSS every 20 ms, one polls the output for the first `shards/*/shard.json` (the shard's commit
record). It reports the peak RSS over the RSS before the call, the time from the call to the first commit, the
whole run's wall time and the stored token count. Interpreter start, imports and writing the corpus are excluded.

Also reported per size: planning-only throughput (the corpus read, tokenized and packed by one `PartPlanner` in
the same child, no model), which bounds how fast one reading worker can feed the model.

This is a measurement (no timing is asserted anywhere); the goal of issue 18 is RSS(largest) <= RSS(1M) + 256 MiB
and first shard <= 60 s at every size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Ctx, log, md_table

NAME = "driver"
TITLE = "10. Driver scale: peak driver RSS and time to the first committed shard"
HOOK = "blocks.1.hook_resid_post"
SHARD_TOKENS = 65536
FULL_SIZES = (1 << 20, 16 << 20, 64 << 20)
QUICK_SIZES = (1 << 18, 1 << 20)


def write_corpus(path: Path, tokenizer: Any, n_tokens: int, seed: int = 0) -> int:
    """A .jsonl corpus of about `n_tokens` tokens of `tokenizer` (random words); returns the estimated count."""
    rng = random.Random(seed)
    from pydoc_data.topics import topics

    words = sorted({w for t in topics.values() for w in t.split() if w.isalpha() and len(w) < 12})
    sample = " ".join(rng.choice(words) for _ in range(20000))
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 20000
    doc_words = max(1, int(1000 / per_word))
    n_docs = max(1, round(n_tokens / (doc_words * per_word)))
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(rng.choices(words, k=doc_words))
            f.write(json.dumps({"text": text, "n": i}) + "\n")
    return int(n_docs * doc_words * per_word)


class FirstCommit:
    """Watches an output folder for the first shard commit record; `seconds` is the time since `start`."""

    def __init__(self, out: Path, start: float, period: float = 0.05) -> None:
        self.out, self.start, self.period, self.seconds = out, start, period, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        shards = self.out / "shards"
        while not self._stop.wait(self.period):
            if shards.is_dir() and any(shards.glob("*/shard.json")):
                self.seconds = time.perf_counter() - self.start
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Status:
    """Writes the run's progress (elapsed, first commit, peak RSS so far, committed shards) to a JSON file every
    few seconds, so a run stopped early still tells what it measured."""

    def __init__(self, path: Path, out: Path, start: float, rss: Any, first: FirstCommit, extra: dict) -> None:
        self.path, self.out, self.start, self.rss, self.first, self.extra = path, out, start, rss, first, extra
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(5.0):
            shards = len(list((self.out / "shards").glob("*/shard.json"))) if (self.out / "shards").is_dir() else 0
            self.path.write_text(json.dumps({
                "elapsed_s": time.perf_counter() - self.start, "first_shard_s": self.first.seconds,
                "peak_rss": self.rss.peak, "rss_before": self.rss.start, "committed_shards": shards,
                "shard_tokens": SHARD_TOKENS, **self.extra}))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def plan_only(corpus: str, tokenizer: Any) -> dict[str, float]:
    """Read, tokenize and pack the corpus with the run's planner, no model: tokens/s of one reading worker."""
    from actstore.schemas.config import ExtractConfig
    from actstore.workers.part_task import PartJob, part_planner
    from actstore.workers.parts import CorpusSpec, list_parts
    from actstore.workers.tokenize import special_ids

    cfg = ExtractConfig.build(dict(model="unused", corpus=corpus, hooks=[HOOK], context_length=128,
                                   shard_tokens=SHARD_TOKENS, output="unused"))
    special, job = special_ids(tokenizer), PartJob.of(cfg)
    t0, n = time.perf_counter(), 0
    for part in list_parts(CorpusSpec.of(cfg)):
        for plan in part_planner(part, job, tokenizer, special):
            n += plan.n_tokens
    return {"plan_s": time.perf_counter() - t0, "plan_tokens": n}


def child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from benchmarks.common import extraction_child

    extraction_child(a.threads)
    from transformers import AutoTokenizer

    import actstore
    from benchmarks.common import PeakRss
    from tests.support import build_tiny

    work = Path(a.work)
    model = build_tiny("gpt2", work / "models")
    tok = AutoTokenizer.from_pretrained(model)
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, tok, a.tokens)
    planned = plan_only(str(corpus), tok)
    out = work / "store"
    cfg = {"model": model, "corpus": str(corpus), "hooks": [HOOK], "context_length": 128, "packing": True,
           "dtype": "float16", "batch_size": 32, "shard_tokens": SHARD_TOKENS, "executor": "local",
           "progress": False, "output": str(out)}
    with PeakRss() as rss:
        t0 = time.perf_counter()
        first = FirstCommit(out, t0)
        status = _Status(work / "status.json", out, t0, rss, first, planned)
        store = actstore.extract(cfg)
        dt = time.perf_counter() - t0
        first.stop()
        status.stop()
    print(json.dumps({"s": dt, "first_shard_s": first.seconds, "tokens": store.n_tokens,
                      "shards": len(store.manifest.shards), "parts": len(store.manifest.parts or []),
                      "corpus_bytes": corpus.stat().st_size, "peak_rss": rss.peak, "rss_before": rss.start,
                      **planned}))
    return 0


def _run_child(tokens: int, ctx: Ctx) -> dict[str, Any]:
    work = ctx.tmp / f"driver-{tokens}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "benchmarks.bench_driver", "--child", "--tokens", str(tokens), "--work", str(work),
           "--threads", str(ctx.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    subprocess.run(["rm", "-rf", str(work)], check=False)
    if r.returncode != 0:
        raise RuntimeError(f"driver child failed: {r.stderr.strip()[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(ctx: Ctx) -> dict[str, Any]:
    rows = []
    for n in QUICK_SIZES if ctx.quick else FULL_SIZES:
        log(f"driver scale: {n:,} tokens")
        rows.append({"target": n, **_run_child(n, ctx)})
    return {"rows": rows, "hook": HOOK, "shard_tokens": SHARD_TOKENS}


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = rows[0]["peak_rss"] - rows[0]["rss_before"]
    table = [[f"{r['tokens']:,}", f"{r['corpus_bytes'] / 2**20:.0f} MiB", r["parts"], r["shards"],
              f"{(r['peak_rss'] - r['rss_before']) / 2**20:.0f} MiB",
              f"{(r['peak_rss'] - r['rss_before'] - base) / 2**20:+.0f} MiB",
              f"{r['first_shard_s']:.1f} s" if r["first_shard_s"] is not None else "n/a", f"{r['s']:.1f} s",
              f"{r['tokens'] / r['s'] / 1e3:.0f}k", f"{r['plan_tokens'] / r['plan_s'] / 1e3:.0f}k"] for r in rows]
    return "\n\n".join([
        "Goal (issue 18): peak driver RSS at the largest corpus <= RSS at 1M tokens + 256 MiB; first committed shard "
        f"<= 60 s at every size. Local executor, tiny random GPT-2, hook {result['hook']} (float16), packed context "
        f"128, shard_tokens {result['shard_tokens']:,}, batch 32, default part_bytes (256 MiB). Peak RSS is over the "
        "RSS before `extract` (model load included). One run per size (each minutes long on 2 cores).",
        md_table(["tokens", "corpus", "parts", "shards", "peak driver RSS growth", "vs smallest",
                  "first shard", "wall", "extract tok/s", "plan-only tok/s"], table)])


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = result["rows"]
    growth = (rows[-1]["peak_rss"] - rows[-1]["rss_before"] - rows[0]["peak_rss"] + rows[0]["rss_before"]) / 2**20
    first = max(r["first_shard_s"] or float("inf") for r in rows)
    return [
        (f"driver: peak RSS at {rows[-1]['tokens']:,} tokens over {rows[0]['tokens']:,}", f"{growth:+.0f} MiB",
         "<= +256 MiB", "met" if growth <= 256 else "not met"),
        ("driver: slowest time to the first committed shard", f"{first:.1f} s", "<= 60 s",
         "met" if first <= 60 else "not met"),
    ]


if __name__ == "__main__":
    if "--child" in sys.argv:
        sys.exit(child(sys.argv[1:]))
    log("run this module through benchmarks/run.py --only driver")
