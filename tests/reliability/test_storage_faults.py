"""Storage faults during extraction and reading: transient errors are retried, permanent ones fail clearly
without a commit, a full disk names its cause; after each, a resumed run is byte-identical to a clean one."""

from __future__ import annotations

import numpy as np
import pytest

import actstore
import tests.reliability.faultfs  # noqa: F401  (registers faulty://)
from actstore.pipeline.store.store import StoreError
from actstore.workers.storage import StorageError
from tests.reliability.faultfs import FaultFS

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.mlp.hook_post"]


def _cfg(tiny, texts, out):
    return dict(model=tiny("gpt2"), corpus=texts[:4], hooks=HOOKS, executor="local", output=out, progress=False,
                context_length=32, shard_tokens=256, batch_size=4)


@pytest.fixture
def clean(tmp_path, tiny, texts):
    FaultFS.reset()
    return actstore.extract(_cfg(tiny, texts, str(tmp_path / "clean")))


def _same(store, clean):
    assert store.verify().ok
    assert store.manifest.shards == clean.manifest.shards
    for h in HOOKS:
        np.testing.assert_array_equal(store.activations(h).compute(), clean.activations(h).compute())


def test_transient_write_faults_are_retried(tiny, texts, clean):
    FaultFS.reset(seed=1)
    FaultFS.p_write = 0.02
    store = actstore.extract(_cfg(tiny, texts, "faulty://t1/run"))
    assert FaultFS.injected > 0
    FaultFS.p_write = 0.0
    _same(store, clean)


def test_transient_read_faults_are_retried(tiny, texts, clean):
    FaultFS.reset(seed=2)
    store = actstore.extract(_cfg(tiny, texts, "faulty://t2/run"))
    FaultFS.p_read = 0.05
    _same(actstore.open_store("faulty://t2/run"), clean)
    assert sum(len(b) for b in actstore.open_store("faulty://t2/run").loader(HOOKS[0], 64)) == store.n_tokens
    assert FaultFS.injected > 0


def test_permanent_fault_fails_clearly_then_resumes(tiny, texts, clean):
    FaultFS.reset()
    sid = clean.manifest.shards[3].id
    FaultFS.deny = f"/shards/{sid}/"
    with pytest.raises(PermissionError):
        actstore.extract(_cfg(tiny, texts, "faulty://t3/run"))
    with pytest.raises(StoreError, match="incomplete"):
        actstore.open_store("faulty://t3/run")
    FaultFS.deny = ""
    _same(actstore.extract(_cfg(tiny, texts, "faulty://t3/run")), clean)


def test_full_disk_names_the_cause_then_resumes(tiny, texts, clean):
    FaultFS.reset()
    FaultFS.quota = 40_000
    with pytest.raises(StorageError, match="no space left"):
        actstore.extract(_cfg(tiny, texts, "faulty://t4/run"))
    with pytest.raises(StoreError, match="incomplete"):
        actstore.open_store("faulty://t4/run")
    FaultFS.quota = None
    _same(actstore.extract(_cfg(tiny, texts, "faulty://t4/run")), clean)


def test_cli_reports_full_disk_in_one_line(tmp_path, tiny, texts, capsys):
    import yaml

    from actstore.cli import main

    FaultFS.reset()
    FaultFS.quota = 30_000
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tiny, list(texts[:4]), "faulty://t5/run")))
    capsys.readouterr()
    assert main(["extract", str(cfg)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err
    FaultFS.reset()
