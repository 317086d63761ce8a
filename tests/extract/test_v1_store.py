"""Format v1 stores (written before streaming extraction) stay readable and growable.

`tests/fixtures/v1_store` is a store written by the last format-v1 actstore, with its model and corpus. The
current code reads it as it is, recognises it as the store of its config (without re-planning it the v2 way),
and grows it with `append: hooks` and `append: tokens` using v1 planning: the store stays v1, its files stay
byte-identical, and the new rows equal what a fresh (v2) extraction of the same input computes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.schemas.config import ExtractConfig
from tests.support import crash_after_shards

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "v1_store"
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
KW = dict(model="model", corpus="corpus.jsonl", executor="local", output="store", progress=False, context_length=32,
          shard_tokens=128, batch_size=4, dtype="float16")


@pytest.fixture
def v1(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture folder, made the working directory (the store's recorded paths are relative)."""
    dst = shutil.copytree(FIXTURE, tmp_path / "v1")
    monkeypatch.chdir(dst)
    return dst


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_v1_store_reads_and_verifies(v1):
    store = actstore.open_store("store")
    m = store.manifest
    assert m.schema_version == 1 and m.parts is None and m.shard_index is None
    assert [s.id for s in m.shards][:2] == ["000000000", "000000004"] and all(s.part is None for s in m.shards)
    assert store.verify().ok
    tokens = store.tokens()
    assert tokens.num_rows == m.n_tokens and tokens.column("doc_id").to_pylist()[-1] == m.n_docs - 1
    assert store.docs().num_rows == m.n_docs == 5
    x = store.activations(HOOKS[0]).compute()
    assert x.shape == (m.n_tokens, 32) and np.isfinite(x).all()
    assert store.to_numpy(HOOKS[1]).shape == (m.n_tokens, 128)


def test_config_hash_of_old_stores_is_unchanged(v1):
    """Fields added since (part_bytes, part_docs, pool and writer settings) leave old config hashes alone."""
    recorded = json.loads((v1 / "store" / "manifest.json").read_text())
    cfg = ExtractConfig.build({k: v for k, v in recorded["extract_config"].items() if k in ExtractConfig.model_fields})
    assert cfg.config_hash() == recorded["config_hash"]
    for change in ({"part_bytes": 1 << 20}, {"part_docs": 10}):
        assert cfg.model_copy(update=change).config_hash() != cfg.config_hash()
    for change in ({"writer_threads": 5}, {"shards_in_flight": 4}, {"threads_per_worker": 2}, {"max_workers": 3}):
        assert cfg.model_copy(update=change).config_hash() == cfg.config_hash()


def test_rerun_of_v1_store_does_nothing_and_a_changed_corpus_is_refused(v1, monkeypatch):
    before = _files(v1 / "store")
    calls = crash_after_shards(monkeypatch, 0, then=[])
    again = actstore.extract(dict(KW, hooks=HOOKS))
    assert calls == [] and again.manifest.schema_version == 1 and _files(v1 / "store") == before
    (v1 / "corpus.jsonl").write_text((v1 / "corpus.jsonl").read_text().replace("a", "b", 1))
    with pytest.raises(actstore.OutputError, match="different corpus"):
        actstore.extract(dict(KW, hooks=HOOKS))


def test_append_hooks_on_v1_store(v1, tmp_path):
    new = ["blocks.2.hook_resid_post"]
    before = _files(v1 / "store")
    grown = actstore.extract(dict(KW, hooks=new, append="hooks"))
    m = grown.manifest
    assert m.schema_version == 1 and grown.hooks == HOOKS + new and grown.verify().ok
    assert {k: v for k, v in _files(v1 / "store").items() if k in before} == before
    fresh = actstore.extract(dict(KW, hooks=HOOKS + new, output=str(tmp_path / "fresh")))
    assert fresh.manifest.schema_version == 2 and fresh.n_tokens == grown.n_tokens  # one part: the same windows
    np.testing.assert_array_equal(grown.activations(new[0]).compute(), fresh.activations(new[0]).compute())
    # The fixture's own hooks were computed on the machine that wrote it: another CPU's kernels may round a
    # float16 value the other way (1 unit in the last place); the hook appended here must match exactly.
    np.testing.assert_allclose(grown.activations(HOOKS[0]).compute().astype(np.float32),
                               fresh.activations(HOOKS[0]).compute().astype(np.float32), rtol=2e-3, atol=1e-5)


def test_append_tokens_on_v1_store(v1, tmp_path):
    more = v1 / "more.jsonl"
    more.write_text("".join(json.dumps({"text": f"more text number {i} " * 20, "topic": str(i)}) + "\n"
                            for i in range(3)))
    old = actstore.open_store("store").manifest
    grown = actstore.extract(dict(KW, hooks=HOOKS, corpus="more.jsonl", append="tokens"))
    m = grown.manifest
    assert m.schema_version == 1 and m.shards[:len(old.shards)] == old.shards and grown.verify().ok
    new = m.shards[len(old.shards):]
    assert new[0].id == f"{old.n_sequences:09d}" and new[0].token_start == old.n_tokens  # v1 ids continue
    assert grown.docs().column("doc_id").to_pylist() == list(range(old.n_docs + 3))
    fresh = actstore.extract(dict(KW, hooks=HOOKS, corpus="more.jsonl", output=str(tmp_path / "fresh")))
    np.testing.assert_array_equal(grown.activations(HOOKS[1]).compute()[old.n_tokens:],
                                  fresh.activations(HOOKS[1]).compute())
