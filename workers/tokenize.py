"""Tokenization into sequences (packed windows or one document per sequence) and their grouping into shards.

Packing (`packing: true`): documents are tokenized without special tokens and joined into one stream with the
separator (EOS, or SEP for BERT-style tokenizers) after each document; every window starts with BOS (or CLS, or
EOS when the tokenizer has neither) followed by context_length - 1 stream tokens. The last window may be shorter:
no token is dropped and padding is never stored. A separator belongs to the document it ends; a window's BOS to
the document of the token after it.

No packing: each document is tokenized with the tokenizer's own special tokens, truncated to context_length.

Character spans: every token carries the [start, end) character span of its document text that it came from
(the fast tokenizer's offsets). Tokens that no text produced -- BOS/CLS/EOS/SEP/padding added by the tokenizer or
the packer -- get (-1, -1). A document split across packed windows keeps offsets into the whole document.
Slow (Python) tokenizers have no offsets: their sequences carry no spans and the token index no span columns.

Shards take consecutive sequences until the next one would exceed `shard_tokens`; their ids derive from the input
only (format v2: the part and the shard's position in it; v1: the index of the shard's first sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from actstore.schemas.errors import ConfigError


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    sep: int
    pad: int
    special: frozenset[int]


NO_SPAN = -1  # char_start/char_end of a token no document text produced (special tokens)


@dataclass
class Encoded:
    """One document's token ids and their (n, 2) int32 character spans (None for slow tokenizers)."""

    ids: list[int]
    chars: np.ndarray | None = None


@dataclass
class Sequence:
    ids: np.ndarray  # int32 token ids
    doc: np.ndarray  # int64 doc id per token
    special: np.ndarray  # bool per token
    chars: np.ndarray | None = None  # (n, 2) int32 character span per token in its document, -1 for specials
    response: np.ndarray | None = None  # bool per token: generated (generate: stores only; None elsewhere)


@dataclass
class ShardPlan:
    """One shard's input: the unit of work, commit and resume."""

    shard_id: str
    seq_start: int  # seq_id of the first sequence
    token_start: int  # row of the first token (v2: within the part)
    sequences: list[Sequence]
    part: int | None = None  # v2: the corpus part

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
        cols = {
            "token_id": pa.array(cat("ids", np.int32)), "doc_id": pa.array(cat("doc", np.int64)),
            "seq_id": pa.array(seq), "position": pa.array(pos), "special": pa.array(cat("special", np.bool_)),
        }
        if lens and all(s.chars is not None for s in self.sequences):
            chars = cat("chars", np.int32).reshape(-1, 2)
            cols["char_start"], cols["char_end"] = pa.array(chars[:, 0]), pa.array(chars[:, 1])
        if lens and all(s.response is not None for s in self.sequences):
            cols["response"] = pa.array(cat("response", np.bool_))
        return pa.table(cols)


def special_ids(tok) -> SpecialIds:
    """BOS/separator/pad ids of a tokenizer, with the fallbacks used by GPT-2 (EOS) and BERT (CLS/SEP)."""
    eos, bos = tok.eos_token_id, tok.bos_token_id
    cls_, sep_ = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    start = bos if bos is not None else cls_ if cls_ is not None else eos
    sep = sep_ if sep_ is not None and cls_ is not None else eos if eos is not None else sep_
    if start is None or sep is None:
        raise ConfigError("tokenizer has no BOS/CLS/EOS/SEP token, so documents cannot be packed; use packing: false")
    pad = tok.pad_token_id if tok.pad_token_id is not None else sep
    return SpecialIds(int(start), int(sep), int(pad), frozenset(int(i) for i in tok.all_special_ids))


def tokenize_batch(tok, texts: list[str], add_special: bool, max_length: int | None = None) -> list[Encoded]:
    """Token ids and character spans for a batch of texts (fast tokenizers run the batch in Rust)."""
    kw: dict = {"truncation": True, "max_length": max_length} if max_length else {}
    if not getattr(tok, "is_fast", False):
        return [Encoded(ids) for ids in tok(texts, add_special_tokens=add_special, verbose=False, **kw)["input_ids"]]
    enc = tok(texts, add_special_tokens=add_special, verbose=False, return_offsets_mapping=True,
              return_special_tokens_mask=True, **kw)
    out = []
    for ids, offs, mask in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]):
        chars = np.array(offs, np.int32).reshape(-1, 2)
        # the tokenizer reports (0, 0) for the special tokens it added: no text produced them
        chars[np.array(mask, bool)] = NO_SPAN
        out.append(Encoded(list(ids), chars))
    return out


def pack(docs: Iterable[tuple[int, Encoded]], context_length: int, ids: SpecialIds) -> Iterator[Sequence]:
    """Packed windows over (doc_id, encoded document) pairs; see the module docstring for the rules."""
    body = context_length - 1
    buf_ids: list[int] = []
    buf_doc: list[int] = []
    buf_chars: list[np.ndarray] | None = []  # None once a document without spans (slow tokenizer) is seen
    for doc_id, enc in docs:
        if not enc.ids:
            continue  # an empty document contributes nothing (not even a separator)
        buf_ids.extend(enc.ids)
        buf_ids.append(ids.sep)
        buf_doc.extend([doc_id] * (len(enc.ids) + 1))
        if buf_chars is not None and enc.chars is not None:
            buf_chars.extend([enc.chars, _NO_SPANS[:1]])
        else:
            buf_chars = None
        while len(buf_ids) >= body:
            chars = _take(buf_chars, body)
            yield _window(buf_ids[:body], buf_doc[:body], chars, ids)
            del buf_ids[:body], buf_doc[:body]
    if buf_ids:
        yield _window(buf_ids, buf_doc, _take(buf_chars, len(buf_ids)), ids)


_NO_SPANS = np.full((1, 2), NO_SPAN, np.int32)


def _take(buf: list[np.ndarray] | None, n: int) -> np.ndarray | None:
    """Remove and return the first n rows of a list of (k, 2) span blocks (the rest stays in `buf`)."""
    if buf is None:
        return None
    joined = np.concatenate(buf) if buf else np.zeros((0, 2), np.int32)
    buf[:] = [joined[n:]] if len(joined) > n else []
    return joined[:n]


def _window(toks: list[int], docs: list[int], chars: np.ndarray | None, ids: SpecialIds) -> Sequence:
    arr = np.array([ids.bos, *toks], dtype=np.int32)
    doc = np.array([docs[0], *docs], dtype=np.int64)
    spans = None if chars is None else np.concatenate([_NO_SPANS, chars]).astype(np.int32)
    return Sequence(arr, doc, np.isin(arr, list(ids.special)) | (np.arange(len(arr)) == 0), spans)


def unpacked(docs: Iterable[tuple[int, Encoded]], ids: SpecialIds) -> Iterator[Sequence]:
    """One sequence per non-empty (already truncated, special-token-wrapped) document."""
    for doc_id, enc in docs:
        if enc.ids:
            arr = np.array(enc.ids, dtype=np.int32)
            yield Sequence(arr, np.full(len(arr), doc_id, np.int64), np.isin(arr, list(ids.special)), enc.chars)


def v1_shard_id(position: int, seq_start: int) -> str:
    """Format v1 shard id: the index of the shard's first sequence."""
    return f"{seq_start:09d}"


def plan_shards(sequences: Iterable[Sequence], shard_tokens: int,
                name: Callable[[int, int], str] = v1_shard_id, seq_base: int = 0,
                part: int | None = None, reserve: int = 0) -> Iterator[ShardPlan]:
    """Group consecutive sequences into shards of at most shard_tokens rows.

    `name(position, first seq_id)` gives the shard id; sequence ids count from `seq_base`, rows from 0.
    `reserve`: rows each sequence may still grow by (generated responses), budgeted but not counted in rows."""
    cur: list[Sequence] = []
    n_tok = tok_start = pos = budget = 0
    seq_start = seq_idx = seq_base
    for seq in sequences:
        if cur and budget + len(seq.ids) + reserve > shard_tokens:
            yield ShardPlan(name(pos, seq_start), seq_start, tok_start, cur, part)
            tok_start += n_tok
            cur, n_tok, budget, seq_start, pos = [], 0, 0, seq_idx, pos + 1
        cur.append(seq)
        n_tok += len(seq.ids)
        budget += len(seq.ids) + reserve
        seq_idx += 1
    if cur:
        yield ShardPlan(name(pos, seq_start), seq_start, tok_start, cur, part)
