"""Bad inputs and damaged stores: each fails with a one-line message that names the cause (or is handled)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import actstore
from actstore.pipeline.store.store import StoreError
from actstore.schemas.manifest import ManifestError
from tests.support import extract_local

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def store_dir(tmp_path, tiny, texts):
    extract_local(tiny("gpt2"), tmp_path / "s", [HOOK], texts[:3])
    return tmp_path / "s"


def test_newer_schema_version_refused(store_dir):
    m = json.loads((store_dir / "manifest.json").read_text())
    m["schema_version"] = 99
    (store_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="schema_version 99.*upgrade actstore"):
        actstore.open_store(str(store_dir))


def test_truncated_manifest_refused(store_dir):
    raw = (store_dir / "manifest.json").read_bytes()
    (store_dir / "manifest.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ManifestError, match="not valid JSON"):
        actstore.open_store(str(store_dir))


def test_hand_edited_manifest_refused(store_dir):
    m = json.loads((store_dir / "manifest.json").read_text())
    m["n_tokens"] = "lots"
    m["hooks"][0]["bogus"] = 1
    (store_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="invalid at"):
        actstore.open_store(str(store_dir))


def test_manifest_size_limit(store_dir, monkeypatch):
    from actstore.pipeline.store import store as store_mod

    monkeypatch.setattr(store_mod, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ValueError, match="above the 100-byte limit"):
        actstore.open_store(str(store_dir))


def test_array_shape_disagrees_with_manifest(store_dir):
    store = actstore.open_store(str(store_dir))
    sid = store.manifest.shards[0].id
    path = store_dir / "shards" / sid / "acts.zarr"
    g = zarr.open_group(str(path), mode="a")
    data = g[HOOK][:]
    del g[HOOK]
    g.create_array(HOOK, data=data[:-3])
    with pytest.raises(StoreError, match=f"shard {sid}: array .* has shape .* but the manifest says"):
        actstore.open_store(str(store_dir)).activations(HOOK)
    rep = actstore.open_store(str(store_dir)).verify()
    assert not rep.ok and sid in rep.problems[0]


def test_document_longer_than_context_is_truncated_or_split(tmp_path, tiny, texts):
    long_doc = " ".join(texts[:4])
    unpacked = extract_local(tiny("gpt2"), tmp_path / "u", [HOOK], [long_doc, "short one"], packing=False)
    assert unpacked.manifest.n_sequences == 2
    assert unpacked.docs().column("n_tokens").to_pylist()[0] == 32  # truncated to context_length
    packed = extract_local(tiny("gpt2"), tmp_path / "p", [HOOK], [long_doc], packing=True)
    assert packed.manifest.n_sequences > 10  # split across windows, nothing dropped
    assert packed.docs().column("n_tokens").to_pylist()[0] == packed.n_tokens


def test_empty_documents_are_kept_in_docs(tmp_path, tiny, texts):
    store = extract_local(tiny("gpt2"), tmp_path / "e", [HOOK], ["", texts[0], "   ", texts[1]], packing=False)
    n = store.docs().column("n_tokens").to_pylist()
    assert n[0] == 0 and n[1] > 0 and n[3] > 0 and store.docs().num_rows == 4
    assert set(store.tokens().column("doc_id").to_pylist()) <= {1, 2, 3}


def test_jsonl_line_size_limit(tmp_path, tiny, monkeypatch):
    from actstore.workers import corpus

    monkeypatch.setattr(corpus, "MAX_JSON_LINE", 50)
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "x" * 100}) + "\n")
    with pytest.raises(corpus.CorpusError, match="line 1 is longer than 50 bytes"):
        extract_local(tiny("gpt2"), tmp_path / "s", [HOOK], str(p))


def test_config_file_size_limit(tmp_path, monkeypatch):
    from actstore.schemas import validation

    monkeypatch.setattr(validation, "MAX_CONFIG_BYTES", 10)
    p = tmp_path / "c.yaml"
    p.write_text("model: x\nhooks: []\n")
    with pytest.raises(actstore.ConfigError, match="larger than 10 bytes"):
        actstore.ExtractConfig.build(p)


@pytest.mark.parametrize("bad", ["blocks.0/../x", "module:../../etc", "module:a/b", "../blocks.0.hook_resid_post"])
def test_hook_names_cannot_escape_the_store(tmp_path, bad):
    from actstore.schemas.hooks import HookNameError

    with pytest.raises(HookNameError):
        actstore.from_arrays({bad: np.zeros((2, 2), np.float32)}, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_reader_sees_only_committed_state(tmp_path, tiny, texts):
    """While an extraction runs the output does not open; afterwards the full store does."""
    import threading
    import time

    out = tmp_path / "s"
    t = threading.Thread(target=lambda: extract_local(tiny("gpt2"), out, [HOOK], texts[:8]))
    t.start()
    seen_partial = False
    while t.is_alive():
        try:
            s = actstore.open_store(str(out))
            seen_partial |= s.n_tokens == 0
        except StoreError:
            pass
        time.sleep(0.01)
    t.join()
    assert not seen_partial and actstore.open_store(str(out)).verify().ok


def test_two_training_jobs_on_one_output_refused(tmp_path, store_dir):
    import threading
    import time

    from actstore.pipeline.extract.lease import LeaseError

    store = actstore.open_store(str(store_dir))
    out = str(tmp_path / "sae")
    t = threading.Thread(target=lambda: actstore.train_sae(store, HOOK, expansion=2, k=4, training_tokens=400_000,
                                                            batch_size=256, out_dir=out, n_eval_seqs=0))
    t.start()
    deadline = time.time() + 60
    while not (tmp_path / "sae" / "lease.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(LeaseError, match="another training job"):
        actstore.train_sae(store, HOOK, expansion=2, k=4, training_tokens=1000, batch_size=256, out_dir=out)
    t.join()
    assert (tmp_path / "sae" / "metrics.json").exists()
