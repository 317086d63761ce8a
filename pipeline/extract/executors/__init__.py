"""Executors: where parts are read and shards run. One dispatch serves extract and both kinds of append.

`local` runs everything in this process (the reference); `ray` runs a streaming Ray Data pipeline of reading
tasks and model actors (`ray_pool`). Both run the same per-part and per-shard code (`workers.part_task`), so they
write the same bytes. `run_parts` streams corpus parts (format v2); `run_shards` runs shards the driver planned
(format v1 stores, which are grown with the planning they were made with).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from actstore.schemas.config import ExtractConfig
from actstore.workers.part_task import PartJob
from actstore.workers.parts import Part
from actstore.workers.tokenize import ShardPlan

Result = Callable[[dict[str, Any]], None]


def ray_address(cfg: ExtractConfig) -> str | None:
    """The Ray cluster to join: the config's `ray_address`, else RAY_ADDRESS (set inside a Ray job), else None."""
    return cfg.ray_address or os.environ.get("RAY_ADDRESS")


@contextlib.contextmanager
def session(cfg: ExtractConfig) -> Iterator[None]:
    """The executor's session for a whole run (with Ray: one Ray for every stage; starting it twice costs seconds)."""
    if cfg.executor == "local":
        yield
        return
    from actstore.pipeline.extract.executors.ray_pool import ray_session

    with ray_session(ray_address(cfg)):
        yield


def run_parts(cfg: ExtractConfig, parts: list[Part], job: PartJob, pad_id: int, fs: Any, root: str,
              on_result: Result, expected: dict[int, list[dict]] | None = None) -> None:
    """Read, plan, run and commit every part of `parts` with the configured executor; `on_result` gets each
    shard's result row (any order). With `job.append_tag` (`append: hooks`) the hooks are added instead."""
    if not parts:
        return
    if cfg.executor == "local":
        from actstore.pipeline.extract.executors.local import run_local_parts

        run_local_parts(cfg, parts, job, fs, root, on_result, expected)
    else:
        from actstore.pipeline.extract.executors.ray_pool import run_ray_parts

        run_ray_parts(cfg, parts, job, pad_id, on_result, ray_address(cfg), expected)


def run_shards(cfg: ExtractConfig, todo: list[ShardPlan], pad_id: int, fs: Any, root: str,
               progress: Callable[[int], None], append_tag: str | None = None) -> None:
    """Write and commit planned shards (format v1); `progress(n_tokens)` per shard. With `append_tag`
    (`append: hooks`) the config's hooks are added to committed shards instead."""
    if not todo:
        return

    def done(row: dict[str, Any]) -> None:
        progress(int(row["n_tokens"]))

    if cfg.executor == "local":
        from actstore.pipeline.extract.executors.local import run_local_plans

        run_local_plans(cfg, todo, pad_id, fs, root, done, append_tag)
    else:
        from actstore.pipeline.extract.executors.ray_pool import run_ray_plans

        run_ray_plans(cfg, todo, pad_id, done, ray_address(cfg), append_tag)
