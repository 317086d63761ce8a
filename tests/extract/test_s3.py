"""Extraction to and reading from s3:// against a real S3 protocol server (moto) on localhost, via s3fs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import actstore
from tests.support import s3_bucket, s3_options

pytestmark = pytest.mark.s3
SECRET = "s3cr3t-PLANTED-value-9431"
HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]


@pytest.fixture(scope="module")
def s3(moto_endpoint):
    """The session's S3 server with this module's bucket and the planted secret in the credentials."""
    opts = s3_options(moto_endpoint, SECRET)
    return s3_bucket(opts, "acts"), opts


def test_extract_to_s3_and_read_back(tmp_path, s3, tiny, texts, capfd):
    fs, opts = s3
    fs.pipe("acts/corpus/docs.jsonl", "\n".join(json.dumps({"text": t, "label": i % 2})
                                                for i, t in enumerate(texts[:5])).encode())
    base = dict(model=tiny("gpt2"), corpus="s3://acts/corpus/docs.jsonl", hooks=HOOKS, executor="local",
                context_length=32, shard_tokens=256, batch_size=4, progress=False, storage_options=opts)
    remote = actstore.extract(dict(base, output="s3://acts/run1"))
    local = actstore.extract(dict(base, output=str(tmp_path / "local")))
    reopened = actstore.open_store("s3://acts/run1", storage_options=opts)
    assert reopened.verify().ok
    assert reopened.manifest.shards == local.manifest.shards
    for h in HOOKS:
        np.testing.assert_array_equal(reopened.activations(h).compute(), local.activations(h).compute())
    assert reopened.docs().column("label").to_pylist() == [0, 1, 0, 1, 0]
    batch = next(reopened.loader(HOOKS[0], 32, seed=1))
    assert batch.shape == (32, 32)
    # the planted secret is nowhere in what we wrote or printed
    for path in fs.find("acts/run1"):
        assert SECRET.encode() not in fs.cat(path), path
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    assert remote.manifest.extract_config and "storage_options" not in remote.manifest.extract_config
