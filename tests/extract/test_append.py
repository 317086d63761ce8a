"""Growing a store: `append: hooks` adds hooks for the same tokens, `append: tokens` adds a new corpus after the
old rows. Old files stay byte-identical, the result equals fresh extractions, the store verifies, and an
interrupted append resumes to the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from actstore.pipeline.extract import append as append_mod
from actstore.pipeline.extract import append_parts
from actstore.pipeline.extract.executors import local as local_executor
from actstore.schemas.manifest import SCHEMA_PATH
from actstore.workers.parts import PART_SHIFT
from tests.support import crash_after_shards, extract_local, s3_bucket, s3_options

OLD = ["blocks.1.hook_resid_post"]
NEW = ["blocks.0.mlp.hook_post", "blocks.2.hook_resid_post"]
KW = dict(shard_tokens=512)  # a few shards per corpus, few enough to stay fast


def digest(root: Path, skip: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny, texts) -> Path:
    """A complete store with one hook over texts[:3]; tests grow copies of it."""
    out = tmp_path_factory.mktemp("append") / "base"
    store = extract_local(tiny("gpt2"), out, OLD, texts[:3], **KW)
    assert len(store.manifest.shards) >= 3
    return out


def copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def test_append_hooks_keeps_files_and_equals_fresh_extract(base, tmp_path, tiny, texts, monkeypatch):
    out = copy(base, tmp_path / "s")
    before = digest(out)
    grown = extract_local(tiny("gpt2"), out, NEW, texts[:3], append="hooks", **KW)
    after = digest(out)
    assert {k: after[k] for k in before} == before  # every old file (docs, tokens, arrays, stats) unchanged
    added = set(after) - set(before)
    assert all(k.startswith("stats/") or any(f"acts.zarr/{h}/" in k for h in NEW) or
               Path(k).name.startswith(("append-", "stats-")) for k in added), sorted(added)

    fresh = extract_local(tiny("gpt2"), tmp_path / "fresh", OLD + NEW, texts[:3], **KW)
    m, f = grown.manifest, fresh.manifest
    assert m.shards == f.shards  # ranges, token index and every array's SHA-256, new hooks included
    assert (m.hooks, m.stats, m.config_hash, m.corpus) == (f.hooks, f.stats, f.config_hash, f.corpus)
    assert m.extract_config["hooks"] == OLD + NEW and m.extract_config["append"] is None
    for h in NEW:
        np.testing.assert_array_equal(grown.activations(h).compute(), fresh.activations(h).compute())
        np.testing.assert_array_equal(grown.stats(h).mean, fresh.stats(h).mean)
        shard = f"shards/{m.shards[0].id}/acts.zarr/{h}/"
        assert {k: v for k, v in after.items() if k.startswith(shard)} == {
            k: v for k, v in digest(tmp_path / "fresh").items() if k.startswith(shard)}
    report = grown.verify()
    assert report.ok and report.arrays_checked == 3 * len(m.shards), report.problems
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(json.loads(
        (out / "manifest.json").read_text()))
    # the grown store is what extract with every hook makes: rerunning that config finds nothing to do
    calls = crash_after_shards(monkeypatch, 0, then=[])
    assert extract_local(tiny("gpt2"), out, OLD + NEW, texts[:3], **KW).verify().ok and calls == []


def test_append_hooks_refusals(base, tmp_path, tiny, texts):
    out = copy(base, tmp_path / "s")
    before = digest(out, skip=())
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post already in the store"):
        extract_local(tiny("gpt2"), out, OLD + NEW, texts[:3], append="hooks", **KW)
    with pytest.raises(ValueError, match="not what the store was made from"):
        extract_local(tiny("gpt2"), out, NEW, texts[:2] + ["a changed document"], append="hooks", **KW)
    with pytest.raises(ValueError, match="context_length is 64"):
        extract_local(tiny("gpt2"), out, NEW, texts[:3], append="hooks", context_length=64, **KW)
    with pytest.raises(ValueError, match="no complete store"):
        extract_local(tiny("gpt2"), tmp_path / "empty", NEW, texts[:3], append="hooks", **KW)
    assert digest(out, skip=()) == before  # refused before writing anything


def test_interrupted_append_hooks_resumes(base, tmp_path, tiny, texts, monkeypatch):
    clean = extract_local(tiny("gpt2"), copy(base, tmp_path / "clean"), NEW, texts[:3], append="hooks", **KW)
    out = copy(base, tmp_path / "run")
    real = local_executor.forward

    def crashing(worker, row):
        if row["state"] == "run" and int(row["pos"]) == 1:  # die in the second shard: a partial array, no record
            debris = out / "shards" / row["shard_id"] / "acts.zarr" / NEW[0] / "c" / "0"
            debris.mkdir(parents=True)
            (debris / "0").write_bytes(b"partial chunk")
            raise KeyboardInterrupt("simulated crash")
        return real(worker, row)

    monkeypatch.setattr(local_executor, "forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        extract_local(tiny("gpt2"), out, NEW, texts[:3], append="hooks", shards_in_flight=1, **KW)
    assert len(list(out.glob("shards/*/append-*.json"))) == 1
    assert [h.name for h in append_mod.open_store(str(out)).manifest.hooks] == OLD  # old store still committed
    monkeypatch.undo()
    calls = crash_after_shards(monkeypatch, 0, then=[])
    resumed = extract_local(tiny("gpt2"), out, NEW, texts[:3], append="hooks", **KW)
    assert calls.count(2) == len(clean.manifest.shards) - 1  # the appended shard was skipped
    assert resumed.manifest.shards == clean.manifest.shards
    assert digest(out) == digest(tmp_path / "clean")
    assert resumed.verify().ok


def _new_corpus(tmp_path: Path, texts: list[str]) -> str:
    """A jsonl corpus with a metadata field the first corpus does not have."""
    path = tmp_path / "more.jsonl"
    path.write_text("".join(json.dumps({"text": t, "topic": f"t{i}"}) + "\n" for i, t in enumerate(texts)))
    return str(path)


def test_append_tokens_places_new_rows_after_old(base, tmp_path, tiny, texts):
    out = copy(base, tmp_path / "s")
    old = append_mod.open_store(str(out))
    st_old = old.stats(OLD[0])
    before = digest(out / "shards")
    more = _new_corpus(tmp_path, texts[3:6])
    grown = extract_local(tiny("gpt2"), out, OLD, more, append="tokens", **KW)
    fresh = extract_local(tiny("gpt2"), tmp_path / "fresh", OLD, more, **KW)
    m, o, f = grown.manifest, old.manifest, fresh.manifest
    after = digest(out / "shards")
    assert {k: after[k] for k in before} == before  # old shards byte-identical

    assert m.shards[:len(o.shards)] == o.shards and len(m.shards) == len(o.shards) + len(f.shards)
    shift = len(o.parts) << PART_SHIFT  # the new corpus' parts are numbered after the store's
    for g, s in zip(m.shards[len(o.shards):], f.shards):
        assert g.arrays == s.arrays and g.n_tokens == s.n_tokens  # same activations as a fresh extract
        assert (g.seq_start, g.token_start) == (s.seq_start + shift, s.token_start + o.n_tokens)
        assert g.part == s.part + len(o.parts) and g.id > o.shards[-1].id
    assert (m.n_tokens, m.n_sequences, m.n_docs) == (o.n_tokens + f.n_tokens, o.n_sequences + f.n_sequences,
                                                     o.n_docs + f.n_docs)
    tail = grown.tokens().slice(o.n_tokens)
    ref = fresh.tokens()
    for col in ("token_id", "position", "special"):
        assert tail.column(col).equals(ref.column(col))
    np.testing.assert_array_equal(tail.column("doc_id").to_numpy(), ref.column("doc_id").to_numpy() + shift)
    np.testing.assert_array_equal(tail.column("seq_id").to_numpy(), ref.column("seq_id").to_numpy() + shift)
    np.testing.assert_array_equal(grown.activations(OLD[0]).compute()[o.n_tokens:], fresh.activations(OLD[0]).compute())

    docs = grown.docs()
    assert docs.column("doc_id").to_pylist() == list(range(o.n_docs)) + [shift + i for i in range(f.n_docs)]
    assert set(docs.column("doc_id").to_pylist()) == set(grown.tokens().column("doc_id").to_pylist())
    assert docs.column("topic").to_pylist() == [None] * o.n_docs + ["t0", "t1", "t2"]
    st, st_new = grown.stats(OLD[0]), fresh.stats(OLD[0])
    assert st.n == st_old.n + st_new.n
    np.testing.assert_allclose(st.mean, (st_old.mean * st_old.n + st_new.mean * st_new.n) / st.n, rtol=1e-9)
    assert [p.sha256 for p in m.corpus.parts] == [o.corpus.sha256, f.corpus.sha256]
    assert m.corpus.n_docs == m.n_docs and m.extract_config["corpus"].startswith("<2 corpora")
    report = grown.verify()
    assert report.ok and report.shards_checked == len(m.shards), report.problems
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(json.loads(
        (out / "manifest.json").read_text()))
    with pytest.raises(ValueError, match="already in the store"):
        extract_local(tiny("gpt2"), out, OLD, more, append="tokens", **KW)

    # hooks can still be added: the first corpus comes from the config, the second from corpus.parts
    hook = "blocks.0.hook_resid_pre"
    both = extract_local(tiny("gpt2"), out, [hook], texts[:3], append="hooks", **KW)
    assert both.verify().ok and both.manifest.corpus == m.corpus
    ref_a = extract_local(tiny("gpt2"), tmp_path / "a", [hook], texts[:3], **KW).activations(hook).compute()
    ref_b = extract_local(tiny("gpt2"), tmp_path / "b", [hook], more, **KW).activations(hook).compute()
    np.testing.assert_array_equal(both.activations(hook).compute(), np.concatenate([ref_a, ref_b]))


def test_interrupted_append_tokens_resumes(base, tmp_path, tiny, texts, monkeypatch):
    more = texts[3:6]
    clean = extract_local(tiny("gpt2"), copy(base, tmp_path / "clean"), OLD, more, append="tokens", **KW)
    out = copy(base, tmp_path / "run")
    crash_after_shards(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        extract_local(tiny("gpt2"), out, OLD, more, append="tokens", shards_in_flight=1, **KW)
    monkeypatch.undo()
    calls = crash_after_shards(monkeypatch, 0, then=[])
    # second attempt dies after docs.parquet and stats/ were replaced, just before the manifest commit
    monkeypatch.setattr(append_parts, "commit_manifest", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        extract_local(tiny("gpt2"), out, OLD, more, append="tokens", **KW)
    n_new = len(clean.manifest.shards) - len(append_mod.open_store(str(out)).manifest.shards)
    assert calls.count(2) == n_new - 1  # committed new shards were skipped
    # docs.parquet and stats/ already describe the grown store; readers still see the committed one
    old, now = append_mod.open_store(str(base)), append_mod.open_store(str(out))
    assert now.docs().equals(old.docs())
    ref, got = old.stats(OLD[0]), now.stats(OLD[0])
    assert got.n == ref.n and np.array_equal(got.mean, ref.mean) and np.array_equal(got.m2, ref.m2)
    monkeypatch.undo()
    resumed = extract_local(tiny("gpt2"), out, OLD, more, append="tokens", **KW)
    assert resumed.manifest.shards == clean.manifest.shards
    assert resumed.manifest.corpus == clean.manifest.corpus
    assert digest(out) == digest(tmp_path / "clean")  # docs.parquet and stats too: no row counted twice
    assert resumed.verify().ok


@pytest.mark.ray
@pytest.mark.slow
def test_append_with_ray_equals_local(base, tmp_path, tiny, texts, ray_local):
    local = extract_local(tiny("gpt2"), copy(base, tmp_path / "local"), NEW, texts[:3], append="hooks", **KW)
    on_ray = extract_local(tiny("gpt2"), copy(base, tmp_path / "ray"), NEW, texts[:3], append="hooks",
                           executor="ray", **KW)
    assert on_ray.manifest.shards == local.manifest.shards
    grown = extract_local(tiny("gpt2"), tmp_path / "ray", OLD + NEW, texts[3:5], append="tokens",
                          executor="ray", **KW)
    assert grown.verify().ok and grown.n_tokens > local.n_tokens


def _grow_object_store(url: str, opts: dict, tmp_path: Path, tiny, texts) -> None:
    """Both appends on an object store (no rename: the commit records are the atomic steps)."""
    kw = dict(KW, storage_options=opts)
    extract_local(tiny("gpt2"), url, OLD, texts[:2], **kw)
    grown = extract_local(tiny("gpt2"), url, NEW, texts[:2], append="hooks", **kw)
    fresh = extract_local(tiny("gpt2"), tmp_path / "fresh", OLD + NEW, texts[:2], **KW)
    assert grown.manifest.shards == fresh.manifest.shards and grown.verify().ok
    more = extract_local(tiny("gpt2"), url, OLD + NEW, texts[2:4], append="tokens", **kw)
    assert more.verify().ok and more.n_tokens > grown.n_tokens
    assert more.docs().num_rows == 4


def test_append_on_memory_store(tmp_path, tiny, texts):
    _grow_object_store(f"memory://append-{tmp_path.name}", {}, tmp_path, tiny, texts)


@pytest.mark.s3
def test_append_on_s3(tmp_path, tiny, texts, moto_endpoint):
    opts = s3_options(moto_endpoint)
    s3_bucket(opts, "grow")
    _grow_object_store("s3://grow/store", opts, tmp_path, tiny, texts)
