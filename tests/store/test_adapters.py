"""Adapters for other tools return exactly the numbers of `Store.activations`: torch (map and iterable with a
seeded global shuffle over DataLoader workers), Hugging Face datasets, xarray and SAELens (cache layout,
ActivationsStore and SAETrainer when sae_lens is installed)."""

from __future__ import annotations

import importlib.util
import json
import os

import dask.array as da
import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

import actstore
from actstore.pipeline.store.adapters import (
    ActivationDataset,
    GlobalShuffleIterable,
    export_saelens_cache,
    saelens_data_provider,
)
from actstore.pipeline.store.export import fixed_size_list

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"
N = 3000
HAS_SAELENS = importlib.util.find_spec("sae_lens") is not None


def _tokens(n: int) -> dict:
    special = np.zeros(n, bool)
    special[::50] = True  # a BOS every 50 rows, like packed windows of 50
    return {"token_id": np.arange(n) % 97, "doc_id": np.arange(n) // 120, "seq_id": np.arange(n) // 50,
            "position": np.arange(n) % 50, "special": special}


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def store(request, tmp_path_factory):
    """Random rows with heavy tails (bf16/f16 rounding shows up), 12 shards of 250 rows, two hooks."""
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.standard_normal((N, 8)).astype(np.float32) * 3)
    b = torch.from_numpy(rng.standard_normal((N, 24)).astype(np.float32) ** 3)
    dt = getattr(torch, request.param)
    return actstore.from_arrays({H0: a.to(dt), H1: b.to(dt)}, str(tmp_path_factory.mktemp(request.param) / "s"),
                                tokens=_tokens(N), shard_tokens=250)


@pytest.fixture(scope="module")
def ref(store):
    return {h: store.activations(h).compute() for h in (H0, H1)}


@pytest.fixture(scope="module")
def rowstore(tmp_path_factory):
    """float32 store whose row i holds the value i everywhere: batches show which rows they contain."""
    x = np.arange(N, dtype=np.float32)[:, None].repeat(4, 1)
    return actstore.from_arrays({H0: x}, str(tmp_path_factory.mktemp("rows") / "s"), tokens=_tokens(N),
                                shard_tokens=250)


def _same_bits(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))


# ---- map-style ----------------------------------------------------------------------------------------------
def test_map_dataset_matches_activations(store, ref):
    ds = store.torch_dataset([H0, H1])
    batches = list(DataLoader(ds, batch_size=333, shuffle=False))
    for h in (H0, H1):
        _same_bits(torch.cat([b[h] for b in batches]).numpy(), ref[h])
    single = store.torch_dataset(H1)
    _same_bits(single[7].numpy(), ref[H1][7])
    _same_bits(single[-1].numpy(), ref[H1][-1])


def test_map_getitems_reads_each_shard_once(store, ref):
    ds = ActivationDataset(store, H0, rows=(100, 2900), with_row_ids=True)
    calls = []

    class Counting:
        def __init__(self, arr):
            self.arr = arr

        def get_orthogonal_selection(self, sel):
            calls.append(len(sel[0]))
            return self.arr.get_orthogonal_selection(sel)

    opened = ds._array
    ds._array = lambda s, h: Counting(opened(s, h))
    idx = [5, 1200, 6, 1201, 5, 2799, -1]  # rows 105, 1300, 106, 1301, 105, 2899, 2899: shards 0, 5, 11
    items = ds.__getitems__(idx)
    assert calls == [2, 2, 1]  # one read per shard, duplicates read once
    rows = [int(it["row"]) for it in items]
    assert rows == [105, 1300, 106, 1301, 105, 2899, 2899]
    _same_bits(torch.stack([it[H0] for it in items]).numpy(), ref[H0][rows])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_map_dataset_with_shuffling_workers(rowstore):
    ds = rowstore.torch_dataset(H0, kind="map")
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([b[:, 0] for b in DataLoader(ds, batch_size=128, shuffle=True, generator=g, num_workers=2)])
    assert sorted(rows.long().tolist()) == list(range(N))


# ---- iterable, global shuffle -------------------------------------------------------------------------------
def _epoch_rows(ds, workers: int) -> np.ndarray:
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return torch.cat([b["row"] for b in loader]).numpy()


def test_iterable_workers_epoch_is_permutation(rowstore):
    ds = rowstore.torch_dataset(H0, kind="iterable", seed=0, batch_size=64, window_chunks=3, with_row_ids=True)
    orders = {}
    for seed, epoch in ((0, 0), (0, 1), (1, 0)):
        ds.seed = seed
        ds.set_epoch(epoch)
        rows = _epoch_rows(ds, workers=2)
        assert len(rows) == N and np.array_equal(np.sort(rows), np.arange(N))  # every row exactly once
        assert set(rows.tolist()) == set(ds.epoch_order().tolist())
        orders[seed, epoch] = rows
    assert not np.array_equal(orders[0, 0], orders[0, 1])  # epochs differ
    assert not np.array_equal(orders[0, 0], orders[1, 0])  # seeds differ
    assert not np.array_equal(np.sort(orders[0, 0][:500]), np.arange(500))  # not the store order


def test_iterable_values_and_order_match_epoch_order(store, ref):
    ds = GlobalShuffleIterable(store, [H0, H1], batch_size=100, seed=3, window_chunks=4, with_row_ids=True)
    batches = list(ds)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    np.testing.assert_array_equal(rows, ds.epoch_order())  # one process yields the documented order
    for h in (H0, H1):
        _same_bits(torch.cat([b[h] for b in batches]).numpy(), ref[h][rows])
    assert [len(b["row"]) for b in batches] == [100] * 30


def test_iterable_shuffle_is_global(rowstore):
    """The chunks of the first window come from anywhere in the store, not only from its start."""
    firsts = []
    for seed in range(6):
        ds = GlobalShuffleIterable(rowstore, H0, seed=seed, window_chunks=2)
        firsts.append(sorted(i for i, _, _ in ds.windows()[0]))
    assert len({tuple(f) for f in firsts}) > 1 and max(max(f) for f in firsts) >= 6


def test_iterable_single_rows_skip_special_and_ranks(rowstore):
    special = np.asarray(_tokens(N)["special"])
    ds = GlobalShuffleIterable(rowstore, H0, skip_special=True, seed=5, window_chunks=2)
    rows = np.array([int(r[0]) for r in ds])  # batch_size=None: one (d,) tensor per row
    np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(~special))
    parts = [np.concatenate([b["row"].numpy() for b in GlobalShuffleIterable(
        rowstore, H0, batch_size=32, seed=5, window_chunks=2, rank=r, world_size=3, with_row_ids=True)]) for r in range(3)]
    allrows = np.concatenate(parts)
    assert len(allrows) == N and np.array_equal(np.sort(allrows), np.arange(N))
    assert all(len(p) > 0 for p in parts)


def test_iterable_drop_last_and_bad_args(rowstore):
    ds = GlobalShuffleIterable(rowstore, H0, batch_size=7, drop_last=True)
    assert all(len(b) == 7 for b in ds) and sum(len(b) for b in ds) == N - N % 7
    with pytest.raises(ValueError):
        GlobalShuffleIterable(rowstore, H0, batch_size=0)
    with pytest.raises(actstore.HookNameError, match="not in this store"):
        rowstore.torch_dataset("blocks.9.hook_resid_post", kind="iterable")
    with pytest.raises(ValueError, match="kind"):
        rowstore.torch_dataset(H0, kind="random")


# ---- Hugging Face datasets ----------------------------------------------------------------------------------
def test_hf_dataset_round_trip(store, ref, tmp_path):
    ds = store.to_hf_dataset(H1)
    assert ds.num_rows == N and ds.features["activations"].length == 24
    want = ref[H1]
    _same_bits(_arrow_rows(ds, 24), want)  # Arrow holds the decoded stored dtype bit for bit
    # datasets' numpy formatter widens float16 to float32 (exactly)
    np.testing.assert_array_equal(np.asarray(ds.with_format("numpy")["activations"]), want.astype(np.float32))
    tok = store.tokens()
    for c in ("token_id", "doc_id", "seq_id", "position", "special"):
        np.testing.assert_array_equal(np.asarray(ds[c]), tok.column(c).to_numpy(zero_copy_only=False))
    part = store.to_hf_dataset(H1, rows=(240, 760), cache_file=tmp_path / "c.arrow")
    assert part.cache_files and part.num_rows == 520  # memory-mapped from the streamed file
    _same_bits(_arrow_rows(part, 24), want[240:760])
    assert json.loads(ds.info.description)["hook"] == H1


def _arrow_rows(ds, d: int) -> np.ndarray:
    return ds.data.table.column("activations").combine_chunks().flatten().to_numpy().reshape(-1, d)


def test_fixed_size_list_wraps_numpy_without_copy():
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    arr = fixed_size_list(x)
    assert arr.type == pa.list_(pa.float32(), 6)
    assert arr.values.buffers()[1].address == x.ctypes.data


# ---- xarray -------------------------------------------------------------------------------------------------
def test_xarray_round_trip(store, ref):
    xa = store.to_xarray()
    assert xa[H0].dims == ("token", f"d_{H0}") and xa[H1].shape == (N, 24)
    assert isinstance(xa[H0].data, da.Array)  # lazy
    for h in (H0, H1):
        _same_bits(xa[h].values, ref[h])
    tok = store.tokens()
    for c in ("token_id", "doc_id", "seq_id", "position", "special"):
        np.testing.assert_array_equal(xa[c].values, tok.column(c).to_numpy(zero_copy_only=False))
    sel = xa[H0].where(xa.doc_id == 3, drop=True)
    _same_bits(sel.values, ref[H0][360:480])
    assert json.loads(xa.attrs["dtypes"])[H0] == store.manifest.hook(H0).dtype


# ---- SAELens ------------------------------------------------------------------------------------------------
def test_saelens_cache_layout(store, ref, tmp_path):
    from datasets import Array2D, List, Value, load_from_disk

    out = tmp_path / "cache"
    info = export_saelens_cache(store, H0, out, rows=(100, 2990), context_size=50)
    assert info["n_sequences"] == 57 and info["rows"] == [100, 2950] and info["dropped_rows"] == 40
    names = sorted(os.listdir(out))
    assert names == ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    ds = load_from_disk(str(out))
    dt = "float32" if store.manifest.hook(H0).dtype == "bfloat16" else store.manifest.hook(H0).dtype
    assert ds.features[H0] == Array2D(shape=(50, 8), dtype=dt)
    assert ds.features["token_ids"] == List(Value("int32"), length=50)
    assert list(ds.features) == [H0, "token_ids"]
    acts = np.asarray(ds.with_format("numpy")[H0])
    assert acts.shape == (57, 50, 8)
    np.testing.assert_array_equal(acts.reshape(-1, 8), ref[H0][100:2950].astype(np.float32))
    stored = ds.data.table.column(H0).combine_chunks().storage.flatten().flatten().to_numpy()
    _same_bits(stored.reshape(-1, 8), ref[H0][100:2950])  # the Arrow values are the stored numbers
    toks = np.asarray(ds.with_format("numpy")["token_ids"])
    np.testing.assert_array_equal(toks.reshape(-1), _tokens(N)["token_id"][100:2950])
    with pytest.raises(ValueError, match="not empty"):
        export_saelens_cache(store, H0, out, context_size=50)


def test_saelens_data_provider_epochs(rowstore):
    special = np.asarray(_tokens(N)["special"])
    it = saelens_data_provider(rowstore, H0, batch_size=100, seed=2)
    # 2940 non-special rows: 29 full batches per epoch (the short one is dropped), every row at most once
    first = torch.cat([next(it) for _ in range(29)])[:, 0].long().numpy()
    assert len(set(first.tolist())) == 2900 and not special[first].any()
    second = torch.cat([next(it) for _ in range(29)])[:, 0].long().numpy()
    assert len(set(second.tolist())) == 2900 and not np.array_equal(first, second)  # next epoch reshuffled


@pytest.mark.skipif(not HAS_SAELENS, reason="sae_lens is not installed")
def test_saelens_activations_store_reads_export(store, ref, tmp_path):
    from sae_lens import ActivationsStore

    out = tmp_path / "cache"
    export_saelens_cache(store, H1, out, context_size=50)
    acts_store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=H1, hook_head_index=None, context_size=50, d_in=24,
        n_batches_in_buffer=2, total_training_tokens=N, store_batch_size_prompts=4, train_batch_size_tokens=100,
        prepend_bos=False, normalize_activations="none", device=torch.device("cpu"), dtype="float32",
        cached_activations_path=str(out))
    acts, token_ids = acts_store.get_raw_llm_batch()
    np.testing.assert_array_equal(acts.numpy(), ref[H1][:200].astype(np.float32))
    np.testing.assert_array_equal(token_ids.numpy(), _tokens(N)["token_id"][:200])


@pytest.mark.skipif(not HAS_SAELENS, reason="sae_lens is not installed")
def test_saelens_trainer_trains_from_store(tmp_path):
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 4)).astype(np.float32) @ rng.standard_normal((4, 8)).astype(np.float32)
    store = actstore.from_arrays({H0: x}, str(tmp_path / "s"), shard_tokens=500)  # rank-4 data: easy to fit
    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=8, d_sae=32, l1_coefficient=1e-3))
    cfg = SAETrainerConfig(total_training_samples=6400, train_batch_size_samples=128, lr=3e-3,
                           lr_end=3e-3, n_batches_for_norm_estimate=5)
    provider = saelens_data_provider(store, H0, batch_size=128, seed=0)
    batch = next(saelens_data_provider(store, H0, batch_size=128, seed=0))
    with torch.no_grad():
        before = float(((sae(batch) - batch) ** 2).mean())
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider)
    trained = trainer.fit()
    with torch.no_grad():
        after = float(((trained(batch) - batch) ** 2).mean())
    assert trainer.n_training_samples == 6400 and after < 0.5 * before
