"""Analyses on a Dask cluster started as separate processes that share no disk with the driver: every result
lands on object storage (moto S3), nothing in any working directory, and training resumes from S3 checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore.cli import main
from actstore.pipeline.analysis.sae import fit
from actstore.schemas.jobs import SAEJob
from tests.support import s3_bucket, s3_options

pytestmark = [pytest.mark.dask, pytest.mark.s3]
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def s3(moto_endpoint):
    opts = s3_options(moto_endpoint)
    return opts, s3_bucket(opts, "remote")


@pytest.fixture(scope="module")
def store(s3):
    opts, _ = s3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    doc = np.arange(3000) // 50
    x[:, 1] += 2.0 * (doc % 2)
    docs = {"doc_id": np.arange(60), "label": np.arange(60) % 2}
    tokens = {"doc_id": doc, "position": np.arange(3000) % 50, "special": np.arange(3000) % 50 == 0}
    return actstore.from_arrays({HOOK: x}, "s3://remote/store", tokens=tokens, docs=docs, shard_tokens=1000,
                                storage_options=opts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`dask scheduler` and `dask worker` as their own processes, each in its own empty working directory."""
    sched_dir, worker_dir = tmp_path_factory.mktemp("scheduler"), tmp_path_factory.mktemp("worker")
    info = sched_dir / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen([*dask, "--port", "0", "--no-dashboard", "--scheduler-file", str(info)],
                              cwd=sched_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        from dask.distributed import Client

        with Client(scheduler_file=str(info), timeout="120s") as client:
            address = client.scheduler.address
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "2", "--no-nanny",
                 "--no-dashboard", "--local-directory", str(worker_dir)],
                cwd=worker_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            client.wait_for_workers(1, timeout=180)
        yield address, [sched_dir, worker_dir]
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a busy worker may take long to close gracefully
                p.kill()
                p.wait(timeout=30)


def _no_local_copies(dirs: list[Path]) -> None:
    for d in dirs:
        assert not [p for p in d.rglob("*") if p.name.startswith("s3") or p.suffix in (".safetensors", ".json")
                    and p.name != "scheduler.json"], list(d.rglob("*"))


def test_train_probe_spectra_on_a_separate_cluster_write_to_s3(s3, store, cluster, tmp_path, monkeypatch):
    opts, fs = s3
    address, dirs = cluster
    monkeypatch.chdir(tmp_path)
    so = ["--storage-options", json.dumps(opts), "--scheduler", address]
    assert main(["train", "sae", "--store", store.url, "--hook", HOOK, "--out", "s3://remote/sae", "--expansion",
                 "2", "--k", "4", "--training-tokens", "8192", "--batch-size", "512", "--n-eval-seqs", "0",
                 "--threads", "1", *so]) == 0
    assert main(["train", "probe", "--store", store.url, "--label", "label", "--out", "s3://remote/probes",
                 "--threads", "1", *so]) == 0
    assert main(["spectra", store.url, "--out", "s3://remote/spectra", *so]) == 0
    _no_local_copies([*dirs, tmp_path])
    run = f"remote/sae/{HOOK}"
    metrics = json.loads(fs.cat_file(f"{run}/metrics.json"))
    assert metrics["provenance"]["store_manifest_sha256"] == store.manifest_sha256
    local = tmp_path / "sae-copy"
    fs.get(run, str(local), recursive=True)
    from sae_lens import SAE  # SAELens itself reads the export

    sae = SAE.load_from_disk(str(local), device="cpu")
    assert sae.cfg.d_in == 16 and sae.cfg.metadata.hook_name == HOOK
    probes = json.loads(fs.cat_file("remote/probes/probes-label.json"))
    assert probes["rows"][0]["auroc"] > 0.9 and fs.exists(f"remote/probes/probes-label/{HOOK}.safetensors")
    spec = json.loads(fs.cat_file(f"remote/spectra/spectrum-{HOOK}.json"))
    assert spec["hook"] == HOOK and spec["provenance"]["store_url"] == store.url


def test_training_resumes_from_s3_checkpoints_bit_for_bit(s3, store):
    opts, fs = s3
    base = {"store": store.url, "hooks": [HOOK], "n_eval_seqs": 0, "storage_options": opts,
            "sae": {"expansion": 2, "k": 4},
            "train": {"training_tokens": 512 * 40, "batch_size": 512, "checkpoint_every": 5, "threads": 1,
                      "select_dtype": "float32"}}
    straight = fit(SAEJob.build({**base, "out": "s3://remote/straight"}))
    stop = threading.Event()
    job = SAEJob.build({**base, "out": "s3://remote/resumed", "train": {**base["train"], "log_every": 1}})

    def stop_at_step_12(info):
        if info["step"] == 12:
            stop.set()

    from actstore.workers.sae.training import TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="checkpoint is kept"):
        fit(job, progress=stop_at_step_12, stop=stop)
    assert json.loads(fs.cat_file("remote/resumed/checkpoints/latest.json"))["step"] == 12
    assert not fs.exists("remote/resumed/metrics.json")
    resumed = fit(job)
    for name, tensor in straight.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
