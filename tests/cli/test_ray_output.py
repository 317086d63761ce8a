"""`actstore extract` on the Ray executor prints actstore's own progress and errors only; Ray's messages go to a
log file that is named when the run fails."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.ray
RAY_NOISE = re.compile(r"INFO|WARNING|core_worker|Token authentication|raylet|streaming_executor|\(pid=")


def _extract(tmp_path, model: str, corpus, **kw) -> subprocess.CompletedProcess:
    cfg = {"model": model, "corpus": corpus, "hooks": ["blocks.0.hook_resid_post"], "context_length": 32,
           "shard_tokens": 256, "executor": "ray", "output": str(tmp_path / "out"), **kw}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "actstore", "extract", str(path)], capture_output=True, text=True,
                          timeout=600)


def test_only_actstore_speaks(tmp_path, tiny, texts):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in texts[:4]))
    res = _extract(tmp_path, tiny("gpt2"), str(corpus))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [x for x in res.stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert lines and all(x.startswith("extract:") for x in lines), lines  # the progress bar, nothing else
    assert not RAY_NOISE.search(res.stderr) and res.stdout.startswith("wrote Store(")


def test_a_failure_names_ray_logs_in_one_line_each(tmp_path, tiny, texts):
    # a model whose weights overflow float16 fails inside the actors, after Ray started
    import torch
    import transformers as T

    model = T.AutoModel.from_pretrained(tiny("gpt2"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e4)
    big = tmp_path / "big"
    model.save_pretrained(big)
    T.AutoTokenizer.from_pretrained(tiny("gpt2")).save_pretrained(big)
    res = _extract(tmp_path, str(big), texts[:2], dtype="float16")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [x for x in res.stderr.replace("\r", "\n").splitlines() if x.strip() and not x.startswith("extract:")]
    assert lines[-1].startswith("actstore: error:") and "float16" in lines[-1], lines
    assert any("Ray's messages for this run:" in x and ".log" in x for x in lines), lines
    assert not RAY_NOISE.search("\n".join(x for x in lines if "Ray's messages" not in x)), lines
