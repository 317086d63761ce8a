"""Character spans of tokens (`char_start`/`char_end` in the token index) against the tokenizer as the oracle.

For packed and unpacked stores of a byte-level BPE (GPT-2) and a WordPiece (BERT) tokenizer, every document's
rows carry exactly the offsets `tokenizer(text, return_offsets_mapping=True)` gives, special tokens carry
(-1, -1), and `text[char_start:char_end]` is the text of the token id. Documents split across packed windows map
back into the whole document. Stores written before the columns existed still open, and `append: hooks` on them
still matches their token index.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import transformers as T

import actstore
from actstore.workers import tokenize as tokmod
from actstore.workers.part_task import decode_plan, encode_plan
from tests.support import corpus_texts, extract_local

HOOK = "blocks.0.hook_resid_post"


def _docs() -> list[str]:
    # real text, plus non-ASCII characters so that character offsets differ from byte offsets
    return [*corpus_texts(4, min_len=200), "Naïve café — “quoted” text, 10 µs later: done."]


def _rows(store, doc_id: int) -> dict[str, np.ndarray]:
    t = store.tokens().to_pydict()
    keep = np.asarray(t["doc_id"]) == doc_id
    return {k: np.asarray(v)[keep] for k, v in t.items()}


def _token_text(tok, token_id: int) -> str:
    """The text of one token id, without leading-space markers (GPT-2 " x") or continuation markers (BERT "##")."""
    text = tok.decode([token_id])
    return (text[2:] if text.startswith("##") else text).strip()


def _normalized(tok, text: str) -> str:
    """The text as the tokenizer sees it (BERT-uncased lowercases and strips accents; GPT-2 keeps it)."""
    norm = tok.backend_tokenizer.normalizer
    return norm.normalize_str(text) if norm is not None else text


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_spans_are_the_tokenizer_offsets(tiny, tmp_path, kind, packing):
    model = tiny(kind)
    tok = T.AutoTokenizer.from_pretrained(model)
    docs = _docs()
    store = extract_local(model, tmp_path / "s", [HOOK], docs, packing=packing)
    assert store.tokens().schema.field("char_start").type == pa.int32()
    for d, text in enumerate(docs):
        rows = _rows(store, d)
        enc = tok(text, add_special_tokens=not packing, return_offsets_mapping=True, return_special_tokens_mask=True,
                  **({} if packing else {"truncation": True, "max_length": 32}))
        want = np.array(enc["offset_mapping"]).reshape(-1, 2)
        want[np.array(enc["special_tokens_mask"], bool)] = -1
        text_rows = rows["char_start"] >= 0
        if packing:  # the packer's BOS and separators are the only rows without text
            assert (rows["special"][~text_rows]).all()
            assert np.array_equal(rows["token_id"][text_rows], enc["input_ids"])
            got = np.stack([rows["char_start"][text_rows], rows["char_end"][text_rows]], 1)
        else:
            assert np.array_equal(rows["token_id"], enc["input_ids"])
            got = np.stack([rows["char_start"], rows["char_end"]], 1)
        assert np.array_equal(got, want)
        assert ((rows["char_start"] == -1) == (rows["char_end"] == -1)).all()
        for i, a, b in zip(rows["token_id"][text_rows], rows["char_start"][text_rows], rows["char_end"][text_rows]):
            piece = _token_text(tok, int(i))
            if "\ufffd" not in piece:  # a byte-level token holding part of a multi-byte character decodes to U+FFFD
                assert _normalized(tok, text[a:b]).strip() == piece, (text[a:b], piece)


def test_packed_windows_split_documents_and_keep_document_offsets(tiny, tmp_path):
    """A document longer than a window is split across sequences; its spans continue, never restart at 0."""
    # ASCII only: a byte-level token holding part of a multi-byte character shares that character's span
    text = "".join(c for c in corpus_texts(1, min_len=2000)[0] if c.isascii())
    store = extract_local(tiny("gpt2"), tmp_path / "s", [HOOK], [text], packing=True, context_length=16)
    rows = _rows(store, 0)
    assert len(np.unique(rows["seq_id"])) > 3
    starts = rows["char_start"][rows["char_start"] >= 0]
    assert starts[0] == 0 and (np.diff(starts) > 0).all()
    ends = rows["char_end"][rows["char_start"] >= 0]
    assert np.array_equal(starts[1:], ends[:-1])  # byte-level BPE covers every character exactly once
    assert ends[-1] == len(text)
    # each window starts with a BOS row without a span
    first = np.r_[True, rows["seq_id"][1:] != rows["seq_id"][:-1]]
    assert (rows["char_start"][first] == -1).all()


def test_ray_plan_rows_carry_spans(tiny):
    tok = T.AutoTokenizer.from_pretrained(tiny("gpt2"))
    ids = tokmod.special_ids(tok)
    encoded = tokmod.tokenize_batch(tok, _docs(), add_special=False)
    plans = list(tokmod.plan_shards(tokmod.pack(enumerate(encoded), 16, ids), 64))
    for p in plans:
        assert decode_plan(encode_plan(p)).tokens_table().equals(p.tokens_table())
    assert "char_start" in plans[0].tokens_table().column_names


def _old_format(monkeypatch) -> None:
    """Make extraction write the token index as stores did before character spans existed."""
    plain = tokmod.ShardPlan.tokens_table

    def without_spans(self):
        return plain(self).drop_columns(["char_start", "char_end"])

    monkeypatch.setattr(tokmod.ShardPlan, "tokens_table", without_spans)


def test_old_store_without_spans_opens_and_appends_hooks(tiny, tmp_path, monkeypatch):
    model, docs = tiny("gpt2"), _docs()
    with monkeypatch.context() as m:
        _old_format(m)
        extract_local(model, tmp_path / "s", [HOOK], docs)
    store = actstore.open_store(str(tmp_path / "s"))
    assert "char_start" not in store.tokens().column_names and not store.has_char_spans
    assert store.verify().ok
    grown = extract_local(model, tmp_path / "s", ["blocks.1.hook_resid_post"], docs, append="hooks")
    assert grown.hooks == [HOOK, "blocks.1.hook_resid_post"]
    assert "char_start" not in grown.tokens().column_names and grown.verify().ok
