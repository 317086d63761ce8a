"""torch's intra-op thread count, set for a block of work and restored after it.

The count is a process-wide setting: work that runs in the caller's process (local executors, in-process Dask
tasks, tests) must leave it as it found it, or later work in the process silently runs on another count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch threads (None: leave the count alone), restoring the previous count."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
