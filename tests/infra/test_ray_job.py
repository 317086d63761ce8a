"""A real Ray job: `ray start --head` on localhost, `actstore extract` submitted through the Jobs API.

This is what a KubeRay RayJob or `ray job submit` does on a cluster: the entrypoint runs as a job driver with
RAY_ADDRESS set by Ray, so extraction must join that cluster (not start a private one) and authenticate with
the head's token. The head is started with its own token file, temp dir and free ports, in its own session,
and torn down by killing exactly the processes of that session (never `ray stop`, which would kill every Ray
process of this user on the machine, including other test runs).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support import build_tiny, corpus_texts

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

VENV_BIN = Path(sys.executable).parent
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
START_TIMEOUT_S = 180  # `ray start` plus dashboard on a busy 2-core machine can take a minute or more
JOB_TIMEOUT_S = 420


@dataclass
class Head:
    """A running local Ray head started by this test."""

    proc: subprocess.Popen
    dashboard: str
    token: str
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _head_env(token_file: Path) -> dict[str, str]:
    """Environment of the head, inherited by its raylet, the job supervisor and so the job driver."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_AUTH_TOKEN", None)
    return env


def _start_cmd(temp_dir: Path) -> tuple[list[str], int]:
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = _free_ports(9)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
           "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           f"--object-store-memory={256 << 20}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]
    return cmd, dash


def _wait_dashboard(head: Head) -> str | None:
    """Poll the Jobs API until it answers (authenticated); None when up, else why not."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            return f"`ray start` exited with {head.proc.returncode}:\n{head.log.read_text()[-4000:]}"
        try:
            _get(head, "/api/jobs/")
            return None
        except Exception as e:  # noqa: BLE001 - any failure means "not up yet"
            last = repr(e)
        time.sleep(1.0)
    return f"Ray dashboard did not come up in {START_TIMEOUT_S}s ({last}):\n{head.log.read_text()[-4000:]}"


def _get(head: Head, path: str) -> dict:
    req = urllib.request.Request(f"{head.dashboard}{path}", headers=head.headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _session_pids(sid: int) -> list[int]:
    """Pids of live (non-zombie) processes in session `sid`: the head and everything it spawned."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
                if state != "Z" and os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_head(head: Head) -> None:
    """SIGTERM every process of the head's session at once, then SIGKILL whatever is left after a short grace.

    (A SIGTERM to `ray start --block` alone makes it stop its children one by one with long timeouts.)"""
    sid = head.proc.pid  # start_new_session=True: the head's pid is its session id
    _signal_all(_session_pids(sid), signal.SIGTERM)
    deadline = time.monotonic() + 3  # the raylet's graceful drain alone takes ~15 s; nothing here needs it
    while (left := _session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    _signal_all(left, signal.SIGKILL)
    try:
        head.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _start_head(temp_dir: Path, token_file: Path, token: str, attempt: int) -> Head:
    cmd, dash = _start_cmd(temp_dir / f"r{attempt}")
    log = temp_dir / f"ray-start-{attempt}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=_head_env(token_file), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=temp_dir)
    return Head(proc, f"http://127.0.0.1:{dash}", token, log)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    missing = [b for b in ("ray", "actstore") if not (VENV_BIN / b).exists()]
    if missing:
        pytest.skip(f"{missing} not installed next to {sys.executable} (needs ray[default] and actstore)")
    # Unix socket paths under the temp dir must stay short (AF_UNIX limit of 107 bytes): use /tmp directly.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    heads: list[Head] = []
    try:
        for attempt in range(2):  # a second try covers a free port taken by someone else in the meantime
            heads.append(_start_head(temp_dir, token_file, token, attempt))
            problem = _wait_dashboard(heads[-1])
            if problem is None:
                break
            _stop_head(heads[-1])
        else:
            pytest.fail(problem)
        yield heads[-1]
    finally:
        for head in heads:
            _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _write_config(tmp: Path) -> tuple[Path, Path]:
    model = build_tiny("gpt2", tmp / "models")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "topic": i % 3}) + "\n"
                              for i, t in enumerate(corpus_texts(6))))
    out = tmp / "store"
    cfg = {"model": model, "corpus": str(corpus), "hooks": HOOKS, "context_length": 32, "shard_tokens": 256,
           "batch_size": 4, "dtype": "float32", "executor": "ray", "output": str(out), "progress": False}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, out


def _wait_job(client, job_id: str) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2.0)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        if not status.is_terminal():
            client.stop_job(job_id)
        info = client.get_job_info(job_id)
        pytest.fail(f"job {job_id} ended {status} ({info.message}); logs:\n{client.get_job_logs(job_id)[-8000:]}")
    return client.get_job_logs(job_id)


def _json_summary(logs: str) -> dict:
    """The `--json` summary: the last top-level JSON object in the job's output (Ray logs come before it)."""
    start = [m.start() for m in re.finditer(r"^\{$", logs, flags=re.MULTILINE)]
    assert start, f"no JSON summary in the job output:\n{logs[-4000:]}"
    return json.loads(logs[start[-1]:logs.rindex("}") + 1])


def test_extract_as_ray_job(ray_head: Head, tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    import actstore

    cfg, out = _write_config(tmp_path)
    client = JobSubmissionClient(ray_head.dashboard, headers=ray_head.headers)
    entrypoint = f"actstore extract {shlex.quote(str(cfg))} --json"
    job_id = client.submit_job(entrypoint=entrypoint)
    logs = _wait_job(client, job_id)

    summary = _json_summary(logs)
    assert summary["n_tokens"] > 0 and summary["hooks"] == HOOKS
    store = actstore.open_store(str(out))
    report = store.verify()
    assert report.ok, report.problems
    assert store.n_tokens == summary["n_tokens"] > 0
    assert store.activations(HOOKS[0]).shape == (store.n_tokens, 32)
    # the model actors ran on this head: the driver joined it through RAY_ADDRESS instead of starting its own Ray
    driver = client.get_job_info(job_id).driver_info
    assert driver is not None, "the entrypoint never connected a driver to this cluster"
    actors = _get(ray_head, "/api/v0/actors?limit=10000")["data"]["result"]["result"]
    ours = [a for a in actors if "ShardActor" in a["class_name"] and a["job_id"] == driver.id]
    assert ours, [(a["class_name"], a["job_id"]) for a in actors]
