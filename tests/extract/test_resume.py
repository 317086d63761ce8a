"""Restartability: an interrupted extraction resumes, skipping committed parts and shards, to a byte-identical
store; a corpus whose committed parts changed is refused, parts not committed yet are read as they are now."""

from __future__ import annotations

import pytest

import actstore
from actstore.pipeline.extract import run as run_mod
from tests.support import crash_after_shards, extract_local, tree_digest

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]


def test_resume_after_crash_is_identical(tmp_path, tiny, texts, monkeypatch):
    clean = extract_local(tiny("gpt2"), tmp_path / "clean", HOOKS, texts[:8])
    assert len(clean.manifest.shards) >= 4
    crash_after_shards(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        extract_local(tiny("gpt2"), tmp_path / "run", HOOKS, texts[:8])
    assert not (tmp_path / "run" / "manifest.json").exists()
    committed = sorted(p.parent.name for p in (tmp_path / "run" / "shards").glob("*/shard.json"))
    assert len(committed) == 2
    calls = crash_after_shards(monkeypatch, 0, then=[])
    resumed = extract_local(tiny("gpt2"), tmp_path / "run", HOOKS, texts[:8])
    assert calls.count(2) == len(clean.manifest.shards) - 2  # committed shards were skipped
    assert resumed.manifest.shards == clean.manifest.shards
    assert tree_digest(tmp_path / "run") == tree_digest(tmp_path / "clean")
    assert resumed.verify().ok


def test_rerun_of_complete_store_does_nothing(tmp_path, tiny, texts, monkeypatch):
    extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3])
    calls = crash_after_shards(monkeypatch, 0, then=[])
    assert extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3]).verify().ok
    assert calls == []


def _all_parts_committed(monkeypatch, *args, **kw) -> None:
    """Run until every part is committed, then die just before the store's commit."""
    monkeypatch.setattr(run_mod, "finalize_parts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        extract_local(*args, **kw)
    monkeypatch.undo()


def test_committed_parts_are_skipped_without_reading_them(tmp_path, tiny, texts, monkeypatch):
    out, kw = tmp_path / "s", dict(part_docs=3)
    clean = extract_local(tiny("gpt2"), tmp_path / "clean", HOOKS, texts[:8], **kw)
    assert len(clean.manifest.parts) == 3
    _all_parts_committed(monkeypatch, tiny("gpt2"), out, HOOKS, texts[:8], **kw)
    (out / "parts" / "000001.json").unlink()  # as if the run had died while part 1 was being finished
    from actstore.workers import part_task

    read: list[int] = []
    real = part_task.part_planner
    monkeypatch.setattr(part_task, "part_planner", lambda part, *a: (read.append(part.index), real(part, *a))[1])
    calls = crash_after_shards(monkeypatch, 0, then=[])
    resumed = extract_local(tiny("gpt2"), out, HOOKS, texts[:8], **kw)
    assert read == [1] and calls == []  # parts 0 and 2 were not read; part 1's committed shards not re-run
    assert resumed.manifest == clean.manifest.model_copy(update={"extract_config": resumed.manifest.extract_config,
                                                                 "versions": resumed.manifest.versions})
    assert tree_digest(out) == tree_digest(tmp_path / "clean")


def test_changed_committed_part_is_refused_but_an_unfinished_one_is_reread(tmp_path, tiny, texts, monkeypatch):
    out, kw = tmp_path / "s", dict(part_docs=4)
    _all_parts_committed(monkeypatch, tiny("gpt2"), out, HOOKS, texts[:8], **kw)
    changed_first = ["changed document"] + texts[1:8]
    with pytest.raises(actstore.OutputError, match=r"corpus part 0 \(list\[0:4\]\) changed.*--overwrite"):
        extract_local(tiny("gpt2"), out, HOOKS, changed_first, **kw)
    (out / "parts" / "000001.json").unlink()  # part 1 not finished: its input may change (e.g. a fixed line)
    changed_last = texts[:7] + ["changed document"]
    fixed = extract_local(tiny("gpt2"), out, HOOKS, changed_last, **kw)
    ref = extract_local(tiny("gpt2"), tmp_path / "ref", HOOKS, changed_last, **kw)
    assert fixed.manifest.shards == ref.manifest.shards and fixed.verify().ok
    assert tree_digest(out) == tree_digest(tmp_path / "ref")


def test_a_run_that_committed_nothing_never_locks_its_output(tmp_path, tiny, texts, monkeypatch, caplog):
    crash_after_shards(monkeypatch, 0)  # e.g. a bad batch size found only in the forward pass
    with pytest.raises(KeyboardInterrupt):
        extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3], batch_size=4)
    assert (tmp_path / "s" / "extract.json").exists() and not (tmp_path / "s" / "manifest.json").exists()
    monkeypatch.undo()
    fixed = extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3], batch_size=2)  # another config
    assert fixed.verify().ok and fixed.manifest.extract_config["batch_size"] == 2
    assert "committed no shard: starting over" in caplog.text


def test_overwrite_replaces_a_store_but_never_foreign_files(tmp_path, tiny, texts):
    first = extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3])
    with pytest.raises(actstore.OutputError, match="different config.*--overwrite"):
        extract_local(tiny("gpt2"), tmp_path / "s", HOOKS[:1], texts[:3])
    second = extract_local(tiny("gpt2"), tmp_path / "s", HOOKS[:1], texts[:3], overwrite=True)
    assert second.hooks == HOOKS[:1] and first.manifest_sha256 != second.manifest_sha256
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["docs.parquet", "manifest.json", "shards", "stats"]
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(actstore.OutputError, match="not an actstore store"):
        extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3], overwrite=True)
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_different_corpus_for_a_complete_store_is_refused(tmp_path, tiny, texts):
    extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:3])
    with pytest.raises(actstore.OutputError, match="different corpus.*--overwrite"):
        extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:2] + ["changed"])


def test_resume_says_what_it_does(tmp_path, tiny, texts, monkeypatch, capsys):
    crash_after_shards(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:8])
    monkeypatch.undo()
    extract_local(tiny("gpt2"), tmp_path / "s", HOOKS, texts[:8], progress=True)
    assert "resuming: 3 shards already committed (0 of 1 corpus parts complete)" in capsys.readouterr().err
