"""One transformers model built at a time per process: `build_model` wraps `from_pretrained`/`from_config`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

# transformers builds a model with process-wide functions swapped for no-ops (PreTrainedModel.tie_weights, torch's
# init functions) and restores them afterwards. Two threads building at once (Dask tasks in one worker process, an
# analysis beside the local executor) can restore the no-op for good: every later model in the process then loads
# with its tied LM head untied (random or on the meta device). Building one model at a time avoids it.
_BUILD_LOCK = threading.RLock()


def build_model(build: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """`build(*args, **kwargs)` (a transformers `from_pretrained`/`from_config`) with no other model being built in
    this process at the same time."""
    with _BUILD_LOCK:
        return build(*args, **kwargs)
