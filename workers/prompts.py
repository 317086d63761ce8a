"""Prompts of a `generate:` extraction, tokenized without the model: chat template and left truncation.

A prompt gets the tokenizer's own special tokens (or, with `chat_template`, the template's text, which holds
them) and must leave `max_new_tokens` positions for its response within context_length: a longer prompt keeps
its last tokens, after its first token when that is a special one (BOS), because the end of a prompt is what
the response continues. Character spans keep indexing the record's text: with a chat template, the template's
own tokens get (-1, -1) and a token straddling the template and the text the span of its text part.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore.schemas.errors import CorpusError
from actstore.schemas.generate import GenerateSettings
from actstore.workers.tokenize import NO_SPAN, Encoded, tokenize_batch


def prompt_encodings(tok: Any, texts: list[str], g: GenerateSettings, context_length: int) -> list[Encoded]:
    """Token ids and character spans of each prompt, at most context_length - max_new_tokens tokens."""
    room = context_length - g.max_new_tokens
    if not g.chat_template:
        encs = tokenize_batch(tok, texts, True)
    else:
        wrapped = [_templated(tok, t) for t in texts]
        encs = tokenize_batch(tok, wrapped, False)
        head = _template_head(tok)
        encs = [_shift(e, _text_offset(w, t, head), len(t)) for e, w, t in zip(encs, wrapped, texts)]
    return [_left_truncated(e, room, tok) for e in encs]


def _templated(tok: Any, text: str) -> str:
    if not getattr(tok, "chat_template", None):
        raise CorpusError(f"generate.chat_template: the tokenizer {getattr(tok, 'name_or_path', '')!r} has no chat "
                          "template; set chat_template: false")
    return str(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True))


_MARKER = "\u27e6actstore-prompt\u27e7"  # text no prompt holds: where the template puts the user's message


def _template_head(tok: Any) -> str:
    """What the chat template writes before the user's message (system prompt, role tags)."""
    rendered = _templated(tok, _MARKER)
    at = rendered.find(_MARKER)
    return rendered[:at] if at >= 0 else ""


def _text_offset(wrapped: str, text: str, head: str) -> int:
    """Where the record's text starts in its templated string: right after the template's head, checked (a
    template that also quotes the text elsewhere, e.g. in its system prompt, must not move the spans), or -1 (no
    spans) when the template altered the text."""
    at = len(head)
    return at if wrapped.startswith(head) and wrapped[at:at + len(text)] == text else -1


def _shift(enc: Encoded, offset: int, n: int) -> Encoded:
    """Spans of the templated string made spans of the record's text (template tokens: no span)."""
    if enc.chars is None:
        return enc
    chars = np.clip(enc.chars.astype(np.int64) - max(offset, 0), 0, n)  # a token straddling the edge: its text part
    outside = (chars[:, 0] >= chars[:, 1]) | (enc.chars[:, 0] < 0) | (offset < 0)
    chars[outside] = NO_SPAN
    return Encoded(enc.ids, chars.astype(np.int32))


def _left_truncated(enc: Encoded, room: int, tok: Any) -> Encoded:
    if len(enc.ids) <= room:
        return enc
    first_special = enc.ids[0] in set(getattr(tok, "all_special_ids", []))
    keep = [0] if first_special and room > 1 else []
    idx = np.array(keep + list(range(len(enc.ids) - (room - len(keep)), len(enc.ids))), np.int64)
    return Encoded([enc.ids[i] for i in idx], enc.chars[idx] if enc.chars is not None else None)
