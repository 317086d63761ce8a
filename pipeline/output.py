"""The output location's state: refuse to overwrite what is not ours, detect config/corpus changes on resume.

A run writes `extract.json` (its config hash, corpus hash and public config) before any shard; the final
`manifest.json` is written last. Between the two, the output is an interrupted run that the same config can
resume. Anything else in a non-empty output is refused: nothing a user wrote is overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from actstore.schemas.manifest import parse_manifest
from actstore.workers import storage

RUN_RECORD = "extract.json"
MANIFEST = "manifest.json"
OURS = {RUN_RECORD, MANIFEST, "shards", "docs.parquet", "stats", "lease.json"}


class OutputError(ValueError):
    """The output location cannot be used for this run; the message says why and what to do."""


@dataclass
class OutputState:
    complete: bool  # a manifest for this very config and corpus exists
    resuming: bool  # an interrupted run of this config is there


def check_output(fs, root: str, url: str, config_hash: str, corpus_sha256: str | None = None) -> OutputState:
    """Inspect the output before any work; raise OutputError when it holds something else."""
    if not fs.exists(root):
        return OutputState(False, False)
    if not fs.isdir(root):
        raise OutputError(f"output {url!r} is a file, not a directory; choose another output")
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    if not names:
        return OutputState(False, False)
    foreign = sorted(names - OURS)
    if foreign:
        raise OutputError(f"output {url!r} is not empty and is not an actstore store (found {foreign[0]!r}); "
                          "choose an empty or new output")
    if MANIFEST in names:
        man = parse_manifest(fs.cat_file(storage.join(root, MANIFEST)), f"{url}/{MANIFEST}")
        _same(man.config_hash, man.corpus.sha256 if man.corpus else None, config_hash, corpus_sha256, url, "store")
        return OutputState(True, False)
    if RUN_RECORD in names:
        rec = json.loads(fs.cat_file(storage.join(root, RUN_RECORD)))
        _same(rec.get("config_hash"), rec.get("corpus_sha256"), config_hash, corpus_sha256, url, "interrupted run")
        return OutputState(False, True)
    return OutputState(False, True)  # shards without a run record: our debris, resumable shard by shard


def _same(old_cfg, old_corpus, cfg_hash, corpus_hash, url: str, what: str) -> None:
    if old_cfg != cfg_hash:
        raise OutputError(f"output {url!r} holds a {what} made with a different config (config hash "
                          f"{str(old_cfg)[:12]} != {cfg_hash[:12]}); use a new output or the original config")
    if corpus_hash is not None and old_corpus is not None and old_corpus != corpus_hash:
        raise OutputError(f"output {url!r} holds a {what} made from a different corpus (content hash "
                          f"{str(old_corpus)[:12]} != {corpus_hash[:12]}): the corpus changed; use a new output")


def write_run_record(fs, root: str, config_hash: str, corpus_sha256: str, public_config: dict) -> None:
    rec = {"config_hash": config_hash, "corpus_sha256": corpus_sha256, "config": public_config}
    fs.makedirs(root, exist_ok=True)
    storage.put_atomic(fs, storage.join(root, RUN_RECORD), json.dumps(rec, indent=1, default=str).encode())
