"""SIGKILL at seeded random points (driver with the local executor, driver with its whole private Ray cluster),
then resume: the store verifies and its arrays are byte-identical to a clean run. Slow: 20+ kill points."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import actstore
from tests.support import tree_digest

SCRIPT = "import json, sys, actstore; actstore.extract(json.loads(sys.argv[1]))"
KILL_POINTS = 20


def _cfg(tiny, texts, executor):
    return dict(model=tiny("gpt2"), corpus=texts[:8], hooks=["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"],
                context_length=32, shard_tokens=256, batch_size=4, progress=False, executor=executor,
                lease_stale_after=2.0)


def _kill_at(cfg: dict, out, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(dict(cfg, output=str(out)))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(delay)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started (its private Ray too)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("executor,points", [("local", KILL_POINTS), ("ray", 4)])
def test_seeded_kill_points(tmp_path, tiny, texts, executor, points):
    cfg = _cfg(tiny, texts, executor)
    ref = actstore.extract(dict(cfg, output=str(tmp_path / "ref"), executor="local"))
    rng = random.Random(1234)
    for i in range(points):
        out = tmp_path / f"run{i}"
        _kill_at(cfg, out, rng.uniform(2.0, 9.0 if executor == "local" else 25.0))
        if rng.random() < 0.3:  # sometimes kill the resumed run too
            _kill_at(cfg, out, rng.uniform(2.0, 6.0))
        time.sleep(0.1)
        store = actstore.extract(dict(cfg, output=str(out), executor="local"))
        assert store.verify().ok, i
        assert store.manifest.shards == ref.manifest.shards, i
        assert tree_digest(out) == tree_digest(tmp_path / "ref"), i
