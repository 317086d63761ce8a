"""`append: hooks | tokens` on format v2 stores: grow a store part by part (see `append` for the rules).

append: hooks -- every corpus of the store is listed again; its parts must have the fingerprints the manifest
records. Each part is re-read where it is processed and each planned shard is checked against the store's record
of it (id, sequence range, rows, tokens.parquet SHA-256) before its forward pass; shards that already hold this
append's record are skipped. The driver passes each part its expected shard records and keeps nothing else.

append: tokens -- the new corpus' parts are numbered after the store's last part, so its documents, sequences and
shards get new ids (`part << 32 | n`). Its parts run like an extract's (committed parts and shards of an
interrupted attempt are kept; those of another, different attempt are dropped), then the store is committed from
the new parts' records: shard rows continue after the store's, docs.parquet is the store's rows followed by the
new parts' docs files, and statistics are merged in the store's order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from actstore.pipeline.extract.append_common import (
    append_lease,
    check_unchanged,
    part_config,
    parts_of,
    parts_sha256,
    progress_bar,
    store_config,
    store_docs,
)
from actstore.pipeline.extract.commit import commit_manifest, global_shards, kind_of, store_stats, write_stats
from actstore.pipeline.extract.executors import run_parts, session
from actstore.pipeline.extract.part_records import (
    PartTracker,
    combine_docs,
    committed_parts,
    drop_part_shards,
    part_info,
    read_part,
)
from actstore.schemas import layout
from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import AppendError, OutputError
from actstore.schemas.manifest import CorpusInfo, CorpusPart, Manifest
from actstore.workers.part_task import PartJob
from actstore.workers.parts import CorpusSpec, Part, list_parts
from actstore.workers.tokenize import special_ids

log = logging.getLogger("actstore")


def _corpora(cfg: ExtractConfig, man: Manifest) -> list[tuple[ExtractConfig, CorpusPart, list[Part]]]:
    """Each corpus of the store with its config and its parts, listed again and checked against the manifest."""

    out, recorded = [], {p.index: p for p in man.parts or []}
    corpora = parts_of(man)
    for i, corpus in enumerate(corpora):
        ccfg = cfg if i == 0 else part_config(cfg, corpus, i)
        parts = list_parts(CorpusSpec.of(ccfg), corpus.part_start or 0)
        end = corpora[i + 1].part_start if i + 1 < len(corpora) else len(man.parts or [])
        if [p.index for p in parts] != list(range(corpus.part_start or 0, end or 0)) or any(
                recorded[p.index].fingerprint != p.fingerprint() for p in parts):
            raise AppendError(f"append: hooks: corpus {i} of the store ({corpus.corpus}) is not what the store was "
                              "made from (its files, sizes or parts differ); give the corpus the store was made from")
        out.append((ccfg, corpus, parts))
    return out


def append_hooks_v2(cfg: ExtractConfig, man: Manifest, tok: Any, tag: str, fs: Any, root: str,
                    finish: Callable[[], Any]) -> None:
    """Add `cfg.hooks` to every shard of a v2 store (each shard checked before its forward pass), then call
    `finish` (the manifest commit) still under the lease."""

    corpora = _corpora(cfg, man)
    expected: dict[int, list[dict]] = {}
    for s in man.shards:
        expected.setdefault(int(s.part or 0), []).append(
            {"id": s.id, "seq_start": s.seq_start, "seq_end": s.seq_end, "n_tokens": s.n_tokens,
             "tokens_sha256": s.tokens_sha256})
    pad = special_ids(tok).pad
    with append_lease(cfg, fs, root):
        check_unchanged(cfg, man)
        with session(cfg), progress_bar(cfg, man.n_tokens, 0) as bar:  # the bar closes before a failure is reported
            for ccfg, _, parts in corpora:
                tracker = PartTracker(fs, root, parts, list(cfg.hooks), bar.update, commit_parts=False)
                run_parts(ccfg, parts, PartJob.of(ccfg, append_tag=tag), pad, fs, root, tracker.add,
                          {p.index: expected.get(p.index, []) for p in parts})
        finish()


def append_tokens_v2(cfg: ExtractConfig, man: Manifest, tok: Any, fs: Any, root: str) -> Manifest:
    """Add a new corpus to a v2 store as new parts after the store's; returns the committed manifest."""

    first = len(man.parts or [])
    parts = list_parts(CorpusSpec.of(cfg), first)
    known = [p.fingerprint for p in man.parts or []]
    for i, corpus in enumerate(parts_of(man)):
        start = corpus.part_start or 0
        if [p.fingerprint() for p in parts] == known[start:start + len(parts)]:
            raise AppendError(f"append: tokens: this corpus is already in the store at {cfg.output!r} (corpus {i}, "
                              f"{corpus.corpus}); nothing to append")
    with append_lease(cfg, fs, root):
        check_unchanged(cfg, man)
        head = store_docs(fs, root, man)  # kept before docs.parquet is replaced (a resumed append needs it)
        _drop_stale_parts(fs, root, parts)
        done = committed_parts(fs, root, parts)
        todo = [p for p in parts if p.index not in done]
        with session(cfg), tqdm(unit="tok", unit_scale=True, disable=not cfg.progress, desc="append tokens",
                                dynamic_ncols=True) as bar:
            tracker = PartTracker(fs, root, todo, [h.name for h in man.hooks], bar.update)
            run_parts(cfg, todo, PartJob.of(cfg), special_ids(tok).pad, fs, root, tracker.add)
        return _commit_tokens(cfg, man, parts, head, fs, root, parts_of(man), store_config, parts_sha256)


def _drop_stale_parts(fs: Any, root: str, parts: list[Part]) -> None:
    """Parts at the new indices that an earlier, different append committed: their records and shards go."""
    for p in parts:
        rec = read_part(fs, root, p.index)
        if rec is not None and rec.get("fingerprint") != p.fingerprint():
            log.info("dropping corpus part %d left by an earlier, different append", p.index)
            fs.rm(layout.part_file(root, p.index, layout.PART_RECORD))
            drop_part_shards(fs, root, p.index)


def _commit_tokens(cfg: ExtractConfig, man: Manifest, parts: list[Part], head: Any, fs: Any, root: str,
                   corpora: list[CorpusPart], store_config: Any, parts_sha256: Any) -> Manifest:
    records = [read_part(fs, root, p.index) for p in parts]
    if any(r is None for r in records):
        raise OutputError("append: tokens: a corpus part has no commit record; run the append again")
    new = global_shards(records, man.n_tokens)
    if not new:
        raise AppendError("append: tokens: the new corpus has no tokens (all its documents are empty)")
    n_new_docs = sum(r["n_docs"] for r in records)
    part = CorpusPart(**{k: getattr(cfg, k) for k in ("text_field", "split", "max_docs")},
                      corpus=str(cfg.public_dict()["corpus"]), sha256=_hash(records), n_docs=n_new_docs,
                      doc_start=man.n_docs, seq_start=man.n_sequences, token_start=man.n_tokens,
                      part_start=parts[0].index)
    all_corpora = [*corpora, part]
    shards, hooks = [*man.shards, *new], [h.name for h in man.hooks]
    stats = store_stats(fs, root, shards, hooks)
    combine_docs(fs, root, [p.index for p in parts], head=head)
    write_stats(fs, root, stats, atomic=True)
    recorded, config_hash = store_config(cfg.model_copy(update={"append": None}), all_corpora)
    n_docs = man.n_docs + n_new_docs
    manifest = Manifest.model_validate({
        **man.model_dump(), "config_hash": config_hash, "extract_config": recorded, "shards": shards,
        "n_tokens": new[-1].token_end, "n_sequences": man.n_sequences + sum(r["n_sequences"] for r in records),
        "n_docs": n_docs, "corpus": CorpusInfo(sha256=parts_sha256(all_corpora), n_docs=n_docs, parts=all_corpora),
        "parts": [*(man.parts or []), *(part_info(r) for r in records)],
        "stats": {h: stats[h].summary(kind_of(h)) for h in hooks},
    })
    commit_manifest(fs, root, manifest)
    return manifest


def _hash(records: list[dict]) -> str:
    from actstore.pipeline.extract.sharding import corpus_sha256

    return corpus_sha256([r["sha256"] for r in records])
