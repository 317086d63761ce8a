"""Format v2 extraction over a corpus cut into parts, and the Parquet shard index of long shard lists.

Oracle for parts: packing never crosses a part, so a multi-part store holds, part after part, exactly what
extracting each part's documents as a corpus of its own stores (same windows, same rows, same bytes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import actstore
from actstore.schemas import layout
from actstore.workers.parts import PART_SHIFT, CorpusSpec, list_parts, read_part
from tests.support import extract_local

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


@pytest.fixture
def jsonl(tmp_path, texts) -> str:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t[:120], "label": i % 3}) + "\n" for i, t in enumerate(texts[:9])))
    return str(path)


def test_byte_range_parts_store_what_each_part_stores_alone(tmp_path, tiny, jsonl):
    part_bytes = 400
    spec = CorpusSpec(jsonl, part_bytes=part_bytes)
    parts = list_parts(spec)
    assert len(parts) >= 3 and {p.kind for p in parts} == {"bytes"}
    store = extract_local(tiny("gpt2"), tmp_path / "v2", HOOKS, jsonl, part_bytes=part_bytes, dtype="float32")
    m = store.manifest
    assert m.schema_version == 2 and [p.index for p in m.parts] == [p.index for p in parts]
    assert all(s.id.startswith(f"{s.part:06d}-") for s in m.shards)
    assert [s.token_start for s in m.shards] == list(np.cumsum([0] + [s.n_tokens for s in m.shards])[:-1])
    alone = []
    for p in parts:
        docs = [{"text": d.text, **d.meta} for d in read_part(p, spec)]
        alone.append(extract_local(tiny("gpt2"), tmp_path / f"alone-{p.index}", HOOKS, docs, dtype="float32"))
    for h in HOOKS:
        np.testing.assert_array_equal(store.to_numpy(h), np.concatenate([a.to_numpy(h) for a in alone]))
    assert m.n_tokens == sum(a.n_tokens for a in alone) and m.n_docs == sum(a.manifest.n_docs for a in alone)
    # ids: part << 32 | index in the part; tokens join docs; docs count each document's rows
    docs, tokens = store.docs(), store.tokens()
    want = [p.index << PART_SHIFT | i for p, a in zip(parts, alone) for i in range(a.manifest.n_docs)]
    assert docs.column("doc_id").to_pylist() == want
    assert docs.column("label").to_pylist() == [json.loads(line)["label"] for line in open(jsonl)]
    ids, counts = np.unique(tokens.column("doc_id").to_numpy(), return_counts=True)
    stored = dict(zip(docs.column("doc_id").to_pylist(), docs.column("n_tokens").to_pylist()))
    assert dict(zip(ids.tolist(), counts.tolist())) == {k: v for k, v in stored.items() if v}
    assert store.verify().ok and not (tmp_path / "v2" / layout.PARTS).exists()


def test_long_shard_lists_move_to_the_parquet_index(tmp_path, tiny, texts, monkeypatch):
    from actstore.pipeline.extract import commit

    listed = extract_local(tiny("gpt2"), tmp_path / "listed", HOOKS, texts[:5], shard_tokens=64)
    assert len(listed.manifest.shards) > 3 and not (tmp_path / "listed" / layout.SHARD_INDEX).exists()
    monkeypatch.setattr(commit, "INDEX_MIN_SHARDS", 3)
    indexed = extract_local(tiny("gpt2"), tmp_path / "indexed", HOOKS, texts[:5], shard_tokens=64)
    raw = json.loads((tmp_path / "indexed" / layout.MANIFEST).read_text())
    assert raw["shards"] == [] and raw["shard_index"]["n_shards"] == len(listed.manifest.shards)
    again = actstore.open_store(str(tmp_path / "indexed"))
    assert again.manifest.shards == indexed.manifest.shards == listed.manifest.shards and again.verify().ok
    np.testing.assert_array_equal(again.to_numpy(HOOKS[1]), listed.to_numpy(HOOKS[1]))
    index = tmp_path / "indexed" / layout.SHARD_INDEX
    index.write_bytes(index.read_bytes()[:-1] + b"\0")
    with pytest.raises(actstore.ManifestError, match="does not match the manifest's SHA-256"):
        actstore.open_store(str(tmp_path / "indexed"))
    index.unlink()
    with pytest.raises(actstore.ManifestError, match="is missing"):
        actstore.open_store(str(tmp_path / "indexed"))


def test_a_bad_part_leaves_nothing_and_a_rerun_continues_after_the_good_ones(tmp_path, tiny, texts, monkeypatch):
    """The failing part is named and none of its shards stay; the parts before it stay committed and are not read
    again by the rerun once the bad line is fixed (same size: the listing is unchanged)."""
    from actstore.workers import part_task

    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": t[:100]}) for t in texts[:9]]
    bad = json.dumps({"text": "a good line again"})
    broken = "{" + "x" * (len(bad) - 1)  # same length as its fix
    path.write_text("\n".join(lines[:7] + [broken] + lines[7:]) + "\n")
    spec = CorpusSpec(str(path), part_bytes=300)
    parts = list_parts(spec)
    where = path.read_text().index(broken)
    bad_part = next(p for p in parts if p.start <= where < p.stop)
    assert bad_part.index >= 1
    kw = dict(part_bytes=300, shard_tokens=64)
    with pytest.raises(actstore.CorpusError, match=rf"corpus part {bad_part.index} \(.*bytes {bad_part.start}-"):
        extract_local(tiny("gpt2"), tmp_path / "out", HOOKS, str(path), **kw)
    shards = [p.name for p in (tmp_path / "out" / layout.SHARDS).iterdir() if not p.name.startswith(".")]
    assert shards and all(int(s.split("-")[0]) < bad_part.index for s in shards)
    committed = sorted(p.name for p in (tmp_path / "out" / layout.PARTS).glob("*.json"))
    assert committed == [f"{i:06d}.json" for i in range(bad_part.index)]

    path.write_text(path.read_text().replace(broken, bad))
    read: list[int] = []
    real = part_task.read_part
    monkeypatch.setattr(part_task, "read_part", lambda p, s: read.append(p.index) or real(p, s))
    store = extract_local(tiny("gpt2"), tmp_path / "out", HOOKS, str(path), **kw)
    assert min(read) == bad_part.index  # committed parts are skipped unread
    fresh = extract_local(tiny("gpt2"), tmp_path / "fresh", HOOKS, str(path), **kw)
    assert store.manifest.shards == fresh.manifest.shards and store.docs().equals(fresh.docs())
    np.testing.assert_array_equal(store.to_numpy(HOOKS[1]), fresh.to_numpy(HOOKS[1]))
