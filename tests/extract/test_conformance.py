"""Executor conformance: every executor and storage writes the store the local executor writes on a local disk.

One case per executor (local, ray) x storage dtype x packing x mode (plain extract, `append: hooks`,
`append: tokens`) x storage (local directory, S3 via moto). The reference for a case is always the local
executor writing to a local directory with the same configs. A case must match it byte for byte: every stored
array (raw Zarr chunks and `shard_array` bytes, uint16 bits for bfloat16), every file of the store, each shard's
token table and the token index, docs, merged statistics and the comparable part of the manifest (shard list with
ranges and per-array SHA-256, hooks, counts, corpus, stats, config hash) -- versions and the output URL may differ.

An append case starts from the reference's base store (copied to the case's storage) and runs only the append on
the case's executor: the base extraction itself is what the plain cases check, and one Ray run per case keeps the
full matrix affordable. Packed Ray cases run two actors, so shards are written concurrently and may commit in any
order; unpacked ones run one (each actor start costs seconds on a small machine). The default run takes a covering subset (every value of every axis, Ray in every mode and
on both storages); the rest is marked slow and runs in CI through `make test-conformance`.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import actstore
from actstore.pipeline.store.store import Store
from actstore.schemas import layout
from actstore.workers.dtypes import NUMPY_STORED
from tests.support import s3_bucket, s3_options

EXECUTORS = ("local", "ray")
DTYPES = ("float32", "float16", "bfloat16")
PACKING = (True, False)
MODES = ("plain", "append_hooks", "append_tokens")
STORAGES = ("file", "s3")
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
MORE_HOOKS = ["blocks.2.hook_resid_post"]
BUCKET = "conformance"
# Small enough that a Ray case is dominated by starting its actor, large enough for several shards per store.
SIZES = dict(context_length=16, shard_tokens=32, batch_size=4)

# Default run: every axis value at least once; Ray runs each mode, each dtype, both packings and both storages.
DEFAULT = {
    ("ray", "bfloat16", True, "plain", "s3"),
    ("ray", "float16", False, "append_hooks", "file"),
    ("ray", "float32", True, "append_tokens", "s3"),  # float32 bits once depended on the Ray pool's thread count
    ("local", "bfloat16", False, "plain", "s3"),
    ("local", "float32", True, "append_hooks", "s3"),
    ("local", "float16", False, "append_tokens", "s3"),
}

def _cases() -> list[Any]:
    params = []
    for case in itertools.product(EXECUTORS, DTYPES, PACKING, MODES, STORAGES):
        executor, dtype, packing, mode, storage = case
        marks = [] if case in DEFAULT else [pytest.mark.slow]
        marks += [pytest.mark.ray] if executor == "ray" else []
        marks += [pytest.mark.s3] if storage == "s3" else []
        name = f"{executor}-{dtype}-{'packed' if packing else 'unpacked'}-{mode}-{storage}"
        params.append(pytest.param(*case, marks=marks, id=name))
    return params


@pytest.fixture(scope="module")
def corpora(texts) -> tuple[list[dict], list[dict]]:
    """Two short corpora with metadata (the second has a field the first lacks), cut so every case stays quick."""
    first = [{"text": t[:50], "label": i % 2} for i, t in enumerate(texts[:3])]
    second = [{"text": t[:60], "topic": f"t{i}"} for i, t in enumerate(texts[3:5])]
    return first, second


def _steps(model: str, dtype: str, packing: bool, mode: str,
           corpora: tuple[list[dict], list[dict]]) -> tuple[dict, dict | None]:
    """(base extract config, append config or None) of a case, without executor and output."""
    first, second = corpora
    base = dict(model=model, corpus=first, hooks=HOOKS, dtype=dtype, packing=packing, progress=False, **SIZES)
    if mode == "append_hooks":
        return base, dict(base, hooks=MORE_HOOKS, append="hooks")
    if mode == "append_tokens":
        return base, dict(base, corpus=second, append="tokens")
    return base, None


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny, corpora) -> Callable[[str, bool, str], Path]:
    """reference(dtype, packing, mode) -> directory of the local executor's store on local disk (built once)."""
    root, built = tmp_path_factory.mktemp("reference"), {}

    def get(dtype: str, packing: bool, mode: str) -> Path:
        if (dtype, packing, mode) in built:
            return built[dtype, packing, mode]
        base, grow = _steps(tiny("gpt2"), dtype, packing, mode, corpora)
        out = root / f"{dtype}-{packing}-{mode}"
        if grow is None:
            actstore.extract(dict(base, executor="local", output=str(out)))
        else:
            shutil.copytree(get(dtype, packing, "plain"), out)
            actstore.extract(dict(grow, executor="local", output=str(out)))
        built[dtype, packing, mode] = out
        return out

    return get


def _place_base(base: Path | None, storage: str, tmp_path: Path, moto_endpoint: Callable[[], str]) -> tuple[str, dict]:
    """Where a case writes (URL, storage options); with `base`, that store is copied there first."""
    if storage == "file":
        out = tmp_path / "store"
        if base is not None:
            shutil.copytree(base, out)
        return str(out), {}
    opts = s3_options(moto_endpoint())
    fs = s3_bucket(opts, BUCKET)
    key = f"{BUCKET}/{tmp_path.name}-{uuid.uuid4().hex[:8]}"
    if base is not None:
        fs.put(f"{base}/", key, recursive=True)
    return f"s3://{key}", opts


@pytest.mark.parametrize("executor,dtype,packing,mode,storage", _cases())
def test_store_equals_local_reference(executor, dtype, packing, mode, storage, reference, tiny, corpora, tmp_path,
                                      request):
    if executor == "ray":
        request.getfixturevalue("ray_local")  # one Ray for the whole module, started by its first Ray case
    ref_dir = reference(dtype, packing, mode)
    base, grow = _steps(tiny("gpt2"), dtype, packing, mode, corpora)
    seed = reference(dtype, packing, "plain") if grow is not None else None
    url, opts = _place_base(seed, storage, tmp_path, lambda: request.getfixturevalue("moto_endpoint"))
    got = actstore.extract(dict(grow or base, executor=executor, output=url, storage_options=opts,
                                num_workers=_ray_actors(executor, packing)))
    ref = actstore.open_store(str(ref_dir))
    _check_reference_shape(ref, dtype, mode)
    assert_same_store(actstore.open_store(url, storage_options=opts), ref)
    assert got.manifest.shards == ref.manifest.shards  # the Store extract returned reads the same


def _ray_actors(executor: str, packing: bool) -> int | None:
    """Two concurrent actors where a case has shards enough to share (packed: >= 3 to write), else one."""
    return (2 if packing else 1) if executor == "ray" else None


def _check_reference_shape(ref: Store, dtype: str, mode: str) -> None:
    """The reference is a real multi-shard store of the kind the mode makes (the comparison is not vacuous)."""
    m = ref.manifest
    assert len(m.shards) >= 2 and m.n_tokens > 0
    assert ref.hooks == HOOKS + (MORE_HOOKS if mode == "append_hooks" else [])
    assert {h.dtype for h in m.hooks} == {dtype}
    assert m.n_docs == (5 if mode == "append_tokens" else 3)
    assert (m.corpus.parts is not None) == (mode == "append_tokens")


def assert_same_store(got: Store, ref: Store) -> None:
    """Everything a reader can see, and every stored byte, equal between two stores (manifest: comparable part)."""
    _assert_same_manifest(got, ref)
    for i in range(len(ref.manifest.shards)):
        for hook in ref.hooks:
            _assert_same_array(got, ref, i, hook)
        assert got.shard_tokens(i).equals(ref.shard_tokens(i)), f"tokens.parquet of shard {i}"
    assert got.tokens().equals(ref.tokens())
    assert got.docs().equals(ref.docs())
    for hook in ref.hooks:
        path = layout.stats_file
        assert got.fs.cat_file(path(got.root, hook)) == ref.fs.cat_file(path(ref.root, hook)), f"stats of {hook}"
    got_files, ref_files = _files(got), _files(ref)
    assert sorted(got_files) == sorted(ref_files)
    assert [k for k in ref_files if got_files[k] != ref_files[k]] == []
    report = got.verify()
    assert report.ok, report.problems


def _assert_same_manifest(got: Store, ref: Store) -> None:
    g, r = got.manifest, ref.manifest
    assert g.shards == r.shards  # ids, sequence/token/doc ranges, per-array and tokens.parquet SHA-256
    assert g.hooks == r.hooks
    fields = ("n_tokens", "n_sequences", "n_docs", "corpus", "stats", "config_hash", "context_length", "packing",
              "model", "tokenizer", "schema_version")
    assert {f: getattr(g, f) for f in fields} == {f: getattr(r, f) for f in fields}
    where = {"output", "executor", "num_workers"}  # where and how it ran: the only config that may differ
    assert {k: v for k, v in g.extract_config.items() if k not in where} == {
        k: v for k, v in r.extract_config.items() if k not in where}


def _assert_same_array(got: Store, ref: Store, i: int, hook: str) -> None:
    """The stored array (bfloat16 as its uint16 bits) byte for byte, and its bytes' SHA-256 in the manifest."""
    a, b = got.shard_array(i, hook)[:], ref.shard_array(i, hook)[:]
    stored = NUMPY_STORED[ref.manifest.hook(hook).dtype]
    assert a.dtype == b.dtype == stored and a.shape == b.shape, (i, hook, a.dtype, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), f"shard {i} {hook}: {np.count_nonzero(a != b)} values differ"
    assert hashlib.sha256(a.tobytes()).hexdigest() == ref.manifest.shards[i].arrays[hook]


def _files(store: Store) -> dict[str, bytes]:
    """Every file of the store by path under its root (manifest excluded: it records versions and the URL)."""
    store.fs.invalidate_cache()  # Ray actors wrote through their own filesystem objects
    paths = [p for p in store.fs.find(store.root) if not p.endswith(layout.MANIFEST)]
    root = store.root.rstrip("/") + "/"
    return {p[len(root):]: store.fs.cat_file(p) for p in paths}


def test_comparison_catches_one_changed_value(reference, tmp_path):
    """The check is not vacuous: one flipped bit in one stored value of a copy is reported. The value is
    rewritten through Zarr, so the chunk's checksum stays valid and only the comparison can catch it."""
    ref_dir = reference("bfloat16", True, "plain")
    copy = shutil.copytree(ref_dir, tmp_path / "copy")
    ref = actstore.open_store(str(ref_dir))
    sid, hook = ref.manifest.shards[1].id, HOOKS[1]
    arr = zarr.open_array(str(copy / layout.SHARDS / sid / layout.ACTS / hook), mode="r+")
    arr[0, 2] = arr[0, 2] ^ 1  # bfloat16 is stored as its uint16 bits
    with pytest.raises(AssertionError, match=f"shard 1 {hook}: 1 values differ"):
        assert_same_store(actstore.open_store(str(copy)), ref)
