"""SAE/transcoder training from stores: CE/KL anchors, bounded memory, kill-and-resume, CLI sweep, export."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import actstore
from actstore.pipeline.analysis.splice import load_causal_lm, splice_scores
from tests.support import extract_local


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory, tiny, texts):
    return extract_local(tiny("gpt2"), tmp_path_factory.mktemp("lm") / "s",
                         ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"], texts[:8])


def test_ce_kl_anchor_points(tiny, lm_store):
    """A perfect reconstruction scores CE 1.0 and KL 1.0; zero-ablation scores 0.0 (tiny random causal LM)."""
    lm = load_causal_lm(tiny("gpt2"))
    tok = lm_store.tokens()
    seq, ids = tok.column("seq_id").to_numpy(), tok.column("token_id").to_numpy()
    seqs = [ids[seq == s] for s in np.unique(seq)[:3]]
    for hook in ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_in"):
        perfect = splice_scores(lm, seqs, hook, lambda t: t.clone())
        assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
        assert perfect["kl_score"] == pytest.approx(1.0, abs=1e-6)
        zero = splice_scores(lm, seqs, hook, torch.zeros_like)
        assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6) and zero["kl_score"] == pytest.approx(0.0, abs=1e-6)
        assert perfect["ce_loss_with_ablation"] != perfect["ce_loss_clean"]


def test_train_sae_on_store_exports_and_scores(lm_store, tmp_path):
    res = actstore.train_sae(lm_store, "blocks.1.hook_resid_post", expansion=4, k=8, training_tokens=30000,
                             batch_size=1024, out_dir=str(tmp_path / "sae"), n_eval_seqs=3)
    m = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    for key in ("fvu", "ev_legacy", "ev_zero_centred", "l0", "dead_fraction", "cosine", "l2_ratio", "ce_loss_score",
                "kl_score"):
        assert key in m and m[key] == pytest.approx(res.metrics[key])
    assert m["l0"] == pytest.approx(8.0) and m["fvu"] < 0.9
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["d_in"] == 32 and cfg["d_sae"] == 128
    w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (32, 128) and w["W_dec"].shape == (128, 32)
    meta = json.loads((tmp_path / "sae" / "actstore.json").read_text())
    assert lm_store.url in json.dumps(meta)


def test_transcoder_on_store(lm_store):
    res = actstore.train_transcoder(lm_store, "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out", expansion=4, k=8,
                                    training_tokens=20000, batch_size=1024, skip=True, n_eval_seqs=2)
    assert res.sae.W_skip.shape == (32, 32) and np.isfinite(res.metrics["fvu"]) and "ce_loss_score" in res.metrics


def test_store_larger_than_loader_budget(tmp_path):
    """Training reads through a bounded buffer: peak numpy memory stays far below the store size."""
    n, d = 1_000_000, 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    store = actstore.from_arrays({"blocks.0.hook_resid_post": x}, str(tmp_path / "big"), shard_tokens=250_000)
    del x
    tracemalloc.start()
    actstore.train_sae(store, "blocks.0.hook_resid_post", expansion=2, k=4, training_tokens=60_000, batch_size=2048,
                       buffer_rows=8192, eval_fraction=0.02)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.25 * n * d * 4, f"peak {peak / 1e6:.1f} MB for a {n * d * 4 / 1e6:.1f} MB store"


def _train_cmd(store: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "actstore", "train", "sae", "--store", store, "--hook", "blocks.1.hook_resid_post",
            "--expansion", "4", "--k", "8", "--training-tokens", "150000", "--batch-size", "512",
            "--checkpoint-every", "20", "--threads", "1", "--out", str(out)]


@pytest.mark.dask
def test_kill_training_task_and_resume(lm_store, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(lm_store.url, ref), check=True, capture_output=True)
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(lm_store.url, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = next(out.glob("*/checkpoints"), None)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        latest = next(out.glob("*/checkpoints/latest.json"), None)
        if latest and json.loads(latest.read_text())["step"] >= 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    import os

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = json.loads(latest.read_text())["step"]
    assert not list(out.glob("*/metrics.json"))
    res = subprocess.run(_train_cmd(lm_store.url, out), check=True, capture_output=True, text=True)
    first_step = min(int(line.split("step ")[1].split("/")[0]) for line in res.stderr.splitlines() if "] step " in line)
    assert first_step > step_at_kill  # resumed, did not start over
    a = load_file(str(next(ref.glob("*/sae_weights.safetensors"))))
    b = load_file(str(next(out.glob("*/sae_weights.safetensors"))))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.dask
def test_cli_sweep(lm_store, tmp_path, capsys):
    from actstore.cli import main

    code = main(["train", "sae", "--store", lm_store.url, "--hook", "blocks.1.hook_resid_post", "--expansion", "2",
                 "--training-tokens", "8000", "--batch-size", "1024", "--sweep", "k=4,8", "--out", str(tmp_path),
                 "--threads", "1", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["k"] for r in rows) == [4, 8]
    assert [r["l0"] for r in sorted(rows, key=lambda r: r["k"])] == pytest.approx([4.0, 8.0])
    assert len(list(tmp_path.glob("*/cfg.json"))) == 2


def test_hook_defaults_to_the_only_stored_hook(tmp_path, lm_store):
    """A one-hook store needs no hook (Python and CLI); a store of several names them in a one-line error."""
    from actstore.cli import main

    x = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)
    one = actstore.from_arrays({"blocks.0.hook_resid_post": x}, str(tmp_path / "one"))
    res = actstore.train_sae(one, expansion=2, k=4, training_tokens=8192, batch_size=1024)
    assert res.hooks == ["blocks.0.hook_resid_post"]
    code = main(["train", "sae", "--store", one.url, "--expansion", "2", "--k", "4", "--training-tokens", "4096",
                 "--batch-size", "1024", "--threads", "1", "--out", str(tmp_path / "sae")])
    assert code == 0 and [p.parent.name for p in (tmp_path / "sae").glob("*/cfg.json")] != []
    with pytest.raises(actstore.ConfigError, match="the store holds 3 hooks .*blocks.1.hook_mlp_in.*--hook"):
        actstore.train_sae(lm_store, expansion=2, k=4)
