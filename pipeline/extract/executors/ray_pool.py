"""Ray executor: a streaming Ray Data pipeline, parts -> read/tokenize/pack tasks -> model actors -> driver.

Reading tasks (`flat_map`, a fraction of a CPU each) turn corpus parts into shard rows as the parts are read, so
the first shards are written while later parts are still being read; an autoscaling pool of model actors runs
them. Each actor holds one model, runs one forward at a time and writes finished shards on writer threads while
it runs the next (`shards_in_flight` calls at once); it writes straight to the store, and only a small result row
(shard id, its record, token count) comes back through Ray, never activations or token ids. The driver keeps
per-part bookkeeping only (`part_records.PartTracker`).

Pool shape: one actor per GPU on GPU clusters; on CPU clusters one per node using all of its CPUs (or one per
`threads_per_worker` CPUs), spread over the nodes; `min_workers`/`max_workers` let the pool grow when an
autoscaler adds nodes. A CPU actor's torch thread count never depends on the pool size, so its bytes equal the
local executor's. Without `ray_address`/RAY_ADDRESS a private local Ray is started (never a bare `ray.init()`,
which would join any other Ray on the machine) and stopped afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import ActstoreError
from actstore.workers.part_task import PartJob, part_rows, plan_row
from actstore.workers.parts import Part
from actstore.workers.tokenize import ShardPlan

log = logging.getLogger("actstore")
READ_TASK_CPUS = 0.25  # small: reading must not wait for CPU slots that model actors hold
ROW_BLOCK_BYTES = 64 << 10  # a shard row leaves its reading task as soon as it is complete (Ray's default: 128 MiB)


class ShardActor:
    """Ray Data actor: builds the shard worker (model loaded at its first shard) once, then one row per call.

    With `append_tag` (`append: hooks`) it adds the config's hooks to committed shards instead of writing them."""

    def __init__(self, cfg: dict[str, Any], pad_id: int, threads: int, append_tag: str | None = None) -> None:
        import torch

        from actstore.pipeline.extract.executors.local import make_worker
        from actstore.workers import storage

        # Ray sets OMP_NUM_THREADS from num_cpus; size torch explicitly, never above this node's cores
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, min(threads, cores)) if threads > 0 else cores)
        self.cfg = ExtractConfig.model_validate(cfg)
        fs, root = storage.get_fs(self.cfg.output, self.cfg.storage_options)
        self.worker = make_worker(self.cfg, pad_id, fs, root, append_tag)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.worker.process({k: v[i] for k, v in batch.items()}) for i in range(len(batch["state"]))]
        return {k: np.array([r[k] for r in out] if k != "node" else [self.node] * len(out))
                for k in (*out[0], "node")} if out else {}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.worker.close()


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, revision: str | None, trust: bool) -> tuple[Any, Any]:
    from actstore.workers.runner import load_tokenizer
    from actstore.workers.tokenize import special_ids

    tok = load_tokenizer(model, revision, trust)
    return tok, special_ids(tok)


def read_part_rows(row: dict[str, Any], job: dict[str, Any], output: str,
                   storage_options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """flat_map function: one part in, its shard rows out (streamed)."""
    import json

    from actstore.workers import storage

    pjob = PartJob.from_dict(job)
    tok, special = _tokenizer(pjob.model, pjob.revision, pjob.trust_remote_code)
    fs, root = storage.get_fs(output, storage_options)
    expected = json.loads(row["expected"]) if row["expected"] else None
    yield from part_rows(Part.from_json(row["part"]), pjob, tok, special, fs, root, expected)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join `address`, reuse an already-initialised Ray, or start (and stop) a private local one.

    Ray's own output (INFO lines, warnings, the driver's C++ log lines) goes to a log file instead of the
    terminal unless actstore runs verbose (-v); on a failure that file's path and Ray's session logs are named."""
    if ray.is_initialized():
        yield
        return
    kw: dict[str, Any] = {"address": address} if address else {
        "address": "local", "include_dashboard": False, "object_store_memory": 256 << 20}
    verbose = logging.getLogger("actstore").isEnabledFor(logging.INFO)
    with _ray_output_to_file(verbose) as logfile:
        ray.init(log_to_driver=False, configure_logging=False, **kw)
        try:
            yield
        except BaseException:
            log.warning("Ray's messages for this run: %s; its session logs: %s", logfile, _session_logs())
            raise
        finally:
            ray.shutdown()


@contextlib.contextmanager
def _ray_output_to_file(verbose: bool) -> Iterator[str]:
    """Send what Ray prints to a log file: its Python loggers, Ray Data's console handler and, at the file
    descriptor level, the driver's C++ log lines. actstore's own stderr (progress bar, warnings, errors) is
    moved to a duplicate of the terminal so it still shows."""
    if verbose:
        yield "(the terminal: -v)"
        return
    import ray.data  # noqa: F401  (configures the ray.data logger, whose console handler is set aside below)

    path = os.path.join(tempfile.gettempdir(), f"actstore-ray-{os.getpid()}-{int(time.time())}.log")
    data_logger = logging.getLogger("ray.data")
    console = [h for h in data_logger.handlers if isinstance(h, logging.StreamHandler)]
    ray_level = logging.getLogger("ray").level
    for h in console:
        data_logger.removeHandler(h)
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        with open(path, "ab", buffering=0) as logf, _fd2_redirected(logf.fileno()):
            yield path
        os.remove(path)  # a run that worked needs no record of Ray's chatter; a failed one keeps it
    finally:
        for h in console:
            data_logger.addHandler(h)
        logging.getLogger("ray").setLevel(ray_level)


@contextlib.contextmanager
def _fd2_redirected(target_fd: int) -> Iterator[None]:
    """Point file descriptor 2 at `target_fd`; Python's stderr (and logging handlers writing to it) keep the
    terminal through a duplicate of the original descriptor. A no-op when stderr is not fd 2 (e.g. captured)."""
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    if not real:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = open(saved, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace", closefd=False)
    old_stderr = sys.stderr
    handlers = [h for h in logging.root.handlers if isinstance(h, logging.StreamHandler) and h.stream is old_stderr]
    os.dup2(target_fd, 2)
    sys.stderr = terminal
    for h in handlers:
        h.setStream(terminal)
    try:
        yield
    finally:
        terminal.flush()
        sys.stderr = old_stderr
        for h in handlers:
            h.setStream(old_stderr)
        os.dup2(saved, 2)
        os.close(saved)


def _session_logs() -> str:
    try:
        return f"{ray._private.worker._global_node.get_session_dir_path()}/logs"  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001  (no local node: a remote cluster keeps them on its head node)
        return "on the Ray head node (ray logs --help)"


@dataclass(frozen=True)
class PoolShape:
    """The actor pool for this cluster."""

    min_size: int
    max_size: int
    resources: dict[str, Any]  # per-actor Ray resources and scheduling
    threads: int  # torch threads per actor (0: all of its node's CPUs)


def _cpu_nodes() -> list[int]:
    """CPUs of every alive node that has some."""
    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]


def pool_shape(cfg: ExtractConfig, same_node: bool) -> PoolShape:
    """The actor pool for this cluster and config. `same_node`: the actors run on this machine (a private Ray)."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if cfg.device.startswith("cuda") or (gpus and cfg.device == "auto"):
        # An explicit cuda device asks for GPU actors even when none is up yet (an autoscaler adds them).
        n = cfg.num_workers or max(1, gpus)
        lo, hi = _bounds(cfg, n)
        return PoolShape(lo, hi, {"num_gpus": 1, "num_cpus": 1}, max(1, cpus // max(n, 1)))
    # A CPU actor never takes a 1/n share of the CPUs: float32 matmuls round differently with different torch
    # thread counts (BLAS splits the sums by thread), so stored bytes would depend on the pool and differ from
    # the local executor's. In a private local Ray it uses this process' torch threads (what the local executor
    # uses); on a cluster `threads_per_worker`, or all of its node's CPUs (0: see ShardActor).
    t = cfg.threads_per_worker
    n = cfg.num_workers or sum(max(1, c // t) if t else 1 for c in _cpu_nodes()) or 1
    lo, hi = _bounds(cfg, n)
    threads = t or (torch_threads() if same_node else 0)
    # Fractional CPUs: Ray Data's reading tasks must find CPU slots beside the actors. SPREAD puts the actors
    # on different nodes (Ray's default packs them onto the first).
    return PoolShape(lo, hi, {"num_cpus": 0.5, "ray_remote_args_fn": lambda: {"scheduling_strategy": "SPREAD"}},
                     threads)


def _bounds(cfg: ExtractConfig, n: int) -> tuple[int, int]:
    if cfg.min_workers is None and cfg.max_workers is None:
        return n, n
    lo = cfg.min_workers or min(n, cfg.max_workers or n)
    return lo, max(lo, cfg.max_workers or n)


def torch_threads() -> int:
    """This process' torch intra-op thread count (what the local executor's forward pass uses)."""
    import torch

    return torch.get_num_threads()


@contextlib.contextmanager
def _small_blocks() -> Iterator[Any]:
    """Ray Data settings for this run: no progress bars, small blocks (restored afterwards)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.target_max_block_size)
    ctx.enable_progress_bars, ctx.target_max_block_size = False, ROW_BLOCK_BYTES
    try:
        yield ctx
    finally:
        ctx.enable_progress_bars, ctx.target_max_block_size = saved


def _actors(ds: Any, cfg: ExtractConfig, pad_id: int, shape: PoolShape, append_tag: str | None, n_rows: int) -> Any:
    from ray.data import ActorPoolStrategy

    hi = max(1, min(shape.max_size, n_rows)) if n_rows else shape.max_size
    compute = ActorPoolStrategy(min_size=min(shape.min_size, hi), max_size=hi,
                                max_concurrent_calls_per_actor=cfg.shards_in_flight,
                                max_tasks_in_flight_per_actor=cfg.shards_in_flight, enable_true_multi_threading=True)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args_fn but names no other way to pass a scheduling strategy; the
        # warning would print through the user's progress bar.
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        return ds.map_batches(
            ShardActor, fn_constructor_kwargs={"cfg": cfg.model_dump(), "pad_id": pad_id, "threads": shape.threads,
                                               "append_tag": append_tag},
            batch_size=1, compute=compute, **shape.resources)


def _drain(out: Any, on_result: Callable[[dict[str, Any]], None]) -> None:
    try:
        for row in out.iter_rows():
            on_result(dict(row))
    except Exception as e:
        cause = _own_error(e)
        if cause is e:
            raise
        raise cause from None  # the task's own one-line cause, not Ray's wrapper and its remote traceback


def run_ray_parts(cfg: ExtractConfig, parts: list[Part], job: PartJob, pad_id: int,
                  on_result: Callable[[dict[str, Any]], None], ray_address: str | None = None,
                  expected: dict[int, list[dict]] | None = None) -> None:
    """Read, plan, run and commit every part of `parts` on the cluster; `on_result` gets every result row."""
    import json

    with ray_session(ray_address), _small_blocks():
        shape = pool_shape(cfg, same_node=ray_address is None)
        items = [{"part": p.to_json(), "expected": json.dumps(expected[p.index]) if expected else ""} for p in parts]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        rows = ds.flat_map(read_part_rows, fn_kwargs={  # type: ignore[arg-type]  # Ray's stubs omit fn_kwargs
            "job": job.to_dict(), "output": cfg.output, "storage_options": cfg.storage_options},
            num_cpus=READ_TASK_CPUS)
        _drain(_actors(rows, cfg, pad_id, shape, job.append_tag, 0), on_result)


def run_ray_plans(cfg: ExtractConfig, todo: list[ShardPlan], pad_id: int, on_result: Callable[[dict[str, Any]], None],
                  ray_address: str | None = None, append_tag: str | None = None) -> None:
    """Run planned shards (format v1 stores, whose whole plan the driver makes) on the actor pool."""
    with ray_session(ray_address), _small_blocks():
        shape = pool_shape(cfg, same_node=ray_address is None)
        ds = ray.data.from_items([plan_row(p, "run") for p in todo], override_num_blocks=max(1, len(todo)))
        _drain(_actors(ds, cfg, pad_id, shape, append_tag, len(todo)), on_result)


_REMOTE_ERROR = re.compile(r"^actstore\.schemas\.errors\.(\w+): (.+)$", re.M)


def _own_error(e: BaseException) -> BaseException:
    """The actstore error a Ray task raised, found through Ray's wrappers (RayTaskError, UserCodeException).

    Ray Data re-raises a task's error as UserCodeException whose original exception does not survive the trip
    to the driver, only its traceback text; the error's class and message are rebuilt from that text."""
    from actstore.schemas import errors

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ActstoreError):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    found = _REMOTE_ERROR.findall(str(e))
    if found and isinstance(getattr(errors, found[-1][0], None), type):
        return getattr(errors, found[-1][0])(found[-1][1])
    return e
