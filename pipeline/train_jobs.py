"""Dask fan-out for `actstore train sae|transcoder`: one task per (hook, hyper-parameter combination).

Each task opens the store itself, sets its torch threads (Dask's LocalCluster pins OMP threads to 1), trains
with checkpoints under its own output directory and returns a small summary; rerunning the same command
resumes every unfinished task from its last checkpoint and skips finished ones.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from typing import Any

import dask

SUMMARY_KEYS = ("fvu", "ev_legacy", "ev_zero_centred", "l0", "dead_fraction", "cosine", "ce_loss_score", "kl_score")


def parse_sweep(items: list[str] | None) -> list[dict[str, Any]]:
    """['k=32,64', 'expansion=8,16'] -> the cartesian product as dicts (values parsed as int/float/str)."""
    axes = []
    for item in items or []:
        key, sep, vals = item.partition("=")
        if not sep or not key or not vals:
            raise ValueError(f"--sweep {item!r}: expected key=v1,v2,...")
        axes.append([(key.strip(), _value(v)) for v in vals.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def _value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def run_name(hooks: list[str], params: dict[str, Any]) -> str:
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    name = "__".join(hooks) + (f"--{tag}" if tag else "")
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


def printer(name: str):
    """Progress callback: steps, tokens/s, current FVU and L0, ETA."""
    def show(info: dict[str, Any]) -> None:
        print(f"[{name}] step {info['step']}/{info['total_steps']} {info['tokens_per_s']:,.0f} tok/s "
              f"fvu={info.get('fvu', float('nan')):.4f} l0={info.get('l0', float('nan')):.1f} "
              f"dead={info.get('dead_fraction', 0):.3f} eta {info.get('eta_s', 0):.0f}s", file=sys.stderr, flush=True)
    return show


def _task(url: str, storage_options: dict | None, kind: str, hooks: list[str], params: dict[str, Any],
          out_dir: str, threads: int | None) -> dict[str, Any]:
    from actstore.pipeline.dask_jobs import task_threads
    from actstore.pipeline.store import open_store
    from actstore.pipeline.train import train_sae, train_transcoder

    done = os.path.join(out_dir, "metrics.json")
    if os.path.exists(done) and os.path.exists(os.path.join(out_dir, "cfg.json")):
        with open(done) as f:
            return _summary(hooks, params, out_dir, json.load(f), resumed="already finished")
    task_threads(threads)
    store = open_store(url, storage_options)
    t0 = time.time()
    fn = train_sae if kind == "sae" else train_transcoder
    res = fn(store, *hooks, out_dir=out_dir, progress=printer(os.path.basename(out_dir)), **params)
    return _summary(hooks, params, out_dir, res.metrics, seconds=time.time() - t0)


def _summary(hooks, params, out_dir, metrics, **extra) -> dict[str, Any]:
    return {"hooks": hooks, **params, "out_dir": out_dir,
            **{k: metrics.get(k) for k in SUMMARY_KEYS if k in metrics}, **extra}


def train_sweep(store: Any, kind: str, hook_sets: list[list[str]], grid: list[dict[str, Any]], out_root: str,
                threads: int | None = None) -> list[dict[str, Any]]:
    """Run every (hooks, params) pair as a Dask task on the active scheduler; returns summaries."""
    tasks = [dask.delayed(_task)(store.url, store._storage_options, kind, hooks, params,
                                 os.path.join(out_root, run_name(hooks, params)), threads)
             for hooks in hook_sets for params in grid]
    return list(dask.compute(*tasks))
