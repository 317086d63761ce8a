"""Tokenize the corpus in Ray CPU tasks (the Ray executor's planning step).

The driver streams documents from the corpus reader and ships batches of texts to small CPU tasks, which load the
tokenizer once per worker process and return token ids. Results are consumed in submission order, so the plan
(and with it every shard id and byte) is the same as tokenizing in-process; at most `in_flight` batches are
pending at a time, which bounds the driver's memory for texts in transit.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator

from actstore.pipeline.plan import Tokenize
from actstore.schemas.config import ExtractConfig
from actstore.workers.runner import load_tokenizer
from actstore.workers.tokenize import tokenize_batch

TASK_CPUS = 0.25  # small: tokenizing must not wait for CPU slots that model actors hold


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, revision: str | None, trust_remote_code: bool):
    return load_tokenizer(model, revision, trust_remote_code)


def _tokenize_task(model: str, revision: str | None, trust: bool, texts: list[str], add_special: bool,
                   max_length: int | None) -> list[list[int]]:
    return tokenize_batch(_tokenizer(model, revision, trust), texts, add_special, max_length)


def ray_tokenizer(cfg: ExtractConfig, in_flight: int | None = None) -> Tokenize:
    """A `tokenize(batches, add_special, max_length)` for `plan.make_plan` that runs each batch as a Ray task."""
    import ray

    task = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(_tokenize_task)
    window = in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))

    def tokenize(batches: Iterable[list[str]], add_special: bool, max_length: int | None) -> Iterator[list[list[int]]]:
        pending: deque = deque()
        for texts in batches:
            pending.append(task.remote(cfg.model, cfg.revision, cfg.trust_remote_code, texts, add_special, max_length))
            if len(pending) >= window:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    return tokenize
