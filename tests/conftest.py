"""Shared fixtures: tiny model directories (built once per session) and a real stdlib corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "reliability"))
sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models import build_tiny, corpus_texts, minilm_path  # noqa: E402


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny(model_root):
    """tiny(kind) -> path of a tiny random model: gpt2, neox, neox_seq, llama, bert."""
    return lambda kind: build_tiny(kind, model_root)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return corpus_texts(12)


@pytest.fixture(scope="session")
def minilm() -> str:
    return minilm_path()


def extract_local(model: str, out, hooks, corpus, **kw):
    """Run a local extraction with quiet defaults."""
    import actstore

    cfg = dict(model=model, corpus=corpus, hooks=hooks, executor="local", output=str(out), progress=False,
               context_length=32, shard_tokens=256, batch_size=4)
    cfg.update(kw)
    return actstore.extract(cfg)
