"""In-process executor: runs shard tasks one after another in this process (debugging and the reference)."""

from __future__ import annotations

from collections.abc import Callable

from actstore.schemas.config import ExtractConfig
from actstore.workers.runner import ModelRunner
from actstore.workers.shard_task import TaskOptions, run_shard
from actstore.workers.tokenize import ShardPlan


def task_options(cfg: ExtractConfig) -> TaskOptions:
    return TaskOptions(cfg.dtype, cfg.batch_size, cfg.on_overflow, cfg.compression)


def make_runner(cfg: ExtractConfig, pad_id: int) -> ModelRunner:
    # append: hooks only adds arrays to committed shards, whose outputs (if any) are already stored
    wanted = cfg.token_outputs if cfg.append != "hooks" else None
    return ModelRunner(cfg.model, cfg.hooks, cfg.revision, cfg.model_dtype, cfg.device, cfg.trust_remote_code, pad_id,
                       outputs_topk=wanted.topk if wanted is not None else None)


def run_local(cfg: ExtractConfig, todo: list[ShardPlan], pad_id: int, fs, root: str,
              on_shard: Callable[[int], None]) -> None:
    """Run every pending shard in order; `on_shard(n_tokens)` reports progress."""
    runner = make_runner(cfg, pad_id)
    opts = task_options(cfg)
    try:
        for plan in todo:
            run_shard(runner, plan, opts, fs, root)
            on_shard(plan.n_tokens)
    finally:
        runner.close()
