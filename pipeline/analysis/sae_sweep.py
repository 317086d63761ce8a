"""Dask fan-out for `actstore train sae|transcoder`: one task per (hook, sweep point) of an SAE/TranscoderJob.

Each task opens the store itself, sets its torch threads (Dask's LocalCluster pins OMP threads to 1), trains
with checkpoints under its own output folder (`<out>/<run name>`, any fsspec URL) and returns a small summary;
rerunning the same command skips finished tasks (their metrics.json exists) and resumes the others from their
last checkpoint. Ctrl-C sets a stop flag that in-process tasks check every step: each writes a checkpoint and
stops, so the command ends within seconds and a rerun resumes.
"""

from __future__ import annotations

import itertools
import re
import sys
import threading
import time
from typing import Any

from actstore.pipeline.analysis.results import Output
from actstore.pipeline.analysis.sae import METRICS_FILE, fit
from actstore.schemas.jobs import SAEJob, TranscoderJob
from actstore.schemas.sae import SAESettings

SUMMARY_KEYS = ("fvu", "ev_legacy", "ev_zero_centred", "l0", "dead_fraction", "cosine", "ce_loss_score", "kl_score")
STOP = threading.Event()  # set on Ctrl-C: tasks running in this process checkpoint and stop


def grid(job: SAEJob | TranscoderJob) -> list[dict[str, Any]]:
    """The sweep's points: the cartesian product of `job.sweep` (one empty point without a sweep)."""
    axes = [[(k, v) for v in values] for k, values in job.sweep.items()]
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def run_name(hooks: list[str], params: dict[str, Any]) -> str:
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    name = "__".join(hooks) + (f"--{tag}" if tag else "")
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


def point_jobs(job: SAEJob | TranscoderJob) -> list[tuple[dict[str, Any], SAEJob | TranscoderJob]]:
    """(sweep point, job) per task: single-hook, sweep-free jobs, each with its own output subfolder."""
    hook_sets = [job.hooks] if isinstance(job, TranscoderJob) else [[h] for h in job.hooks]
    out = []
    for hooks in hook_sets:
        for params in grid(job):
            sae_kw = {k: v for k, v in params.items() if k in SAESettings.__dataclass_fields__}
            train_kw = {k: v for k, v in params.items() if k not in sae_kw}
            update: dict[str, Any] = {
                "sweep": {}, "out": "/".join([str(job.out).rstrip("/"), run_name(hooks, params)]),
                "sae": {**job.model_dump()["sae"], **sae_kw}, "train": {**job.model_dump()["train"], **train_kw}}
            if isinstance(job, SAEJob):
                update["hooks"] = hooks
            out.append((params, type(job).build(job.model_dump(), **update)))
    return out


def printer(name: str) -> Any:
    """Progress callback: steps, tokens/s, current FVU and L0, ETA."""
    def show(info: dict[str, Any]) -> None:
        print(f"[{name}] step {info['step']}/{info['total_steps']} {info['tokens_per_s']:,.0f} tok/s "
              f"fvu={info.get('fvu', float('nan')):.4f} l0={info.get('l0', float('nan')):.1f} "
              f"dead={info.get('dead_fraction', 0):.3f} eta {info.get('eta_s', 0):.0f}s", file=sys.stderr, flush=True)
    return show


def _task(job_data: dict[str, Any], kind: str, params: dict[str, Any]) -> dict[str, Any]:
    from actstore.pipeline.analysis.dask_client import task_threads

    job = (SAEJob if kind == "sae" else TranscoderJob).model_validate(job_data)
    out = Output(job.out, job.storage_options)
    if out.exists(METRICS_FILE) and out.exists("cfg.json"):
        return _summary(job, params, out.read_json(METRICS_FILE), resumed="already finished")
    task_threads(job.train.threads)
    t0 = time.time()
    res = fit(job, progress=printer(run_name(job.hooks, {})), stop=STOP)
    return _summary(job, params, res.metrics, seconds=time.time() - t0)


def _summary(job: SAEJob | TranscoderJob, params: dict[str, Any], metrics: dict[str, Any], **extra: Any) -> dict:
    return {"hooks": job.hooks, **params, "out_dir": job.out,
            **{k: metrics.get(k) for k in SUMMARY_KEYS if k in metrics}, **extra}


def train_sweep(job: SAEJob | TranscoderJob) -> list[dict[str, Any]]:
    """Run every (hooks, sweep point) of `job` as a Dask task on the active client; returns summaries in order."""
    from dask.distributed import get_client, wait

    kind = "sae" if isinstance(job, SAEJob) else "transcoder"
    client = get_client()
    futures = [client.submit(_task, p.model_dump(), kind, params, pure=False, key=f"train-{p.out}")
               for params, p in point_jobs(job)]
    STOP.clear()
    try:
        wait(futures)
    except KeyboardInterrupt:
        _stop(client, futures)
        raise
    return client.gather(futures)


def _stop(client: Any, futures: list[Any], grace: float = 60.0) -> None:
    """Ctrl-C: in-process tasks see STOP at their next step, write a checkpoint and end; tasks on other
    machines cannot see it and are cancelled (they keep their last periodic checkpoint)."""
    from dask.distributed import wait

    STOP.set()
    try:
        wait(futures, timeout=grace)
    except Exception:  # noqa: BLE001  (a timeout or the tasks' own TrainingInterrupted: both end the wait)
        pass
    client.cancel([f for f in futures if not f.done()])
