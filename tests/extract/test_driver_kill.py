"""Killing the driver mid-run (SIGKILL), then rerunning, skips committed shards and yields an identical store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

import actstore
from tests.support import tree_digest

pytestmark = pytest.mark.ray

SCRIPT = """
import json, sys, actstore
actstore.extract(json.loads(sys.argv[1]))
"""


def test_sigkill_driver_then_resume(tmp_path, tiny, texts):
    cfg = dict(model=tiny("gpt2"), corpus=texts[:10], hooks=["blocks.0.hook_resid_post"], context_length=32,
               shard_tokens=256, batch_size=4, progress=False, executor="ray", lease_stale_after=2.0)
    ref = actstore.extract(dict(cfg, output=str(tmp_path / "ref"), executor="local"))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(dict(cfg, output=str(out)))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "shards").glob("*/shard.json"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the driver finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import os

    os.killpg(proc.pid, signal.SIGKILL)  # its private Ray processes
    committed = len(list((out / "shards").glob("*/shard.json")))
    assert not (out / "manifest.json").exists() and committed < len(ref.manifest.shards)
    time.sleep(2.5)  # let the dead driver's lease go stale
    store = actstore.extract(dict(cfg, output=str(out), executor="local"))
    assert store.verify().ok and store.manifest.shards == ref.manifest.shards
    assert tree_digest(out) == tree_digest(tmp_path / "ref")
