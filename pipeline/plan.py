"""Driver-side planning: read the corpus, tokenize it, and cut the sequence stream into shard plans.

Everything here is deterministic in the corpus and config, which is what lets shard ids derive from the input
and a resumed or distributed run reproduce an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from actstore.schemas.config import ExtractConfig
from actstore.workers.corpus import CorpusError, Document, doc_digest, iter_documents
from actstore.workers.tokenize import ShardPlan, SpecialIds, pack, plan_shards, special_ids, tokenize_batch, unpacked

_TOKENIZE_BATCH = 256  # documents per tokenizer call


@dataclass
class Plan:
    """The whole run's input: shard plans, the docs table and the corpus hash."""

    shards: list[ShardPlan]
    docs: pa.Table
    corpus_sha256: str
    special: SpecialIds

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def n_sequences(self) -> int:
        return sum(len(s.sequences) for s in self.shards)


Tokenize = Callable[[Iterable[list[str]], bool, int | None], Iterator[list[list[int]]]]


def make_plan(cfg: ExtractConfig, tokenizer, tokenize: Tokenize | None = None) -> Plan:
    """Tokenize the corpus and plan shards; raises CorpusError for empty or unreadable corpora.

    `tokenize(batches of texts, add_special, max_length)` yields token lists per batch in order; by default the
    batches are tokenized here (the Ray executor passes `ray_tokenize.ray_tokenizer`, which runs them as tasks).
    """
    ids = special_ids(tokenizer)
    docs_rows: list[dict] = []
    h = hashlib.sha256()
    tokenize = tokenize or functools.partial(_in_process, tokenizer)
    token_lists = _tokenized(cfg, tokenize, docs_rows, h)
    seqs = pack(token_lists, cfg.context_length, ids) if cfg.packing else unpacked(token_lists, ids)
    shards = list(plan_shards(seqs, cfg.shard_tokens))
    if not docs_rows:
        raise CorpusError(f"corpus {_describe(cfg.corpus)} holds no documents")
    if not shards:
        raise CorpusError(f"corpus {_describe(cfg.corpus)} has {len(docs_rows)} documents but no tokens "
                          "(all documents are empty)")
    return Plan(shards, _docs_table(docs_rows, shards), h.hexdigest(), ids)


def _in_process(tok, batches: Iterable[list[str]], add_special: bool, max_length: int | None) -> Iterator[list[list[int]]]:
    for texts in batches:
        yield tokenize_batch(tok, texts, add_special, max_length)


def _tokenized(cfg: ExtractConfig, tokenize: Tokenize, rows: list[dict], h) -> Iterator[tuple[int, list[int]]]:
    """(doc_id, token ids) per document, recording each document's row and folding it into the corpus hash."""
    docs = iter(iter_documents(cfg.corpus, cfg.text_field, cfg.split, cfg.storage_options, cfg.max_docs))
    sent: deque[list[Document]] = deque()  # batches handed to `tokenize`, oldest first (results come in order)

    def texts() -> Iterator[list[str]]:
        while batch := list(itertools.islice(docs, _TOKENIZE_BATCH)):
            sent.append(batch)
            yield [d.text for d in batch]

    # With packing, special tokens come from the packer; without, from the tokenizer (truncated to the window).
    for lists in tokenize(texts(), not cfg.packing, None if cfg.packing else cfg.context_length):
        for doc, toks in zip(sent.popleft(), lists):
            doc_id = len(rows)
            doc_digest(h, doc)
            rows.append({"doc_id": doc_id, "source": doc.source, "n_chars": len(doc.text), **doc.meta})
            yield doc_id, toks


def _docs_table(rows: list[dict], shards: list[ShardPlan]) -> pa.Table:
    """docs.parquet: doc_id, source, n_chars, n_tokens (rows stored for the doc) and every metadata field."""
    docs = [seq.doc for shard in shards for seq in shard.sequences]
    counts = np.bincount(np.concatenate(docs), minlength=len(rows)) if docs else np.zeros(len(rows), np.int64)
    for row, n in zip(rows, counts.tolist()):
        row["n_tokens"] = n
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise CorpusError(f"document metadata fields have inconsistent types across documents: {e}") from None


def _describe(corpus) -> str:
    return repr(corpus) if isinstance(corpus, str) else f"<list of {len(corpus)} items>"
