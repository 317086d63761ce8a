"""Shared fixtures: tiny model directories (built once per session), a real stdlib corpus, a local S3 server
(moto, one per session) and a private local Ray (one per test module that asks for it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that finish early sleep instead of spinning: on a busy machine (CI neighbours, Ray and Dask
# workers started by the tests) spinning threads steal the cores the working ones wait for. Set before torch
# loads; child processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.support import build_tiny, build_tiny_lm, corpus_texts, minilm_path  # noqa: E402


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny(model_root):
    """tiny(kind) -> path of a tiny random model: gpt2, neox, neox_seq, llama, bert."""
    return lambda kind: build_tiny(kind, model_root)


@pytest.fixture(scope="session")
def tiny_lm(model_root):
    """tiny_lm(kind) -> path of a tiny random causal LM (with its LM head): gpt2, neox, neox_seq, llama."""
    return lambda kind: build_tiny_lm(kind, model_root)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return corpus_texts(12)


@pytest.fixture(scope="session")
def minilm() -> str:
    return minilm_path()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL of a local S3 protocol server (moto's threaded server on a free port) shared by the session.

    Tests keep apart by bucket; `tests.support.s3_options` builds the s3fs options for it.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A private local Ray for one test module: started once (each start costs seconds), stopped at its end.

    Fractional CPUs are the executor's own choice; two CPU slots keep the pool and Ray Data's tasks moving.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 << 20,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: tiny models run fastest that way, and on a busy machine idle OpenMP
    threads spin for nothing. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
