"""Restartability: an interrupted extraction resumes, skipping committed shards, to a byte-identical store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import extract_local

from actstore.pipeline import local_executor
from actstore.workers import shard_task

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file of the arrays and token index (manifest excluded: it has versions and times)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_resume_after_crash_is_identical(tmp_path, tiny, texts, monkeypatch):
    clean = extract_local(tiny("gpt2"), tmp_path / "clean", HOOKS, texts[:8])
    assert len(clean.manifest.shards) >= 4
    real, calls = shard_task.run_shard, []

    def crashing(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(local_executor, "run_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        extract_local(tiny("gpt2"), tmp_path / "run", HOOKS, texts[:8])
    assert not (tmp_path / "run" / "manifest.json").exists()
    committed = sorted(p.parent.name for p in (tmp_path / "run" / "shards").glob("*/shard.json"))
    assert len(committed) == 2
    monkeypatch.setattr(local_executor, "run_shard", lambda *a, **k: (calls.append(2), real(*a, **k))[1])
    resumed = extract_local(tiny("gpt2"), tmp_path / "run", HOOKS, texts[:8])
    assert calls.count(2) == len(clean.manifest.shards) - 2  # committed shards were skipped
    assert resumed.manifest.shards == clean.manifest.shards
    assert tree_digest(tmp_path / "run") == tree_digest(tmp_path / "clean")
    assert resumed.verify().ok


def test_rerun_of_complete_store_does_nothing(tmp_path, tiny, texts, monkeypatch):
    extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3])
    monkeypatch.setattr(local_executor, "run_shard", lambda *a, **k: pytest.fail("re-ran a committed shard"))
    assert extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3]).verify().ok


def test_changed_corpus_on_resume_is_refused(tmp_path, tiny, texts, monkeypatch):
    monkeypatch.setattr(local_executor, "run_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3])
    with pytest.raises(ValueError, match="different corpus"):
        extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:2] + ["changed document"])
