"""`actstore.extract`: validate everything cheap first, then stream the corpus' parts through an executor.

Order matters: config grammar, model config (hook layers, context limit), output state, the corpus listing and
its first document are all checked before anything is written or any model weight is loaded, so bad input costs
seconds and leaves no trace. The corpus is never read or tokenized as a whole by the driver: its parts (listed
from metadata) are read, planned and run where they are processed (`workers.part_task`); the driver keeps
per-part bookkeeping (`part_records.PartTracker`) and commits the store from the parts' records.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from actstore.pipeline.extract.commit import finalize_parts
from actstore.pipeline.extract.executors import run_parts, session
from actstore.pipeline.extract.lease import Lease
from actstore.pipeline.extract.part_records import PartTracker, committed_parts, drop_part_shards, failed_part
from actstore.pipeline.extract.preflight import preflight
from actstore.pipeline.extract.record_spans import read_record_spans
from actstore.pipeline.extract.run_record import check_output, clear_output, count_committed, write_run_record
from actstore.pipeline.store.store import Store, open_store
from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import CorpusError
from actstore.workers import storage
from actstore.workers.corpus import doc_digest, iter_documents
from actstore.workers.part_task import PartJob
from actstore.workers.parts import CorpusSpec, Part, list_parts, read_part
from actstore.workers.tokenize import special_ids

log = logging.getLogger("actstore")


def extract(config: ExtractConfig | dict | str | Path, overrides: list[str] | None = None) -> Store:
    """Run an extraction and return the finished, committed Store.

    `config` is an `ExtractConfig`, a dict of its keys or the path of a YAML file with them (`actstore extract
    --help-config` lists every key); `overrides` are `key=value` strings applied on top (YAML-typed; dotted keys
    reach nested settings). Everything cheap is checked before any weight is loaded or byte written; a rerun of
    an interrupted run resumes it, and a rerun of a finished one returns its store.

    Raises ConfigError (bad keys, values, hooks, context length), ModelLoadError (no model, config or tokenizer),
    CorpusError (unreadable or empty corpus), OutputError (the output holds something else; a different config's
    store without `overwrite`), LeaseError (another writer holds the output), StorageError (storage failed for
    good), Float16OverflowError (values beyond float16 with `on_overflow: error`).
    """
    cfg = ExtractConfig.build(config, overrides)
    if cfg.append is not None:  # grow an existing store instead
        from actstore.pipeline.extract.append import append

        return append(cfg)
    fs, root = storage.get_fs(cfg.output, cfg.storage_options)
    lease = Lease(fs, root, cfg.output, stale_after=cfg.lease_stale_after, beat=min(5.0, cfg.lease_stale_after / 3))
    lease.check_free()  # a second writer always gets the lease error, whatever state the first one is in
    model_cfg, tok = preflight(cfg, fs, root)
    spec = CorpusSpec.of(cfg)
    parts = list_parts(spec)  # metadata only
    probe(parts, spec)  # the first document, so a wrong text_field or encoding fails here
    if _state(cfg, fs, root, parts).complete:
        log.info("output %s already holds this store; nothing to do", cfg.output)
        return open_store(cfg.output, cfg.storage_options)
    # span labels of the records: read and checked before anything is written
    spans = read_record_spans(cfg.span_field, parts, spec, tok) if cfg.span_field else None
    existed = fs.exists(root)
    try:
        with lease:
            _run(cfg, model_cfg, tok, fs, root, parts, spans)
    except CorpusError:
        if not existed and count_committed(fs, root) == 0:
            _remove_empty_output(fs, root)  # bad input leaves no trace
        raise
    return open_store(cfg.output, cfg.storage_options)


def _state(cfg: ExtractConfig, fs: Any, root: str, parts: list[Part]) -> Any:
    return check_output(fs, root, cfg.output, cfg.config_hash(), overwrite=cfg.overwrite,
                        fingerprints=[p.fingerprint() for p in parts], v1_corpus=lambda: v1_corpus_sha256(cfg))


def _run(cfg: ExtractConfig, model_cfg: Any, tok: Any, fs: Any, root: str, parts: list[Part],
         spans: list | None = None) -> None:
    # Decided again under the lease: another writer may have finished (or cleared) the output meanwhile.
    state = _state(cfg, fs, root, parts)
    if state.complete:
        return
    if state.replace:
        clear_output(fs, root, cfg.output)
    write_run_record(fs, root, cfg.config_hash(), None, cfg.public_dict(), streaming=True)
    done = committed_parts(fs, root, parts)
    todo = [p for p in parts if p.index not in done]
    n_shards = count_committed(fs, root)
    if n_shards or done:
        say(cfg, f"resuming: {n_shards} shards already committed ({len(done)} of {len(parts)} corpus parts complete)")
    special = special_ids(tok)
    # The session encloses the bar: on a failure the bar is closed before the session names Ray's logs.
    try:
        with session(cfg), tqdm(unit="tok", unit_scale=True, disable=not cfg.progress, desc="extract",
                                dynamic_ncols=True) as bar:
            tracker = PartTracker(fs, root, todo, list(cfg.hooks), bar.update)
            run_parts(cfg, todo, PartJob.of(cfg), special.pad, fs, root, tracker.add)
    except CorpusError as e:
        bad = failed_part(e)
        if bad is not None and drop_part_shards(fs, root, bad):
            log.info("removed the shards corpus part %d committed before it failed", bad)
        raise
    if tracker.nodes:
        log.info("shards run per Ray node: %s", tracker.nodes)
    finalize_parts(cfg, [p.index for p in parts], model_cfg, tok, special, fs, root, spans)


def probe(parts: list[Part], spec: CorpusSpec) -> None:
    """Read the corpus' first document (and nothing more), raising its CorpusError if it is bad."""
    for part in parts:
        for _ in read_part(part, spec):
            return


def v1_corpus_sha256(cfg: ExtractConfig) -> str:
    """The corpus hash a format v1 store records (documents read, not tokenized)."""
    import hashlib

    h = hashlib.sha256()
    for doc in iter_documents(cfg.corpus, cfg.text_field, cfg.split, cfg.storage_options, cfg.max_docs,
                              cfg.extensions):
        doc_digest(h, doc)
    return h.hexdigest()


def _remove_empty_output(fs: Any, root: str) -> None:
    """Drop what a run that committed nothing wrote into an output it created (its lease is already gone)."""
    if fs.exists(root):
        for path in fs.ls(root, detail=False):
            fs.rm(path, recursive=True)
        fs.rm(root, recursive=True)


def say(cfg: ExtractConfig, text: str) -> None:
    """A line for the person watching the progress bar (logged instead when progress is off)."""
    if cfg.progress:
        tqdm.write(f"actstore: {text}", file=sys.stderr)
    else:
        log.info(text)
