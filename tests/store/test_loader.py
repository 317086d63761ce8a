"""Store.loader: each row exactly once per epoch, deterministic for a seed, bounded shuffle buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import actstore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    n = 5000
    x = np.arange(n, dtype=np.float32)[:, None].repeat(3, 1)  # row i holds the value i: identifies rows
    special = np.zeros(n, bool)
    special[::7] = True
    tokens = {"doc_id": np.arange(n) // 50, "special": special}
    return actstore.from_arrays({"blocks.0.hook_resid_post": x, "blocks.1.hook_resid_post": -x},
                                str(tmp_path_factory.mktemp("l") / "s"), tokens=tokens, shard_tokens=1200)


def _rows(batches):
    return torch.cat([b[:, 0] for b in batches]).long().numpy()


def test_each_row_once_and_deterministic(store):
    a = _rows(store.loader("blocks.0.hook_resid_post", 64, seed=3, buffer_rows=700))
    b = _rows(store.loader("blocks.0.hook_resid_post", 64, seed=3, buffer_rows=700))
    c = _rows(store.loader("blocks.0.hook_resid_post", 64, seed=4, buffer_rows=700))
    assert sorted(a.tolist()) == list(range(store.n_tokens))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and sorted(c.tolist()) == list(range(store.n_tokens))
    assert not np.array_equal(a, np.arange(store.n_tokens))  # actually shuffled


def test_multi_hook_rows_aligned_and_special_skipped(store):
    seen = []
    for batch in store.loader(["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], 100, skip_special=True):
        np.testing.assert_array_equal(batch["blocks.0.hook_resid_post"], -batch["blocks.1.hook_resid_post"])
        seen.append(batch["blocks.0.hook_resid_post"][:, 0])
    rows = torch.cat(seen).long().numpy()
    assert sorted(rows.tolist()) == [i for i in range(store.n_tokens) if i % 7]


def test_batches_full_except_last_and_unshuffled_order(store):
    sizes = [len(b) for b in store.loader("blocks.0.hook_resid_post", 64, shuffle=False)]
    assert all(s == 64 for s in sizes[:-1]) and sum(sizes) == store.n_tokens
    rows = _rows(store.loader("blocks.0.hook_resid_post", 64, shuffle=False))
    np.testing.assert_array_equal(rows, np.arange(store.n_tokens))


def test_buffer_bounds_window(store):
    """With a small buffer, early batches only mix rows from a few chunks (bounded memory)."""
    from actstore.pipeline.store.loader import ActivationLoader

    ld = ActivationLoader(store, "blocks.0.hook_resid_post", 50, seed=0, buffer_rows=600)
    first = next(iter(ld))[:, 0].long().numpy()
    chunks = {store.manifest.shards[i].token_start + a for i, a, b in ld.blocks() for r in first
              if store.manifest.shards[i].token_start + a <= r < store.manifest.shards[i].token_start + b}
    total = sum(b - a for i, a, b in ld.blocks() if store.manifest.shards[i].token_start + a in chunks)
    assert total <= 600 + max(b - a for _, a, b in ld.blocks())
