"""The model's part of a `generate:` extraction: responses to a shard's prompts, and the sequences stored.

`respond` runs `model.generate` over the shard's prompts in batches (left-padded, attention mask, KV cache),
cuts each response at its end, and returns the shard plan of prompt + response sequences (which the existing
capture runs teacher-forced, right-padded, exactly as any unpacked shard) plus one responses row per prompt.

- A response ends at the first EOS the model generates (kept, finish_reason `eos`), at the first token whose
  decoded response text contains a `stop` string (kept, `stop`), or after max_new_tokens (`length`). Stop strings
  are applied here, after generation, so every kept token is exactly what `model.generate` produced.
- Sampling is seeded per batch from (seed, shard id, batch index), inside a forked RNG: the draws depend on the
  shard alone, not on which worker ran it or what ran before, so reruns, resumes and executors agree.
- Response tokens' character spans index the response text (`decode(response, skip_special_tokens=True)`): a
  token's span ends where the text decoded from the response up to and including it stops agreeing with the
  whole response (so a token completing a multi-byte character gets that character and its predecessors an
  empty span); special tokens (EOS) get (-1, -1).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.schemas.generate import GenerateSettings
from actstore.workers.tokenize import NO_SPAN, Sequence, ShardPlan

RESPONSES_SCHEMA = pa.schema([("doc_id", pa.int64()), ("response", pa.string()), ("finish_reason", pa.string()),
                              ("n_response_tokens", pa.int64())])


def batch_seed(seed: int, shard_id: str, batch: int) -> int:
    """The torch seed of one generation batch: from the settings' seed and the batch's place in its shard."""
    digest = hashlib.sha256(f"{seed}:{shard_id}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def eos_ids(lm: Any, tok: Any) -> frozenset[int]:
    """Token ids that end a response: the model's generation config's EOS (one or a list), else the tokenizer's."""
    cfg = getattr(lm, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is None:
        eos = tok.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return frozenset(int(i) for i in ids if i is not None)


def respond(runner: Any, tok: Any, plan: ShardPlan, g: GenerateSettings, batch_size: int) -> tuple[ShardPlan, pa.Table]:
    """The plan of prompt + response sequences and the shard's responses table (one row per prompt)."""
    stops = eos_ids(runner.lm, tok)
    special = frozenset(int(i) for i in tok.all_special_ids)
    lengths = np.array([len(s.ids) for s in plan.sequences])
    order = np.argsort(lengths, kind="stable")  # similar lengths together: less left padding
    new: list[np.ndarray | None] = [None] * len(plan.sequences)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        outs = runner.generate([plan.sequences[i].ids for i in idx], g, sorted(stops),
                               batch_seed(g.seed, plan.shard_id, b))
        for i, out in zip(idx, outs):
            new[i] = out
    seqs, rows = [], []
    for seq, out in zip(plan.sequences, new):
        assert out is not None
        ids, reason = cut(tok, out, stops, g.stop)
        text, chars = response_spans(tok, ids, special)
        seqs.append(joined(seq, ids, chars, special))
        rows.append((int(seq.doc[0]), text, reason, len(ids)))
    table = pa.Table.from_pylist([dict(zip(RESPONSES_SCHEMA.names, r)) for r in rows], schema=RESPONSES_SCHEMA)
    # rows before this shard in its part depend on earlier shards' responses: counted at the part's commit
    return ShardPlan(plan.shard_id, plan.seq_start, 0, seqs, plan.part), table


def cut(tok: Any, out: np.ndarray, stops: frozenset[int], stop_strings: list[str]) -> tuple[np.ndarray, str]:
    """The response kept of a generated row and why it ended (`eos`, `stop` or `length`)."""
    for j, t in enumerate(out.tolist()):
        if t in stops:
            return out[:j + 1], "eos"
        if stop_strings:
            text = tok.decode(out[:j + 1].tolist(), skip_special_tokens=True)
            if any(s in text for s in stop_strings):
                return out[:j + 1], "stop"
    return out, "length"


def response_spans(tok: Any, ids: np.ndarray, special: frozenset[int]) -> tuple[str, np.ndarray]:
    """The response text and each token's [start, end) in it (see the module docstring)."""
    full = tok.decode(ids.tolist(), skip_special_tokens=True)
    chars = np.full((len(ids), 2), NO_SPAN, np.int32)
    end = 0
    for j, t in enumerate(ids.tolist()):
        if t in special:
            continue
        pre = tok.decode(ids[:j + 1].tolist(), skip_special_tokens=True)
        new_end = _common_prefix(pre, full)
        chars[j] = (end, max(end, new_end))
        end = max(end, new_end)
    return full, chars


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def joined(prompt: Sequence, ids: np.ndarray, chars: np.ndarray, special: frozenset[int]) -> Sequence:
    """A prompt's sequence grown by its response (rows of the response flagged `response`)."""
    all_ids = np.concatenate([prompt.ids, ids.astype(np.int32)])
    doc = np.full(len(all_ids), int(prompt.doc[0]), np.int64)
    spans = None if prompt.chars is None else np.concatenate([prompt.chars, chars]).astype(np.int32)
    resp = np.concatenate([np.zeros(len(prompt.ids), np.bool_), np.ones(len(ids), np.bool_)])
    return Sequence(all_ids, doc, np.isin(all_ids, list(special)), spans, resp)
