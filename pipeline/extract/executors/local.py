"""In-process executor: reads, tokenizes and runs every part in this process (debugging and the reference).

Parts stream through one loop: a part's shards are planned as it is read, each planned shard runs through the
model on this thread, and its write (conversion, hashes, statistics, Zarr/Parquet files, commit) goes to a
small pool of commit threads, so the next shard's forward pass overlaps the previous shard's write. At most
`shards_in_flight` forwarded shards wait for their writes (bounded memory).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from actstore.schemas.config import ExtractConfig
from actstore.workers.part_task import PartJob, ShardWorker, part_rows, plan_row
from actstore.workers.parts import Part
from actstore.workers.runner import ModelRunner, load_tokenizer
from actstore.workers.shard_task import Forwarded, TaskOptions
from actstore.workers.tokenize import ShardPlan, special_ids

Result = Callable[[dict[str, Any]], None]


def task_options(cfg: ExtractConfig) -> TaskOptions:
    return TaskOptions(cfg.dtype, cfg.batch_size, cfg.on_overflow, cfg.compression)


def make_runner(cfg: ExtractConfig, pad_id: int) -> ModelRunner:
    # append: hooks only adds arrays to committed shards, whose outputs (if any) are already stored
    wanted = cfg.token_outputs if cfg.append != "hooks" else None
    return ModelRunner(cfg.model, cfg.hooks, cfg.revision, cfg.model_dtype, cfg.device, cfg.trust_remote_code, pad_id,
                       outputs_topk=wanted.topk if wanted is not None else None, causal_lm=cfg.generate is not None)


def make_worker(cfg: ExtractConfig, pad_id: int, fs: Any, root: str, append_tag: str | None) -> ShardWorker:
    gen = None
    if cfg.generate is not None and append_tag is None:
        gen = (cfg.generate, lambda: load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code))
    return ShardWorker(lambda: make_runner(cfg, pad_id), task_options(cfg), fs, root, append_tag, cfg.writer_threads,
                       gen)


def forward(worker: ShardWorker, row: dict[str, Any]) -> Forwarded | None:
    """One shard's forward passes (a module function so tests can interrupt a run at a chosen shard)."""
    return worker.forward(row)


def run_rows(cfg: ExtractConfig, rows: Iterable[dict[str, Any]], worker: ShardWorker, on_result: Result) -> None:
    """Forward each row here and write it on a commit thread; `on_result` gets every result row (any order)."""
    pending: deque[Future] = deque()
    try:
        # On an error the pool's exit first lets the writes in progress finish (their shards commit).
        with ThreadPoolExecutor(cfg.shards_in_flight, thread_name_prefix="actstore-commit") as commits:
            try:
                for row in rows:
                    pending.append(commits.submit(worker.finish, row, forward(worker, row)))
                    while pending and (len(pending) >= cfg.shards_in_flight or pending[0].done()):
                        on_result(pending.popleft().result())
            except BaseException:
                _settle(pending, on_result)
                raise
            while pending:
                on_result(pending.popleft().result())
    finally:
        worker.close()


def _settle(pending: deque[Future], on_result: Result) -> None:
    """After a failure (e.g. the next part's bad line): hand the writes that succeed to the bookkeeping, so a part
    whose last shard was already written is committed, not read again by the rerun."""
    while pending:
        fut = pending.popleft()
        try:
            on_result(fut.result())
        except Exception:  # noqa: BLE001  (the run's own error is the one raised; this part is simply redone)
            continue


def run_local_parts(cfg: ExtractConfig, parts: list[Part], job: PartJob, fs: Any, root: str, on_result: Result,
                    expected: dict[int, list[dict]] | None = None) -> None:
    """Read, plan, run and commit every part of `parts`, in order."""
    tok = load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    special = special_ids(tok)
    worker = make_worker(cfg, special.pad, fs, root, job.append_tag)

    def rows() -> Iterator[dict[str, Any]]:
        for part in parts:
            yield from part_rows(part, job, tok, special, fs, root, (expected or {}).get(part.index))

    run_rows(cfg, rows(), worker, on_result)


def run_local_plans(cfg: ExtractConfig, todo: list[ShardPlan], pad_id: int, fs: Any, root: str,
                    on_result: Result, append_tag: str | None = None) -> None:
    """Run planned shards (format v1 stores: their whole plan is made by the driver)."""
    run_rows(cfg, (plan_row(p, "run") for p in todo), make_worker(cfg, pad_id, fs, root, append_tag), on_result)
