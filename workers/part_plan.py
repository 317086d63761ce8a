"""Plan one corpus part as it is read: documents -> token ids -> sequences -> shard plans, streamed.

`PartPlanner` yields each shard plan as soon as its sequences are complete, so a worker can run the model on the
first shard of a part while the rest of the part is still being read. Once exhausted it holds what the part
contributes to the store besides its shards: its docs rows (docs.parquet), the hash of its documents and its
counts. Everything depends on the part's input alone, so any worker reproduces any part exactly.

The same planner, over the whole corpus as one part with global ids, is the format v1 plan (`sharding.make_plan`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.schemas.errors import CorpusError
from actstore.schemas.generate import GenerateSettings
from actstore.workers.corpus import Document, MetadataTypes, check_generated_fields, doc_digest
from actstore.workers.prompts import prompt_encodings
from actstore.workers.tokenize import (
    Encoded,
    ShardPlan,
    SpecialIds,
    pack,
    plan_shards,
    tokenize_batch,
    unpacked,
    v1_shard_id,
)

log = logging.getLogger("actstore")
TOKENIZE_BATCH = 256  # documents per tokenizer call


class PartPlanner:
    """Iterate to get the part's shard plans in order; afterwards read `docs_table()`, `sha256` and the counts."""

    def __init__(self, docs: Iterable[Document], tok: Any, special: SpecialIds, context_length: int, packing: bool,
                 shard_tokens: int, doc_base: int = 0, seq_base: int = 0, part: int | None = None,
                 name: Callable[[int, int], str] = v1_shard_id, drop_field: str | None = None,
                 generate: GenerateSettings | None = None) -> None:
        self._docs, self.tok, self.special = iter(docs), tok, special
        self.context_length, self.packing, self.shard_tokens = context_length, packing, shard_tokens
        self.doc_base, self.seq_base, self.part, self.name = doc_base, seq_base, part, name
        self.drop_field = drop_field  # span labels of the records: not metadata (hashed, then left out of docs)
        self.generate = generate  # records are prompts: shards budget room for each response
        self._hash = hashlib.sha256()
        self.types = MetadataTypes()
        self.cols: dict[str, list] = {"doc_id": [], "source": [], "n_chars": []}  # docs rows, column by column
        self.n_docs = 0
        self.doc_tokens = np.zeros(0, np.int64)  # stored rows per document of the part
        self.n_sequences = self.n_tokens = self.n_shards = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def __iter__(self) -> Iterator[ShardPlan]:
        docs = self._tokenized()
        seqs = pack(docs, self.context_length, self.special) if self.packing else unpacked(docs, self.special)
        reserve = self.generate.max_new_tokens if self.generate is not None else 0
        for plan in plan_shards(seqs, self.shard_tokens, self.name, self.seq_base, self.part, reserve):
            self._count(plan)
            yield plan

    def _count(self, plan: ShardPlan) -> None:
        local = np.concatenate([s.doc for s in plan.sequences]) - self.doc_base
        counts = np.bincount(local, minlength=len(self.doc_tokens))
        counts[:len(self.doc_tokens)] += self.doc_tokens
        self.doc_tokens = counts
        self.n_sequences += len(plan.sequences)
        self.n_tokens += plan.n_tokens
        self.n_shards += 1

    def _tokenized(self) -> Iterator[tuple[int, Encoded]]:
        """(doc_id, token ids and character spans) per document, recording each document's row and folding it into the hash."""
        # With packing, special tokens come from the packer; without, from the tokenizer (truncated to the window).
        add_special, max_length = not self.packing, None if self.packing else self.context_length
        while batch := list(itertools.islice(self._docs, TOKENIZE_BATCH)):
            texts = [d.text for d in batch]
            lists = (prompt_encodings(self.tok, texts, self.generate, self.context_length) if self.generate
                     else tokenize_batch(self.tok, texts, add_special, max_length))
            for doc, toks in zip(batch, lists):
                if self.generate:
                    check_generated_fields(doc)
                doc_id = self.doc_base + self.n_docs
                doc_digest(self._hash, doc)
                if self.drop_field is not None:
                    doc.meta.pop(self.drop_field, None)
                self.types.observe(doc)
                self._add_row({"doc_id": doc_id, "source": doc.source, "n_chars": len(doc.text), **doc.meta})
                yield doc_id, toks

    def _add_row(self, row: dict[str, Any]) -> None:
        """Append a docs row to the columns (a field first seen now is null for the documents before)."""
        for key, value in row.items():
            col = self.cols.get(key)
            if col is None:
                col = self.cols[key] = [None] * self.n_docs
            col.append(value)
        self.n_docs += 1
        for col in self.cols.values():
            if len(col) < self.n_docs:
                col.append(None)

    def docs_table(self) -> pa.Table:
        """docs rows of the part: doc_id, source, n_chars, metadata fields, n_tokens (call after iterating)."""
        counts = np.zeros(self.n_docs, np.int64)
        counts[:min(len(counts), len(self.doc_tokens))] = self.doc_tokens[:len(counts)]
        return docs_table(self.cols, counts, self.types.conflicts)


def docs_table(cols: dict[str, list], counts: np.ndarray, mixed: dict[str, str]) -> pa.Table:
    """docs.parquet rows: doc_id, source, n_chars, n_tokens (rows stored for the doc), then every metadata field
    in order of first appearance (null where a document lacks it).

    A field whose values have mixed types (e.g. 1 in one record, "1" in another) is stored as strings, with a
    warning naming the field and where the types differ: a field nobody uses must not stop an extraction."""
    if not len(counts):
        return pa.table({})
    data: dict[str, Any] = {"doc_id": cols["doc_id"], "source": cols["source"], "n_chars": cols["n_chars"],
                            "n_tokens": counts}
    data.update({k: v for k, v in cols.items() if k not in data})
    for key, where in mixed.items():
        log.warning("metadata field %r has mixed types (%s); it is stored as strings", key, where)
        data[key] = [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in data[key]]
    try:
        return pa.Table.from_pydict(data)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise CorpusError(f"document metadata fields have inconsistent types across documents: {e}") from None
