"""Where a corpus part becomes committed shards (format v2), shared by every executor.

Two stages, so that an executor can place them apart (Ray: reading tasks feeding model actors) or run them in one
process (local):

- `part_rows` reads, tokenizes and packs one part and yields one row per planned shard as soon as the shard's
  sequences are complete: `run` rows carry the shard plan, `done` rows a shard already committed by an earlier
  attempt (checked against the plan, never re-run). The part's last row carries its summary (hash, counts), and
  the part's docs rows are written (`parts/<part>.docs.parquet`) before that row is yielded; a part without shards
  yields one summary-only row.
- `ShardWorker` runs the model over `run` rows (one forward at a time: it holds the model) and writes them on
  writer threads (`finish`), so the next shard's forward overlaps the previous shard's conversion, hashing,
  compression and upload; `done` rows pass through. Its result rows go to the driver's bookkeeping.

Rows are flat dicts of ints, strings and bytes (cheap to ship through Ray; nothing pickled is stored).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actstore.schemas import layout
from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import AppendError
from actstore.schemas.generate import GenerateSettings
from actstore.workers import storage
from actstore.workers.generate import respond
from actstore.workers.part_plan import PartPlanner
from actstore.workers.parts import PART_SHIFT, CorpusSpec, Part, read_part
from actstore.workers.runner import ModelRunner
from actstore.workers.shard_task import Forwarded, TaskOptions, append_forwarded, forward_plan, write_forwarded
from actstore.workers.shard_writer import (
    _parquet_bytes,
    is_appended,
    is_committed,
    read_append,
    read_commit,
    shard_path,
    tokens_sha256,
)
from actstore.workers.tokenize import Sequence, ShardPlan, SpecialIds


@dataclass(frozen=True)
class PartJob:
    """What reading a part needs besides the part (a subset of ExtractConfig, cheap to ship to workers)."""

    spec: CorpusSpec
    model: str
    revision: str | None
    trust_remote_code: bool
    context_length: int
    packing: bool
    shard_tokens: int
    append_tag: str | None = None  # append: hooks: check each shard against the store, then add hooks to it
    span_field: str | None = None  # record field of span labels: kept out of the docs rows (the driver maps them)
    generate: dict[str, Any] | None = None  # GenerateSettings: records are prompts, shards budget their responses

    @classmethod
    def of(cls, cfg: Any, append_tag: str | None = None) -> PartJob:
        spec = CorpusSpec.of(cfg)
        if isinstance(spec.corpus, list):  # list parts carry their own items: never ship the whole list
            spec = CorpusSpec(**{**asdict(spec), "corpus": []})
        # only an extraction's records are prompts (an intervention's `generate` continues its own documents)
        gen = cfg.generate if isinstance(cfg, ExtractConfig) else None
        return cls(spec, cfg.model, cfg.revision, cfg.trust_remote_code, cfg.context_length,
                   cfg.packing, cfg.shard_tokens, append_tag, getattr(cfg, "span_field", None),
                   gen.model_dump() if gen is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PartJob:
        return cls(**{**d, "spec": CorpusSpec(**d["spec"])})


# ---- rows -------------------------------------------------------------------------------------------------
def encode_plan(p: ShardPlan) -> dict[str, Any]:
    """A shard plan as flat row fields of bytes."""
    cat = (lambda k, dt: np.concatenate([getattr(s, k) for s in p.sequences]).astype(dt).tobytes())
    return {"shard_id": p.shard_id, "seq_start": p.seq_start, "token_start": p.token_start,
            "lens": np.array([len(s.ids) for s in p.sequences], np.int64).tobytes(),
            "ids": cat("ids", np.int32), "doc": cat("doc", np.int64), "special": cat("special", np.bool_),
            # empty when the tokenizer gave no character spans (slow tokenizers)
            "chars": cat("chars", np.int32) if all(s.chars is not None for s in p.sequences) else b""}


def decode_plan(row: dict[str, Any]) -> ShardPlan:
    lens = np.frombuffer(row["lens"], np.int64)
    cuts = np.cumsum(lens)[:-1]
    # copies: row buffers are read-only, and torch warns about (and must never write to) read-only arrays
    ids, doc = np.frombuffer(row["ids"], np.int32).copy(), np.frombuffer(row["doc"], np.int64).copy()
    sp = np.frombuffer(row["special"], np.bool_).copy()
    raw = bytes(row.get("chars") or b"")  # rows of other callers (intervene) may carry no spans
    chars = np.split(np.frombuffer(raw, np.int32).reshape(-1, 2).copy(), cuts) if raw else [None] * len(lens)
    seqs = [Sequence(a, b, c, d)
            for a, b, c, d in zip(np.split(ids, cuts), np.split(doc, cuts), np.split(sp, cuts), chars)]
    part = int(row.get("part", -1))  # rows of other callers (intervene) carry no part
    return ShardPlan(str(row["shard_id"]), int(row["seq_start"]), int(row["token_start"]), seqs,
                     part if part >= 0 else None)


_EMPTY_PLAN = {"shard_id": "", "seq_start": 0, "token_start": 0, "lens": b"", "ids": b"", "doc": b"", "special": b"",
               "chars": b""}


def plan_row(plan: ShardPlan, state: str, info: str = "", pos: int = 0) -> dict[str, Any]:
    """A row of the shard stage: state `run` (with the plan's bytes) or `done` (with the committed record)."""
    body = encode_plan(plan) if state == "run" else {**_EMPTY_PLAN, "shard_id": plan.shard_id}
    return {**body, "part": plan.part if plan.part is not None else -1, "pos": pos, "state": state, "info": info,
            "summary": "", "n_tokens": plan.n_tokens}


def summary_row(part: int) -> dict[str, Any]:
    return {**_EMPTY_PLAN, "part": part, "pos": -1, "state": "none", "info": "", "summary": "", "n_tokens": 0}


# ---- stage 1: read, tokenize, pack ---------------------------------------------------------------------
def part_planner(part: Part, job: PartJob, tok: Any, special: SpecialIds) -> PartPlanner:
    base = part.index << PART_SHIFT
    return PartPlanner(read_part(part, job.spec), tok, special, job.context_length, job.packing, job.shard_tokens,
                       doc_base=base, seq_base=base, part=part.index,
                       name=lambda pos, _seq: layout.shard_id(part.index, pos), drop_field=job.span_field,
                       generate=GenerateSettings(**job.generate) if job.generate is not None else None)


def part_rows(part: Part, job: PartJob, tok: Any, special: SpecialIds, fs: Any, root: str,
              expected: list[dict] | None = None) -> Iterator[dict[str, Any]]:
    """The shard-stage rows of one part (see the module docstring); `expected`: append: hooks, the store's
    records of this part's shards (id, ranges, tokens_sha256), each checked before its shard is run."""
    planner = part_planner(part, job, tok, special)
    held: dict[str, Any] | None = None
    for pos, plan in enumerate(planner):
        row = (_append_row(plan, pos, expected, job, fs, root) if job.append_tag
               else _extract_row(plan, pos, fs, root, job.generate is not None))
        if held is not None:
            yield held
        held = row  # the last row waits for the end of the part: it carries the part's summary
    if expected is not None and planner.n_shards != len(expected):
        raise AppendError(f"append: hooks: corpus part {part.index} ({part.describe()}) plans {planner.n_shards} "
                          f"shards but the store has {len(expected)}; the tokenizer or the corpus changed")
    if job.append_tag is None:
        _drop_beyond(fs, root, part.index, planner.n_shards)
        docs = _parquet_bytes(planner.docs_table())
        storage.with_retries(lambda: storage.put_atomic(fs, layout.part_file(root, part.index, layout.PART_DOCS),
                                                        docs), f"writing the documents of corpus part {part.index}")
    summary = {"sha256": planner.sha256, "n_docs": planner.n_docs, "n_sequences": planner.n_sequences,
               "n_tokens": planner.n_tokens, "n_shards": planner.n_shards, "mixed": planner.types.conflicts}
    last = held if held is not None else summary_row(part.index)
    yield {**last, "summary": json.dumps(summary)}


def _drop_beyond(fs: Any, root: str, part: int, n_shards: int) -> None:
    """Shards of this part past its last one: left by an attempt over other input (the part changed since)."""
    prefix = layout.shard_id(part, 0).rsplit("-", 1)[0]
    for path in fs.glob(layout.shard_dir(root, f"{prefix}-*")):
        pos = path.rstrip("/").rsplit("-", 1)[-1]
        if pos.isdigit() and int(pos) >= n_shards:
            fs.rm(path, recursive=True)


def _extract_row(plan: ShardPlan, pos: int, fs: Any, root: str, generated: bool = False) -> dict[str, Any]:
    """`done` for a shard an earlier attempt committed from the same input, else `run` (stale debris removed)."""
    if storage.with_retries(lambda: is_committed(fs, root, plan.shard_id), f"checking shard {plan.shard_id}"):
        info = storage.with_retries(lambda: read_commit(fs, root, plan.shard_id), f"reading shard {plan.shard_id}")
        if generated:  # its rows hold responses the plan does not know: compare the prompts' rows
            if (info.part, info.seq_start) == (plan.part, plan.seq_start) and _same_prompts(fs, root, plan):
                return plan_row(plan, "done", info.model_dump_json(), pos)
            fs.rm(shard_path(root, plan.shard_id), recursive=True)
            return plan_row(plan, "run", "", pos)
        same = (info.part, info.seq_start, info.token_start, info.n_tokens) == (
            plan.part, plan.seq_start, plan.token_start, plan.n_tokens)
        if same and info.tokens_sha256 == tokens_sha256(plan.tokens_table()):
            return plan_row(plan, "done", info.model_dump_json(), pos)
        # written from other input (this part changed before it was finished): not part of any store yet
        fs.rm(shard_path(root, plan.shard_id), recursive=True)
    return plan_row(plan, "run", "", pos)


def _same_prompts(fs: Any, root: str, plan: ShardPlan) -> bool:
    """Whether a committed generated shard's prompt rows are the plan's (same ids, documents, spans)."""
    path = storage.join(shard_path(root, plan.shard_id), layout.TOKENS)
    raw = storage.with_retries(lambda: fs.cat_file(path), f"reading {path}")
    stored = pq.read_table(pa.BufferReader(raw))
    if "response" not in stored.column_names:
        return False
    prompts = stored.filter(pc.invert(stored.column("response"))).drop_columns(["response"])
    want = plan.tokens_table()
    return prompts.column_names == want.column_names and all(
        np.array_equal(prompts.column(c).to_numpy(), want.column(c).to_numpy()) for c in want.column_names)


def _append_row(plan: ShardPlan, pos: int, expected: list[dict] | None, job: PartJob, fs: Any,
                root: str) -> dict[str, Any]:
    """append: hooks: the plan must be the store's shard (ranges and token index bytes) before any forward."""
    want = expected[pos] if expected is not None and pos < len(expected) else None
    have = {"id": plan.shard_id, "seq_start": plan.seq_start, "seq_end": plan.seq_start + len(plan.sequences),
            "n_tokens": plan.n_tokens, "tokens_sha256": tokens_sha256(plan.tokens_table())}
    if want is not None and want.get("tokens_sha256") != have["tokens_sha256"]:
        have["tokens_sha256"] = _without_spans_sha256(plan)
    if want is None or {k: want.get(k) for k in have} != have:
        raise AppendError(f"append: hooks: shard {plan.shard_id} of the store does not match the corpus as planned "
                          f"now (ranges or token index differ); the tokenizer or the corpus changed since the store "
                          "was written")
    tag = job.append_tag
    assert tag is not None
    if is_appended(fs, root, plan.shard_id, tag):
        return plan_row(plan, "done", json.dumps(read_append(fs, root, plan.shard_id, tag)), pos)
    return plan_row(plan, "run", "", pos)


def _without_spans_sha256(plan: ShardPlan) -> str:
    """The token index hash of a store written before tokens had character spans (it lacks those columns)."""
    table = plan.tokens_table()
    return tokens_sha256(table.drop_columns([c for c in ("char_start", "char_end") if c in table.column_names]))


# ---- stage 2: forward and write ------------------------------------------------------------------------
class ShardWorker:
    """Holds the model runner (built when the first shard needs it) and the writer threads of one worker."""

    def __init__(self, make_runner: Callable[[], ModelRunner], opts: TaskOptions, fs: Any, root: str,
                 append_tag: str | None = None, writer_threads: int = 1,
                 generate: tuple[GenerateSettings, Callable[[], Any]] | None = None) -> None:
        self._make_runner, self.opts, self.fs, self.root, self.append_tag = make_runner, opts, fs, root, append_tag
        # generate: (settings, tokenizer loader): shards hold prompts, answered here before their forward
        self.generate = generate
        self._tok: Any = None
        self._runner: ModelRunner | None = None
        self._model_lock = threading.Lock()  # one forward at a time: the runner's hooks hold per-call state
        self.pool = ThreadPoolExecutor(writer_threads, thread_name_prefix="actstore-write") \
            if writer_threads > 1 else None

    def runner(self) -> ModelRunner:
        if self._runner is None:
            self._runner = self._make_runner()
        return self._runner

    def forward(self, row: dict[str, Any]) -> Forwarded | None:
        """The model's part of a `run` row (None for rows that need no forward)."""
        if row["state"] != "run":
            return None
        plan = decode_plan(row)
        with self._model_lock:
            if self.generate is None:
                return forward_plan(self.runner(), plan, self.opts)
            settings, load_tok = self.generate
            if self._tok is None:
                self._tok = load_tok()
            plan, responses = respond(self.runner(), self._tok, plan, settings, self.opts.batch_size)
            fwd = forward_plan(self.runner(), plan, self.opts)
            fwd.responses = responses
            return fwd

    def finish(self, row: dict[str, Any], fwd: Forwarded | None) -> dict[str, Any]:
        """Write and commit a forwarded shard; returns the result row for the driver's bookkeeping."""
        info = row["info"]
        if fwd is not None and self.append_tag is not None:
            info = json.dumps(append_forwarded(fwd, self.opts, self.fs, self.root, self.append_tag, self.pool))
        elif fwd is not None:
            info = write_forwarded(fwd, self.opts, self.fs, self.root, self.pool).model_dump_json()
        # Rows written: a generated shard's plan grew by its responses in `forward`.
        ran = fwd.plan.n_tokens if fwd is not None else row["n_tokens"]
        return {"part": row["part"], "pos": row["pos"], "shard_id": row["shard_id"], "state": row["state"],
                "info": info, "summary": row["summary"], "n_tokens": ran if row["state"] == "run" else 0,
                "done_tokens": row["n_tokens"] if row["state"] == "done" else 0}

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.finish(row, self.forward(row))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self._runner is not None:
            self._runner.close()
