"""The output location's state: refuse to overwrite what is not ours, detect config/corpus changes on resume.

A run writes `extract.json` (its config hash, corpus hash and public config) before any shard; the final
`manifest.json` is written last. Between the two, the output is an interrupted run that the same config can
resume. An interrupted run that committed no shard holds nothing worth keeping, so a rerun with another
(fixed) config starts over there. `overwrite` replaces a complete store or an interrupted run explicitly.
Anything else in a non-empty output is refused, with or without `overwrite`: nothing a user wrote is
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from actstore.schemas import layout
from actstore.schemas.errors import OutputError
from actstore.schemas.manifest import parse_manifest
from actstore.workers import storage

log = logging.getLogger("actstore")


@dataclass
class OutputState:
    complete: bool  # a manifest for this very config and corpus exists
    resuming: bool  # an interrupted run of this config is there
    replace: bool = False  # what is there is ours and is to be cleared before this run writes


def _ours(name: str) -> bool:
    """A name an actstore writer puts in a store root (atomic writes leave `<name>.tmp-<uuid>` for a moment)."""
    return name in layout.ROOT_NAMES or any(name.startswith(f"{n}.tmp-") for n in layout.ROOT_NAMES)


RUN_FORMAT = 2  # run records of format v2 runs say so; a v1 run (no "format") cannot be resumed by v2 planning


def check_output(fs, root: str, url: str, config_hash: str, corpus_sha256: str | None = None,
                 overwrite: bool = False, fingerprints: list[str] | None = None,
                 v1_corpus: Callable[[], str] | None = None) -> OutputState:
    """Inspect the output before any work; raise OutputError when it holds something else.

    A format v2 run passes its parts' `fingerprints` (a complete v2 store must list the same parts) and
    `v1_corpus` (the corpus hash as format v1 computed it, called only when the output holds a complete v1
    store of this config); others pass `corpus_sha256`."""
    if not fs.exists(root):
        return OutputState(False, False)
    if not fs.isdir(root):
        raise OutputError(f"output {url!r} is a file, not a directory; choose another output")
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    foreign = sorted(n for n in names if not _ours(n))
    if foreign:
        raise OutputError(f"output {url!r} is not empty and is not an actstore store (found {foreign[0]!r}); "
                          "choose an empty or new output (--overwrite only replaces actstore stores)")
    if not names - {layout.LEASE}:
        return OutputState(False, False)
    if layout.MANIFEST in names:
        if overwrite:
            return OutputState(False, False, replace=True)
        man = parse_manifest(fs.cat_file(storage.join(root, layout.MANIFEST)), f"{url}/{layout.MANIFEST}")
        old, new = (man.corpus.sha256 if man.corpus else None), corpus_sha256
        if fingerprints is not None and man.parts is not None:  # v2: compare the listings, nothing is read
            old, new = _listing([p.fingerprint for p in man.parts]), _listing(fingerprints)
        elif fingerprints is not None and man.config_hash == config_hash and v1_corpus is not None:
            new = v1_corpus()  # a v1 store of this config: hash the corpus as v1 did (read, not tokenized)
        _same(man.config_hash, old, config_hash, new, url, "store")
        return OutputState(True, False)
    return _interrupted(fs, root, url, config_hash, corpus_sha256, overwrite, names, fingerprints is not None)


def _listing(fingerprints: list[str]) -> str:
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


def _interrupted(fs, root: str, url: str, config_hash: str, corpus_sha256: str | None, overwrite: bool,
                 names: set[str], streaming: bool = False) -> OutputState:
    """An interrupted run is resumed by its own config, and replaced when asked or when it committed nothing.

    A streaming (v2) run checks its corpus part by part (`part_records.committed_parts`): parts not committed yet
    may have changed (e.g. a bad line fixed), committed ones may not."""
    committed = count_committed(fs, root)
    if overwrite or committed == 0:
        if committed == 0 and not overwrite and layout.RUN_RECORD in names:
            log.warning("output %s holds an interrupted run that committed no shard: starting over", url)
        return OutputState(False, False, replace=True)
    if layout.RUN_RECORD in names:
        rec = json.loads(fs.cat_file(storage.join(root, layout.RUN_RECORD)))
        what = f"interrupted run ({committed} committed shards)"
        if streaming and rec.get("format") != RUN_FORMAT:
            raise OutputError(f"output {url!r} holds an {what} of an older actstore (store format 1), which this "
                              "version cannot resume; finish it with that version, or start over with --overwrite")
        _same(rec.get("config_hash"), None if streaming else rec.get("corpus_sha256"), config_hash, corpus_sha256,
              url, what)
    return OutputState(False, True)  # shards without a run record: our debris, resumable shard by shard


def count_committed(fs, root: str) -> int:
    """Shards of an output that hold their commit record."""
    pattern = storage.join(layout.shard_dir(root, "*"), layout.SHARD_RECORD)
    return len(fs.glob(pattern)) if fs.exists(storage.join(root, layout.SHARDS)) else 0


def _same(old_cfg, old_corpus, cfg_hash, corpus_hash, url: str, what: str) -> None:
    hint = "use a new output, the original config, or --overwrite (overwrite: true) to replace it"
    if old_cfg != cfg_hash:
        raise OutputError(f"output {url!r} holds a {what} made with a different config (config hash "
                          f"{str(old_cfg)[:12]} != {cfg_hash[:12]}); {hint}")
    if corpus_hash is not None and old_corpus is not None and old_corpus != corpus_hash:
        raise OutputError(f"output {url!r} holds a {what} made from a different corpus (content hash "
                          f"{str(old_corpus)[:12]} != {corpus_hash[:12]}): the corpus changed; {hint}")


def clear_output(fs, root: str, url: str) -> None:
    """Remove an actstore store or interrupted run (everything but the lease this run holds)."""
    log.warning("replacing the actstore store or interrupted run at %s", url)
    for path in fs.ls(root, detail=False):
        if path.rstrip("/").rsplit("/", 1)[-1] != layout.LEASE:
            fs.rm(path, recursive=True)


def write_run_record(fs, root: str, config_hash: str, corpus_sha256: str | None, public_config: dict,
                     streaming: bool = False) -> None:
    """extract.json: the run's config (and, for v1 planning, corpus) hash; a streaming run marks its format."""
    rec: dict = {"config_hash": config_hash, "corpus_sha256": corpus_sha256, "config": public_config}
    if streaming:
        rec["format"] = RUN_FORMAT
    fs.makedirs(root, exist_ok=True)
    storage.put_atomic(fs, storage.join(root, layout.RUN_RECORD), json.dumps(rec, indent=1, default=str).encode())
