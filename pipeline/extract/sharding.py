"""Whole-corpus plans made in one process: format v1 planning, and the v2 plan `actstore plan` estimates from.

Extraction itself never plans the whole corpus up front (format v2 streams parts through `workers.part_task`).
Two callers still need every shard plan at once: growing a format v1 store (`append` plans the corpus exactly as
v1 did: one stream over the whole corpus, global ids, shard ids = first sequence), and the estimate of
`actstore plan`, which sizes every file a run would write. Both use the same planner as the run
(`workers.part_plan.PartPlanner`), so the plans are exactly the run's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from actstore.schemas.config import ExtractConfig
from actstore.workers.corpus import CorpusError, iter_documents
from actstore.workers.part_plan import PartPlanner
from actstore.workers.part_task import PartJob, part_planner
from actstore.workers.parts import CorpusSpec, list_parts
from actstore.workers.tokenize import ShardPlan, SpecialIds, special_ids

CORPUS_HASH_HEADER = "actstore-corpus-v2"


@dataclass
class Plan:
    """A whole run's input: shard plans, the docs table and the corpus hash (v2: plus one summary per part)."""

    shards: list[ShardPlan]
    docs: pa.Table
    corpus_sha256: str
    special: SpecialIds
    parts: list[dict[str, Any]] = field(default_factory=list)  # v2: part record fields (source, counts, ...)
    docs_pieces: list[pa.Table] = field(default_factory=list)  # v2: each part's docs rows, as the run writes them

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def n_sequences(self) -> int:
        return sum(len(s.sequences) for s in self.shards)


def corpus_sha256(part_hashes: list[str]) -> str:
    """A v2 store's corpus hash: SHA-256 of a header line and one line per part hash, in part order."""
    return hashlib.sha256("\n".join([CORPUS_HASH_HEADER, *part_hashes]).encode()).hexdigest()


def make_plan_v1(cfg: ExtractConfig, tokenizer: Any) -> Plan:
    """The format v1 plan: the corpus as one stream (doc and sequence ids from 0, shard id = first sequence)."""
    ids = special_ids(tokenizer)
    docs = iter_documents(cfg.corpus, cfg.text_field, cfg.split, cfg.storage_options, cfg.max_docs, cfg.extensions)
    planner = PartPlanner(docs, tokenizer, ids, cfg.context_length, cfg.packing, cfg.shard_tokens)
    shards = list(planner)
    _check_nonempty(cfg, planner.n_docs, shards)
    return Plan(shards, planner.docs_table(), planner.sha256, ids)


def make_plan(cfg: ExtractConfig, tokenizer: Any, first_part: int = 0) -> Plan:
    """The format v2 plan of the whole corpus, made in this process (what a run streams, part by part)."""
    from actstore.pipeline.extract.part_records import conform, unified_schema

    ids = special_ids(tokenizer)
    job = PartJob.of(cfg)
    shards: list[ShardPlan] = []
    pieces, parts = [], []
    for part in list_parts(CorpusSpec.of(cfg), first_part):
        planner = part_planner(part, job, tokenizer, ids)
        shards += list(planner)
        pieces.append(planner.docs_table())
        parts.append({"index": part.index, "source": part.describe(), "fingerprint": part.fingerprint(),
                      "sha256": planner.sha256, "n_docs": planner.n_docs, "n_sequences": planner.n_sequences,
                      "n_tokens": planner.n_tokens, "n_shards": planner.n_shards})
    n_docs = sum(p["n_docs"] for p in parts)
    _check_nonempty(cfg, n_docs, shards)
    schema, mixed = unified_schema(t.schema for t in pieces if t.num_rows)
    docs = pa.concat_tables([conform(t, schema, mixed) for t in pieces if t.num_rows])
    return Plan(shards, docs, corpus_sha256([p["sha256"] for p in parts]), ids, parts, pieces)


def _check_nonempty(cfg: ExtractConfig, n_docs: int, shards: list[ShardPlan]) -> None:
    if not n_docs:
        raise CorpusError(f"corpus {describe(cfg.corpus)} holds no documents")
    if not shards:
        raise CorpusError(f"corpus {describe(cfg.corpus)} has {n_docs} documents but no tokens "
                          "(all documents are empty)")


def describe(corpus: Any) -> str:
    return repr(corpus) if isinstance(corpus, str) else f"<list of {len(corpus)} items>"
