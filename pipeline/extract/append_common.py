"""What both append paths (format v1 in `append`, format v2 in `append_parts`) read of the store being grown.

The store's corpora, recorded config and docs rows, the lease an append holds, the check that nobody committed
while it planned, and its progress bar: one place, so the two paths cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from actstore.pipeline.extract.lease import Lease
from actstore.pipeline.store.store import open_store
from actstore.schemas import layout
from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import AppendError
from actstore.schemas.manifest import CorpusPart, Manifest
from actstore.workers import storage

CORPUS_FIELDS = ("corpus", "text_field", "split", "max_docs")
PARTS_HASH_HEADER = "actstore-corpus-parts-v1"


def normalized(key: str, value: Any) -> Any:
    """Comparable form of a content field (JSON types; in-memory corpora by their hash, not their description)."""
    if key == "corpus" and isinstance(value, str) and value.startswith("<in-memory"):
        return "<in-memory>"
    if key == "hooks" and isinstance(value, list):
        return sorted(value)  # order only sets the manifest's hook order, never a stored byte
    return json.loads(json.dumps(value, default=str))


def parts_of(man: Manifest) -> list[CorpusPart]:
    """The store's corpora in row order (a one-corpus store's only part is built from its recorded config)."""
    assert man.corpus is not None and man.extract_config is not None
    if man.corpus.parts:
        return list(man.corpus.parts)
    rec = man.extract_config
    return [CorpusPart(corpus=str(rec.get("corpus")), text_field=rec.get("text_field", "text"),
                       split=rec.get("split", "document"), max_docs=rec.get("max_docs"), sha256=man.corpus.sha256,
                       n_docs=man.corpus.n_docs, doc_start=0, seq_start=0, token_start=0,
                       part_start=0 if man.parts is not None else None)]


def store_config(cfg: ExtractConfig, parts: list[CorpusPart]) -> tuple[dict[str, Any], str]:
    """(recorded config, config hash) of a store made with `cfg` over `parts`.

    One corpus: exactly what extract records. Several: the corpus fields move to the manifest's corpus.parts
    (the recorded `corpus` says so) and the hash covers the list of per-corpus settings and hashes.
    """
    if len(parts) <= 1:
        return cfg.public_dict(), cfg.config_hash()
    public = {k: v for k, v in cfg.public_dict().items() if k not in CORPUS_FIELDS}
    public["corpus"] = f"<{len(parts)} corpora: see corpus.parts>"
    content = {k: v for k, v in cfg.content_dict().items() if k not in CORPUS_FIELDS}
    content["corpus_parts"] = [{**{k: normalized(k, getattr(p, k)) for k in CORPUS_FIELDS}, "sha256": p.sha256}
                               for p in parts]
    return public, hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parts_sha256(parts: list[CorpusPart]) -> str:
    """The hash of a store of several corpora: over the corpora's own hashes, in row order."""
    return hashlib.sha256("\n".join([PARTS_HASH_HEADER, *(p.sha256 for p in parts)]).encode()).hexdigest()


def part_config(cfg: ExtractConfig, part: CorpusPart, index: int) -> ExtractConfig:
    """`cfg` reading corpus `index` of the store again (in-memory lists cannot be read again)."""
    if part.corpus.startswith("<"):
        raise AppendError(f"append: hooks: corpus {index} of this store was an in-memory list, which cannot be read "
                          "again; hooks can be appended only when every corpus after the first is a path or URL")
    return cfg.model_copy(update={k: getattr(part, k) for k in CORPUS_FIELDS})


def append_lease(cfg: ExtractConfig, fs: Any, root: str) -> Lease:
    """The output's lease for this append (one writer at a time)."""
    return Lease(fs, root, cfg.output, stale_after=cfg.lease_stale_after, beat=min(5.0, cfg.lease_stale_after / 3),
                 what=f"extract (append: {cfg.append})")


def check_unchanged(cfg: ExtractConfig, man: Manifest) -> None:
    """Under the lease: the manifest we planned against is still the committed one (no other writer got in)."""
    if open_store(cfg.output, cfg.storage_options).manifest != man:
        raise AppendError(f"append: {cfg.append}: the store at {cfg.output!r} changed while this run was planning "
                          "(another writer); run the append again")


def progress_bar(cfg: ExtractConfig, total: int, done: int) -> tqdm:
    """Tokens appended, starting from those an earlier attempt already committed."""
    return tqdm(total=total, initial=done, unit="tok", unit_scale=True, disable=not cfg.progress,
                desc=f"append {cfg.append}", dynamic_ncols=True)


def store_docs(fs: Any, root: str, man: Manifest) -> pa.Table:
    """The store's own docs.parquet rows, from a backup kept under shards/.tmp/ (removed when the manifest commits)
    before docs.parquet is replaced, so a resumed append starts from the store's rows, not from an earlier
    attempt's rewrite."""
    key = hashlib.sha256(man.to_json()).hexdigest()[:16]
    backup = storage.join(layout.tmp_dir(root), f"docs-{key}.parquet")
    if not fs.exists(backup):
        raw = fs.cat_file(storage.join(root, layout.DOCS))
        storage.put_atomic(fs, backup, raw)
    return pq.read_table(pa.BufferReader(fs.cat_file(backup)))
