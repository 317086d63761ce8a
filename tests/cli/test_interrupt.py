"""Ctrl-C stops a training job promptly with exit 130, keeps its checkpoint, and a rerun resumes from it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import actstore

HOOK = "blocks.0.hook_resid_post"


class _Job:
    """A CLI process whose stderr lines are collected as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}: {''.join(self.lines)[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(timeout=10)
        return code

    def steps(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := re.search(r"\] step (\d+)/", line))]


@pytest.mark.dask
def test_ctrl_c_stops_training_with_its_checkpoint_kept(tmp_path):
    x = np.random.default_rng(0).standard_normal((20000, 16)).astype(np.float32)
    store = actstore.from_arrays({HOOK: x}, str(tmp_path / "store"), shard_tokens=5000)
    out = tmp_path / "sae"
    argv = [sys.executable, "-m", "actstore", "train", "sae", "--store", store.url, "--hook", HOOK,
            "--out", str(out), "--expansion", "2", "--k", "4", "--batch-size", "256",
            "--training-tokens", str(256 * 200_000), "--checkpoint-every", "20", "--log-every", "5",
            "--n-eval-seqs", "0", "--threads", "1"]
    first = _Job(argv)
    first.wait_for(lambda: any(out.glob("*/checkpoints/latest.json")), 300, "the first checkpoint")
    assert first.interrupt() == 130, "".join(first.lines)[-2000:]
    err = "".join(first.lines)
    assert first.lines[-1].startswith("actstore: interrupted") and "checkpoint is kept" in first.lines[-1], err
    assert "committed shards" not in err and "terminate called" not in err and "Traceback" not in err
    latest = next(out.glob("*/checkpoints/latest.json"))
    saved = json.loads(latest.read_text())["step"]
    assert saved >= 20 and not (latest.parent.parent / "metrics.json").exists()
    again = _Job(argv)  # the same command resumes from the checkpoint
    again.wait_for(lambda: again.steps(), 300, "progress of the rerun")
    assert again.steps()[0] > saved and again.steps()[0] <= saved + 5
    assert again.interrupt() == 130


def test_ctrl_c_after_the_manifest_commit_reports_success(tmp_path, tiny, texts, monkeypatch, capsys):
    import yaml

    from actstore.cli import main
    from actstore.pipeline.extract import run

    real = run.extract

    def late_interrupt(cfg, overrides=None):
        real(cfg, overrides)  # the store is committed ...
        raise KeyboardInterrupt  # ... and Ctrl-C lands while the command winds down

    monkeypatch.setattr(run, "extract", late_interrupt)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": tiny("gpt2"), "corpus": texts[:2], "hooks": [HOOK], "executor": "local",
                                   "output": str(tmp_path / "out"), "progress": False, "context_length": 32}))
    assert main(["extract", str(cfg)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("wrote Store(") and "interrupted" not in out.err
