"""Dask plumbing shared by the analysis jobs: a client on `--scheduler ADDRESS` or a private local cluster.

Dask's LocalCluster pins OMP/MKL threads to 1 in its workers, so every task that runs torch sets its own
thread count (`task_threads`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from dask.distributed import Client, LocalCluster


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, processes: bool = False, n_workers: int | None = None) -> Iterator[Client]:
    """Connect to `scheduler`, or start a local cluster for the duration of the block."""
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    _quiet_distributed()
    cores = os.cpu_count() or 1
    workers = n_workers or (cores if processes else 1)
    threads = max(1, cores // workers)
    # ":0": a free port, so a second analysis beside a running one starts without a "port in use" warning.
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=processes,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


def task_threads(n: int | None = None) -> int:
    """Set torch's thread count inside a Dask task (LocalCluster sets OMP threads to 1)."""
    import torch

    n = n or max(1, int(os.environ.get("ACTSTORE_TASK_THREADS", os.cpu_count() or 1)))
    torch.set_num_threads(n)
    return n


def _quiet_distributed() -> None:
    """Cluster start/stop chatter and per-task failure reports (multi-line, with tracebacks) are not ours to
    print: a failing task's own one-line error reaches the caller anyway. distributed gives some of its loggers
    their own level, so each is set, not just the parent."""
    names = [n for n in logging.root.manager.loggerDict if n == "distributed" or n.startswith("distributed.")]
    for name in {"distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny", *names}:
        logging.getLogger(name).setLevel(logging.CRITICAL)
