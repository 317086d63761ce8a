"""Tokenization into sequences (packed windows or one document per sequence) and their grouping into shards.

Packing (`packing: true`): documents are tokenized without special tokens and joined into one stream with the
separator (EOS, or SEP for BERT-style tokenizers) after each document; every window starts with BOS (or CLS, or
EOS when the tokenizer has neither) followed by context_length - 1 stream tokens. The last window may be shorter:
no token is dropped and padding is never stored. A separator belongs to the document it ends; a window's BOS to
the document of the token after it.

No packing: each document is tokenized with the tokenizer's own special tokens, truncated to context_length.

Shards take consecutive sequences until the next one would exceed `shard_tokens`; their ids are the index of
their first sequence, so they derive from the input only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    sep: int
    pad: int
    special: frozenset[int]


@dataclass
class Sequence:
    ids: np.ndarray  # int32 token ids
    doc: np.ndarray  # int64 doc id per token
    special: np.ndarray  # bool per token


@dataclass
class ShardPlan:
    """One shard's input: the unit of work, commit and resume."""

    shard_id: str
    seq_start: int
    token_start: int
    sequences: list[Sequence]

    @property
    def n_tokens(self) -> int:
        return sum(len(s.ids) for s in self.sequences)

    def tokens_table(self) -> pa.Table:
        """The shard's token index rows (same order as its activation rows)."""
        lens = [len(s.ids) for s in self.sequences]
        seq = np.repeat(np.arange(self.seq_start, self.seq_start + len(lens), dtype=np.int64), lens)
        pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens]) if lens else np.zeros(0, np.int32)
        cat = (lambda k, dt: np.concatenate([getattr(s, k) for s in self.sequences]).astype(dt)) if lens else (
            lambda k, dt: np.zeros(0, dt))
        return pa.table({
            "token_id": pa.array(cat("ids", np.int32)), "doc_id": pa.array(cat("doc", np.int64)),
            "seq_id": pa.array(seq), "position": pa.array(pos), "special": pa.array(cat("special", np.bool_)),
        })


def special_ids(tok) -> SpecialIds:
    """BOS/separator/pad ids of a tokenizer, with the fallbacks used by GPT-2 (EOS) and BERT (CLS/SEP)."""
    eos, bos = tok.eos_token_id, tok.bos_token_id
    cls_, sep_ = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    start = bos if bos is not None else cls_ if cls_ is not None else eos
    sep = sep_ if sep_ is not None and cls_ is not None else eos if eos is not None else sep_
    if start is None or sep is None:
        raise ValueError("tokenizer has no BOS/CLS/EOS/SEP token, so documents cannot be packed; use packing: false")
    pad = tok.pad_token_id if tok.pad_token_id is not None else sep
    return SpecialIds(int(start), int(sep), int(pad), frozenset(int(i) for i in tok.all_special_ids))


def tokenize_batch(tok, texts: list[str], add_special: bool, max_length: int | None = None) -> list[list[int]]:
    """Token ids for a batch of texts (fast tokenizers run the batch in Rust)."""
    kw = {"truncation": True, "max_length": max_length} if max_length else {}
    return tok(texts, add_special_tokens=add_special, verbose=False, **kw)["input_ids"]


def pack(docs: Iterable[tuple[int, list[int]]], context_length: int, ids: SpecialIds) -> Iterator[Sequence]:
    """Packed windows over (doc_id, token ids) pairs; see the module docstring for the rules."""
    body = context_length - 1
    buf_ids: list[int] = []
    buf_doc: list[int] = []
    for doc_id, toks in docs:
        if not toks:
            continue  # an empty document contributes nothing (not even a separator)
        buf_ids.extend(toks)
        buf_ids.append(ids.sep)
        buf_doc.extend([doc_id] * (len(toks) + 1))
        while len(buf_ids) >= body:
            yield _window(buf_ids[:body], buf_doc[:body], ids)
            del buf_ids[:body], buf_doc[:body]
    if buf_ids:
        yield _window(buf_ids, buf_doc, ids)


def _window(toks: list[int], docs: list[int], ids: SpecialIds) -> Sequence:
    arr = np.array([ids.bos, *toks], dtype=np.int32)
    doc = np.array([docs[0], *docs], dtype=np.int64)
    return Sequence(arr, doc, np.isin(arr, list(ids.special)) | (np.arange(len(arr)) == 0))


def unpacked(docs: Iterable[tuple[int, list[int]]], ids: SpecialIds) -> Iterator[Sequence]:
    """One sequence per non-empty (already truncated, special-token-wrapped) document."""
    for doc_id, toks in docs:
        if toks:
            arr = np.array(toks, dtype=np.int32)
            yield Sequence(arr, np.full(len(arr), doc_id, np.int64), np.isin(arr, list(ids.special)))


def plan_shards(sequences: Iterable[Sequence], shard_tokens: int) -> Iterator[ShardPlan]:
    """Group consecutive sequences into shards of at most shard_tokens rows (ids from the first sequence)."""
    cur: list[Sequence] = []
    n_tok = seq_start = tok_start = seq_idx = 0
    for seq in sequences:
        if cur and n_tok + len(seq.ids) > shard_tokens:
            yield ShardPlan(f"{seq_start:09d}", seq_start, tok_start, cur)
            tok_start += n_tok
            cur, n_tok, seq_start = [], 0, seq_idx
        cur.append(seq)
        n_tok += len(seq.ids)
        seq_idx += 1
    if cur:
        yield ShardPlan(f"{seq_start:09d}", seq_start, tok_start, cur)
