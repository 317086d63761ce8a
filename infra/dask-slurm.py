"""Run actstore's Dask analyses (RMT spectra, SAE training) on a SLURM cluster with dask-jobqueue.

    pip install "actstore[s3]" dask-jobqueue
    python infra/dask-slurm.py --store s3://my-bucket/activations/run1 --hook blocks.6.hook_resid_post \\
        --partition gpu --account my-project --jobs 4 --gpus-per-job 1 --venv ~/actstore-venv

This process hosts the Dask scheduler (run it on a login node, or inside a small `sbatch` allocation) and
submits `--jobs` SLURM jobs that each start one Dask worker from the same Python environment. It then runs
`actstore spectra ... --scheduler ADDRESS` and `actstore train sae ... --scheduler ADDRESS` against that
scheduler, exactly as on Kubernetes (infra/dask-kubernetes.yaml). Every training run is one Dask task on one
worker, and each worker writes its training run under `--out`, so that must be on the shared filesystem.
S3 credentials reach the workers as the usual AWS_* variables (sbatch exports the submitting environment by
default, so nothing secret is written into the job scripts) or through ~/.aws on the shared home.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Any


def actstore_commands(store: str, hook: str, scheduler: str, out: str = "actstore-results") -> list[list[str]]:
    """The analysis commands run against the SLURM-hosted scheduler, in order."""
    return [
        ["actstore", "spectra", store, "--hook", hook, "--scheduler", scheduler, "--out", f"{out}/spectra"],
        ["actstore", "train", "sae", "--store", store, "--hook", hook, "--scheduler", scheduler,
         "--out", f"{out}/saes"],
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="store URL (shared path or s3://)")
    p.add_argument("--hook", required=True, help="hook to analyse, e.g. blocks.6.hook_resid_post")
    p.add_argument("--out", default=os.path.abspath("actstore-results"),
                   help="results directory on the shared filesystem (workers write training runs there)")
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs, one Dask worker each")
    p.add_argument("--partition", default=None, help="SLURM partition (queue)")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--cores", type=int, default=8, help="CPU cores per job (torch threads of each task)")
    p.add_argument("--memory", default="48GB", help="memory per job")
    p.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per job (0 for CPU-only workers)")
    p.add_argument("--walltime", default="08:00:00", help="SLURM time limit per worker job")
    p.add_argument("--venv", default=sys.prefix, help="Python environment the workers activate")
    p.add_argument("--interface", default=None, help="network interface for Dask traffic, e.g. ib0")
    p.add_argument("--dry-run", action="store_true", help="print the worker job script and commands, submit nothing")
    return p.parse_args(argv)


def cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SLURMCluster arguments: one single-process worker per job, torch threads = the job's cores."""
    prologue = [f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}",
                f"export ACTSTORE_TASK_THREADS={args.cores}"]
    return {
        "queue": args.partition, "account": args.account, "cores": args.cores, "processes": 1,
        "memory": args.memory, "walltime": args.walltime, "interface": args.interface, "job_name": "actstore-dask",
        "job_extra_directives": [f"--gres=gpu:{args.gpus_per_job}"] if args.gpus_per_job else [],
        "job_script_prologue": prologue,
        # one task (one training run) per worker, and so per GPU, at a time; torch uses the job's cores
        "worker_extra_args": ["--nthreads", "1"],
        "local_directory": "${TMPDIR:-/tmp}", "log_directory": "dask-slurm-logs",
        "scheduler_options": {"dashboard_address": ":8787"},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dask.distributed import Client
    from dask_jobqueue import SLURMCluster

    with SLURMCluster(**cluster_kwargs(args)) as cluster:
        commands = actstore_commands(args.store, args.hook, cluster.scheduler_address, args.out)
        if args.dry_run:
            print(cluster.job_script())
            print("\n".join(shlex.join(c) for c in commands))
            return 0
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            print(f"waiting for a worker (dashboard: {cluster.dashboard_link})", flush=True)
            client.wait_for_workers(1, timeout=3600)
        for cmd in commands:
            print("+", shlex.join(cmd), flush=True)
            rc = subprocess.run(cmd, check=False).returncode
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
