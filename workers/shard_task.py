"""The unit of extraction work, shared by every executor: run the model over one planned shard and commit it.

Executors differ only in where this runs (in-process, a Ray actor); keeping the step here is what makes a
Ray run and a local run of one config produce byte-identical shards.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from actstore.schemas.manifest import ShardInfo
from actstore.workers import token_outputs
from actstore.workers.dtypes import FLOAT16_MAX, NUMPY_STORED, Float16OverflowError
from actstore.workers.runner import ModelRunner
from actstore.workers.shard_writer import ArraySpec, append_arrays, write_shard
from actstore.workers.storage import with_retries
from actstore.workers.tokenize import ShardPlan


@dataclass(frozen=True)
class TaskOptions:
    """Per-run settings every shard task needs (a subset of ExtractConfig, cheap to ship to workers)."""

    dtype: str
    batch_size: int
    on_overflow: str
    compression: str


@dataclass
class Forwarded:
    """A shard after its forward passes, waiting to be written: the stored rows of every hook and their extras."""

    plan: ShardPlan
    arrays: dict[str, np.ndarray]
    overflow: dict[str, int]
    specs: list[ArraySpec]
    outputs: dict[str, np.ndarray] | None = None
    responses: pa.Table | None = None  # generate: one row per prompt (doc_id, response, finish_reason, ...)


def forward_plan(runner: ModelRunner, plan: ShardPlan, opts: TaskOptions) -> Forwarded:
    """The model's part of a shard task (holds the runner; the write can run elsewhere, see `write_forwarded`)."""
    outputs = {} if runner.outputs_topk is not None else None
    arrays, overflow = forward_shard(runner, plan, opts, outputs)
    specs = [ArraySpec(s.name, arrays[s.name].shape[1], opts.dtype) for s in runner.specs]
    return Forwarded(plan, arrays, overflow, specs, outputs)


def write_forwarded(fwd: Forwarded, opts: TaskOptions, fs, root: str, pool: Executor | None = None) -> ShardInfo:
    """Write and commit a forwarded shard (hooks written in parallel on `pool` when given)."""
    plan = fwd.plan
    meta = {
        "seq_start": plan.seq_start, "seq_end": plan.seq_start + len(plan.sequences),
        "token_start": plan.token_start, "token_end": plan.token_start + plan.n_tokens, "part": plan.part,
    }
    tokens = plan.tokens_table()
    outputs = token_outputs.to_table(fwd.outputs) if fwd.outputs is not None else None
    return with_retries(
        lambda: write_shard(fs, root, plan.shard_id, meta, tokens, fwd.arrays, fwd.specs, opts.compression,
                            fwd.overflow, outputs, pool, fwd.responses),
        f"writing shard {plan.shard_id}",
    )


def run_shard(runner: ModelRunner, plan: ShardPlan, opts: TaskOptions, fs, root: str) -> ShardInfo:
    """Forward every sequence of `plan` in batches, then write and commit the shard."""
    return write_forwarded(forward_plan(runner, plan, opts), opts, fs, root)


def append_forwarded(fwd: Forwarded, opts: TaskOptions, fs, root: str, tag: str, pool: Executor | None = None) -> dict:
    """Add a forwarded shard's (new) hook arrays to its committed shard (`append: hooks`); returns the record."""
    tokens = fwd.plan.tokens_table()
    return with_retries(
        lambda: append_arrays(fs, root, fwd.plan.shard_id, tag, tokens, fwd.arrays, fwd.specs, opts.compression,
                              fwd.overflow, pool),
        f"appending hooks to shard {fwd.plan.shard_id}",
    )


def append_shard(runner: ModelRunner, plan: ShardPlan, opts: TaskOptions, fs, root: str, tag: str) -> dict:
    """Run the runner's (new) hooks over an already committed shard and add their arrays to it (`append: hooks`).

    The rows come from the same batching as `run_shard`, so they equal what a run with every hook would store.
    Returns the shard's append record (see `shard_writer.append_arrays`).
    """
    return append_forwarded(forward_plan(runner, plan, opts), opts, fs, root, tag)


def forward_shard(
    runner: ModelRunner, plan: ShardPlan, opts: TaskOptions, outputs: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Stored rows of every runner hook over `plan`, in the shard's row order, and float16 overflow counts.

    With an `outputs` dict (and a runner built with outputs_topk), the per-token outputs are filled into it in
    the same row order.

    Batches are formed over the sequences sorted by length (stable), so unpacked corpora waste little compute on
    padding; rows are scattered back to the shard's (sequence, position) order. The grouping depends only on
    the plan, so every executor produces the same bytes. Raises Float16OverflowError per `opts.on_overflow`.
    """
    n = plan.n_tokens
    lengths = np.array([len(s.ids) for s in plan.sequences])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.argsort(lengths, kind="stable")
    arrays: dict[str, np.ndarray] = {}
    overflow = {s.name: 0 for s in runner.specs}
    for b in range(0, len(order), opts.batch_size):
        idx = order[b:b + opts.batch_size]
        out = runner.run([plan.sequences[i].ids for i in idx], opts.dtype)
        rows = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in idx])
        if rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(idx) == 1):
            rows = slice(int(rows[0]), int(rows[-1]) + 1)  # packed windows: a plain copy, no scatter
        if outputs is not None:
            _put_outputs(outputs, runner, rows, n)
        for name, (arr, n_over) in out.items():
            if name not in arrays:  # widths are known once the first batch has run
                arrays[name] = np.empty((n, arr.shape[1]), NUMPY_STORED[opts.dtype])
            arrays[name][rows] = arr
            overflow[name] += n_over
    _check_overflow(overflow, opts, plan.shard_id)
    return arrays, overflow


def _put_outputs(outputs: dict[str, np.ndarray], runner: ModelRunner, rows, n: int) -> None:
    if not outputs:
        outputs.update(token_outputs.empty(n, runner.outputs_topk or 0))
    for key, val in runner.outputs.items():
        outputs[key][rows] = val


def _check_overflow(overflow: dict[str, int], opts: TaskOptions, shard_id: str) -> None:
    bad = {h: c for h, c in overflow.items() if c}
    if bad and opts.on_overflow == "error":
        h, c = next(iter(bad.items()))
        raise Float16OverflowError(
            f"hook {h!r} has {c} values beyond float16's range (|x| > {FLOAT16_MAX:g}) in shard {shard_id}; "
            "use dtype: bfloat16 or float32 (or on_overflow: inf to store inf and count it)"
        )
