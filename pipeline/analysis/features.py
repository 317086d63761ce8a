"""`actstore encode`: an SAE's sparse codes for every token of a stored hook, written as a feature store, and
`open_features` to read one back.

The feature store (layout in `actstore.workers.feature_store`) mirrors the source store's shards, so its rows
are the source's rows and its token index is the source's, byte for byte. Encoding streams: one task per
shard (Dask, like the other analysis jobs) reads the hook in blocks of `batch_rows` (the next block is read
while the current one encodes), keeps each token's top-k latents, and commits the shard; `features.json` is
written last. Rerunning the same command skips committed shards; another SAE, hook or k on the same output is
refused unless `overwrite`.

Before any work: the SAE's own metadata (actstore.json / metrics.json, or SAELens' cfg.json) must name the
hook being encoded and the store's model, and its width must match the hook's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas import layout
from actstore.schemas.errors import ConfigError, HookNameError, OutputError, StoreError
from actstore.schemas.jobs import EncodeJob
from actstore.workers import storage
from actstore.workers.feature_store import FORMAT, FORMAT_VERSION

log = logging.getLogger("actstore")
MAX_FEATURES_MANIFEST = 256 << 20


# ------------------------------------------------------------------------------------------------- reading


class FeatureStore:
    """A committed feature store: per token the top-k SAE latent ids (int32) and values (float16)."""

    def __init__(self, url: str, manifest: dict[str, Any], fs: Any, root: str,
                 storage_options: dict[str, Any] | None = None, manifest_sha256: str = "") -> None:
        self.url, self.manifest, self.fs, self.root = url, manifest, fs, root
        self.storage_options = storage_options or {}
        self.manifest_sha256 = manifest_sha256

    def __repr__(self) -> str:
        return (f"FeatureStore({self.url!r}, hook={self.hook!r}, d_sae={self.d_sae}, k={self.k}, "
                f"n_tokens={self.n_tokens})")

    @property
    def hook(self) -> str:
        """The stored hook that was encoded."""
        return str(self.manifest["hook"])

    @property
    def k(self) -> int:
        """Latents kept per token."""
        return int(self.manifest["k"])

    @property
    def d_sae(self) -> int:
        return int(self.manifest["sae"]["d_sae"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Each shard's commit record (id, token range, checksums), in row order."""
        return list(self.manifest["shards"])

    @property
    def source(self) -> dict[str, Any]:
        """The source store: store_url, store_manifest_sha256, model, revision."""
        return dict(self.manifest["source"])

    def codes(self, i: int, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(latent ids (n, k) int32, values (n, k) float16) of shard i's rows [start, stop)."""
        from actstore.workers.feature_store import read_codes

        return storage.with_retries(lambda: read_codes(self.fs, self.root, self.shards[i]["id"], start, stop),
                                    f"reading codes of shard {self.shards[i]['id']}")

    def dense(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Shard i's rows [start, stop) as a dense (n, d_sae) float32 code (zeros where a latent is off)."""
        ids, vals = self.codes(i, start, stop)
        out = np.zeros((len(ids), self.d_sae), np.float32)
        rows, cols = np.nonzero(ids >= 0)
        out[rows, ids[rows, cols]] = vals[rows, cols]
        return out

    def shard_tokens(self, i: int, columns: list[str] | None = None) -> pa.Table:
        path = layout.shard_file(self.root, self.shards[i]["id"], layout.TOKENS)
        raw = storage.with_retries(lambda: self.fs.cat_file(path), f"reading {path}")
        return pq.read_table(pa.BufferReader(raw), columns=columns)

    def tokens(self) -> pa.Table:
        """The token index (the source store's), row-aligned with the codes."""
        return pa.concat_tables([self.shard_tokens(i) for i in range(len(self.shards))])

    def docs(self) -> pa.Table:
        with self.fs.open(storage.join(self.root, layout.DOCS), "rb") as f:
            return pq.read_table(f)

    def source_store(self) -> Any:
        """The store the codes were encoded from (opened from its recorded URL)."""
        from actstore.pipeline.store.store import open_store

        return open_store(self.source["store_url"], self.storage_options)


def open_features(url: str, storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a complete feature store at a path or fsspec URL."""
    fs, root = storage.get_fs(str(url), storage_options)
    path = storage.join(root, layout.FEATURES_MANIFEST)
    if not fs.exists(path):
        hint = (" (an encode was interrupted: rerun `actstore encode` to resume)"
                if fs.exists(storage.join(root, layout.ENCODE_RECORD)) else "")
        raise StoreError(f"no feature store at {url!r} ({layout.FEATURES_MANIFEST} not found){hint}")
    raw = storage.read_bytes(fs, path, MAX_FEATURES_MANIFEST)
    try:
        man = json.loads(raw)
    except ValueError as e:
        raise StoreError(f"{url}/{layout.FEATURES_MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise StoreError(f"{url}/{layout.FEATURES_MANIFEST} is not an actstore feature store manifest")
    if int(man.get("format_version", 0)) > FORMAT_VERSION:
        raise StoreError(f"feature store {url!r} has format_version {man['format_version']}; upgrade actstore")
    return FeatureStore(str(url), man, fs, root, storage_options, hashlib.sha256(raw).hexdigest())


def parse_features_ref(ref: str) -> str:
    """'sae:URL' -> URL (the form `train_probe(features=...)` takes)."""
    kind, sep, url = str(ref).partition(":")
    if kind != "sae" or not sep or not url:
        raise ConfigError(f"features: expected sae:URL of a feature store (from `actstore encode`), got {ref!r}")
    return url


# ----------------------------------------------------------------------------------------------- checking


def sae_weights_sha256(sae_dir: str | Path) -> str:
    from actstore.workers.sae.saelens import WEIGHTS_FILE

    return hashlib.sha256((Path(sae_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()


def check_encode_job(store: Any, job: EncodeJob) -> dict[str, Any]:
    """The SAE against the store (hook, model, width), k and the output; returns what the run records."""
    from actstore.pipeline.analysis.directions import sae_metadata

    if not Path(job.sae).is_dir():
        raise ConfigError(f"sae: {job.sae!r} is not a folder (give an SAE directory, e.g. from `actstore train sae`)")
    meta = sae_metadata(job.sae)
    hook = job.hook or meta["hook"]
    if not hook:
        raise ConfigError(f"SAE {job.sae!r} records no hook; give --hook")
    if meta["hook"] and meta["hook"] != hook:
        raise HookNameError(f"SAE {job.sae!r} was trained on {meta['hook']!r}, not {hook!r}; encode the hook it "
                            "was trained on")
    if hook not in store.hooks:
        raise HookNameError(f"SAE {job.sae!r} was trained on {hook!r}, which store {store.url!r} does not hold "
                            f"(hooks: {', '.join(store.hooks)})")
    d = store.manifest.hook(hook).d  # HookNameError when the store lacks it
    if meta["d_in"] is not None and int(meta["d_in"]) != d:
        raise ConfigError(f"SAE {job.sae!r} reads d_in={meta['d_in']} but {hook!r} in this store has width {d}")
    model = store.manifest.model.id if store.manifest.model else None
    if meta["model"] and model and meta["model"] != model:
        raise ConfigError(f"SAE {job.sae!r} was trained on activations of {meta['model']!r}, but store "
                          f"{store.url!r} holds {model!r}")
    k = job.k or (int(meta["k"]) if meta["k"] and meta["architecture"] in ("topk", "topk_transcoder") else 64)
    if k > int(meta["d_sae"]):
        raise ConfigError(f"k: {k} exceeds the SAE's d_sae={meta['d_sae']}")
    record = {"sae": str(job.sae), "sae_weights_sha256": sae_weights_sha256(job.sae), "hook": hook, "k": k,
              "source_manifest_sha256": store.manifest_sha256}
    record["config_hash"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    check_output(job, record["config_hash"])
    return {**record, "meta": meta}


def check_output(job: EncodeJob, config_hash: str) -> None:
    """Refuse an output holding another encode or foreign files (unless overwrite, for another encode)."""
    fs, root = storage.get_fs(job.out, job.storage_options)
    if fs.exists(root) and not fs.isdir(root):
        raise OutputError(f"output {job.out!r} is a file; give a folder or a new path")
    if not fs.exists(root) or not fs.ls(root, detail=False):
        return
    for name in (layout.FEATURES_MANIFEST, layout.ENCODE_RECORD):
        path = storage.join(root, name)
        if fs.exists(path):
            theirs = json.loads(fs.cat_file(path)).get("config_hash")
            if theirs != config_hash and not job.overwrite:
                raise OutputError(f"output {job.out!r} holds a feature store of another SAE, hook, k or source "
                                  "store; use a new output or --overwrite")
            return
    raise OutputError(f"output {job.out!r} is a folder holding other files; give a new or empty folder")


# ----------------------------------------------------------------------------------------------- encoding


def encode_shard(store_url: str, storage_options: dict[str, Any], index: int, sae_dir: str, hook: str, k: int,
                 batch_rows: int, device: str, out: str, threads: int | None = None) -> dict[str, Any]:
    """Encode one source shard and commit it in the feature store (a Dask task; also called in-process)."""
    from actstore.pipeline.store.store import open_store
    from actstore.workers.feature_store import encode_topk, write_codes_shard
    from actstore.workers.sae.saelens import load_saelens
    from actstore.workers.threads import torch_threads

    store = open_store(store_url, storage_options)
    sae = load_saelens(sae_dir, device)
    info = store.manifest.shards[index]
    with torch_threads(threads or None):
        ids, vals = encode_rows(store, index, hook, k, batch_rows, lambda x: encode_topk(sae, x.to(device), k))
    fs, root = storage.get_fs(out, storage_options)
    tokens = store.fs.cat_file(layout.shard_file(store.root, info.id, layout.TOKENS))
    meta = {"token_start": info.token_start, "token_end": info.token_end, "seq_start": info.seq_start,
            "seq_end": info.seq_end}
    return storage.with_retries(lambda: write_codes_shard(fs, root, info.id, tokens, ids, vals, meta),
                                f"writing feature shard {info.id}")


def encode_rows(store: Any, index: int, hook: str, k: int, batch_rows: int, fn: Any) -> tuple[np.ndarray, np.ndarray]:
    """fn over shard `index`'s rows in blocks, the next block read (in a thread) while one encodes."""
    import torch

    n = store.manifest.shards[index].n_tokens
    ids, vals = np.full((n, k), -1, np.int32), np.zeros((n, k), np.float16)
    starts = list(range(0, n, batch_rows))
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(store.read_rows, hook, index, 0, min(batch_rows, n)) if starts else None
        for j, a in enumerate(starts):
            assert nxt is not None
            x = nxt.result()
            if j + 1 < len(starts):
                b = starts[j + 1]
                nxt = pool.submit(store.read_rows, hook, index, b, min(b + batch_rows, n))
            ids[a:a + len(x)], vals[a:a + len(x)] = fn(torch.from_numpy(np.require(x, np.float32, ["C", "W"])))
    return ids, vals


def encode(store: Any, sae: str | Path | None = None, out: str | None = None, hook: str | None = None,
           k: int | None = None, progress: bool = True, **more: Any) -> FeatureStore:
    """Encode a stored hook with an SAE into a feature store at `out`; returns it opened.

    `store` is a Store, a URL or an EncodeJob; `more` takes EncodeJob fields (batch_rows, device, overwrite,
    scheduler, storage_options). Rerunning resumes an interrupted encode."""
    if isinstance(store, EncodeJob):
        return run_encode_job(store, progress=progress)
    url = store if isinstance(store, str) else store.url
    job = EncodeJob.build({"store": url, "sae": str(sae), "out": out, "hook": hook, "k": k, **more})
    return run_encode_job(job, None if isinstance(store, str) else store, progress)


def run_encode_job(job: EncodeJob, store: Any = None, progress: bool = True) -> FeatureStore:
    """Check, then encode every uncommitted shard as Dask tasks, then commit features.json."""
    from actstore.pipeline.store.store import open_store

    store = store if store is not None else open_store(job.store, job.storage_options)
    rec = check_encode_job(store, job)
    fs, root = storage.get_fs(job.out, job.storage_options)
    if fs.exists(storage.join(root, layout.FEATURES_MANIFEST)) and not job.overwrite:
        return open_features(job.out, job.storage_options)  # the same encode is already complete
    if job.overwrite and fs.exists(root):
        fs.rm(root, recursive=True)
    storage.put_atomic(fs, storage.join(root, layout.ENCODE_RECORD),
                       json.dumps({k: v for k, v in rec.items() if k != "meta"}).encode())
    _run_shards(store, job, rec, fs, root, progress)
    return _commit(store, job, rec, fs, root)


def _run_shards(store: Any, job: EncodeJob, rec: dict[str, Any], fs: Any, root: str, progress: bool) -> None:
    import dask
    from tqdm.auto import tqdm

    from actstore.pipeline.analysis.dask_client import dask_client
    from actstore.workers.feature_store import is_committed

    todo = [i for i, s in enumerate(store.manifest.shards) if not is_committed(fs, root, s.id)]
    if not todo:
        return
    with dask_client(job.scheduler) as client, tqdm(total=store.n_tokens, unit="tok", unit_scale=True,
                                                     disable=not progress, desc="encode") as bar:
        bar.update(store.n_tokens - sum(store.manifest.shards[i].n_tokens for i in todo))
        args = (store.url, job.storage_options)
        tail = (str(job.sae), rec["hook"], rec["k"], job.batch_rows, job.device, job.out)
        futures = client.compute([dask.delayed(encode_shard)(*args, i, *tail) for i in todo])
        for i, fut in zip(todo, futures):
            fut.result()
            bar.update(store.manifest.shards[i].n_tokens)


def _commit(store: Any, job: EncodeJob, rec: dict[str, Any], fs: Any, root: str) -> FeatureStore:
    """docs.parquet (copied), then features.json last; the run record is removed."""
    from actstore.pipeline.analysis.results import version
    from actstore.workers.feature_store import read_record

    records = [read_record(fs, root, s.id) for s in store.manifest.shards]
    storage.put_atomic(fs, storage.join(root, layout.DOCS), store.fs.cat_file(storage.join(store.root, layout.DOCS)))
    meta = rec["meta"]
    man = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": version(), "hook": rec["hook"],
           "k": rec["k"], "n_tokens": store.n_tokens, "n_docs": store.manifest.n_docs,
           "dtypes": {layout.LATENT_IDS: "int32", layout.LATENT_VALUES: "float16"},
           "config_hash": rec["config_hash"],
           "source": {"store_url": store.url, "store_manifest_sha256": store.manifest_sha256,
                      "model": store.manifest.model.id if store.manifest.model else None,
                      "revision": store.manifest.model.revision if store.manifest.model else None},
           "sae": {"path": rec["sae"], "weights_sha256": rec["sae_weights_sha256"], "d_in": meta["d_in"],
                   "d_sae": meta["d_sae"], "architecture": meta["architecture"], "k": meta["k"],
                   "hook": meta["hook"]},
           "job": job.public_dict(), "shards": records}
    storage.put_atomic(fs, storage.join(root, layout.FEATURES_MANIFEST), (json.dumps(man, indent=1) + "\n").encode())
    for leftover in (storage.join(root, layout.ENCODE_RECORD), layout.tmp_dir(root)):
        if fs.exists(leftover):
            fs.rm(leftover, recursive=True)
    return open_features(job.out, job.storage_options)


# ------------------------------------------------------------------------------------------------ probes


def pooled_features(fstore: FeatureStore, pooling: str = "mean", exclude_special: bool = True,
                    block_bytes: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(doc ids, (n_docs, d_sae) float32): each document's latent activations pooled like `probes.pooled`,
    streamed in dense blocks of about `block_bytes`."""
    from actstore.workers.probe import PoolAccumulator

    acc = PoolAccumulator(pooling)  # type: ignore[arg-type]
    step = max(1, block_bytes // (4 * fstore.d_sae))
    for i, s in enumerate(fstore.shards):
        tok = fstore.shard_tokens(i, ["doc_id", "special"])
        docs = tok.column("doc_id").to_numpy()
        special = tok.column("special").to_numpy(zero_copy_only=False).astype(bool) if exclude_special else None
        for a in range(0, int(s["n_tokens"]), step):
            b = min(a + step, int(s["n_tokens"]))
            acc.update(fstore.dense(i, a, b), docs[a:b], None if special is None else special[a:b])
    return acc.result()


def feature_store_for(store: Any, ref: str, storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """The feature store `ref` ('sae:URL'), checked to be encoded from `store` (so its doc ids are the store's)."""
    fstore = open_features(parse_features_ref(ref), storage_options)
    if fstore.source.get("store_manifest_sha256") != store.manifest_sha256:
        raise ConfigError(f"feature store {fstore.url!r} was encoded from {fstore.source.get('store_url')!r}, not "
                          f"from {store.url!r} (manifest hashes differ); probe it with its own store")
    return fstore
