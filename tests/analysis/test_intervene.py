"""Interventions equal an oracle written here: each stored sequence alone through a freshly loaded *ForCausalLM,
with plain torch forward hooks on modules named by hand (not through actstore's hook map), edits written out
per mode, losses and KLs in float64. Tiny random GPT-2, NeoX and Llama causal LMs; packed and unpacked corpora.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers as T

import actstore
from actstore.pipeline.analysis.directions import Direction
from actstore.pipeline.analysis.intervene import intervene
from actstore.workers.interventions import Edit, Intervener, edited
from tests.support import corpus_texts, extract_local

CTX = 24
POST, PRE = "blocks.1.hook_resid_post", "blocks.1.hook_resid_pre"


def _block(lm, kind: str, i: int):
    """Block i of the causal LM, by hand."""
    return {"gpt2": lambda: lm.transformer.h, "neox": lambda: lm.gpt_neox.layers,
            "llama": lambda: lm.model.layers}[kind]()[i]


def _edit(mode: str, s: float, h: torch.Tensor, u: torch.Tensor | None, value: float, other: torch.Tensor | None):
    """The oracle's edits, in float64, written independently of actstore's."""
    h = h.double()
    if mode == "add":
        return h + s * u
    if mode == "ablate":
        return h - s * (h @ u)[..., None] * u
    if mode == "clamp":
        return h + s * (value - h @ u)[..., None] * u
    if mode == "zero":
        return h - s * h
    return h + s * (other - h)  # patch / mean


_LMS: dict[str, torch.nn.Module] = {}


def _oracle(model: str, kind: str, seqs: list[np.ndarray], hook: str, mode: str, scale: float,
            u: np.ndarray | None = None, value: float = 0.0, src: list[np.ndarray] | None = None,
            mean: np.ndarray | None = None) -> dict[str, float]:
    lm = _LMS.get(model) or _LMS.setdefault(model, T.AutoModelForCausalLM.from_pretrained(model).eval())
    block = _block(lm, kind, 1)
    ut = None if u is None else torch.as_tensor(u, dtype=torch.float64)
    state: dict = {}

    def fn(h):
        other = state.get("src") if mode == "patch" else (None if mean is None else torch.as_tensor(mean).double())
        return _edit(mode, scale, h, ut, value, other).to(h.dtype)

    def post(m, a, out):
        return fn(out) if isinstance(out, torch.Tensor) else (fn(out[0]), *out[1:])

    def pre(m, a, kw):
        return ((fn(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": fn(kw["hidden_states"])})

    nll = kl = agree = n = 0.0
    for i, s in enumerate(seqs):
        x = torch.as_tensor(s, dtype=torch.long)[None]
        with torch.no_grad():
            clean = torch.log_softmax(lm(input_ids=x).logits[0].double(), -1)
            state["src"] = None if src is None else torch.as_tensor(src[i]).double()[None]
            handle = (block.register_forward_hook(post) if hook == POST
                      else block.register_forward_pre_hook(pre, with_kwargs=True))
            try:
                ed = torch.log_softmax(lm(input_ids=x).logits[0].double(), -1)
            finally:
                handle.remove()
        nll += float(-ed[:-1].gather(-1, x[0, 1:, None]).sum())
        kl += float((clean[:-1].exp() * (clean[:-1] - ed[:-1])).sum())
        agree += float((clean[:-1].argmax(-1) == ed[:-1].argmax(-1)).sum())
        n += len(s) - 1
    return {"loss": nll / n, "kl": kl / n, "top1_agreement": agree / n}


def _sequences(store) -> list[np.ndarray]:
    tok = store.tokens()
    seq, ids = tok.column("seq_id").to_numpy(), tok.column("token_id").to_numpy()
    return [ids[seq == s] for s in np.unique(seq)]


def _rows(store, hook) -> list[np.ndarray]:
    seq = store.tokens().column("seq_id").to_numpy()
    x = store.to_numpy(hook)
    return [x[seq == s] for s in np.unique(seq)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return [t[:300] for t in corpus_texts(5, min_len=40)]


@pytest.mark.parametrize("kind,packing", [("gpt2", True), ("gpt2", False), ("neox", True), ("llama", False)])
def test_direction_modes_equal_the_oracle(tiny_lm, tmp_path, corpus, kind, packing):
    model = tiny_lm(kind)
    store = extract_local(model, tmp_path / "s", [POST, PRE], corpus, context_length=CTX, packing=packing)
    u = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    u /= np.linalg.norm(u)
    path = Direction(u * 3, None, "manual").save(tmp_path / "v.safetensors")
    table = intervene({"model": model, "corpus": corpus, "hooks": [POST, PRE], "mode": ["add", "ablate", "clamp",
                       "zero"], "scales": [0, 0.5, 2], "direction": path, "value": 1.5, "executor": "local",
                       "context_length": CTX, "packing": packing, "batch_size": 3, "progress": False})
    assert table.num_rows == 2 * 4 * 3
    seqs = _sequences(store)
    clean = _oracle(model, kind, seqs, POST, "zero", 0.0)["loss"]
    for r in table.to_pylist():
        vec = u * 3 if r["mode"] == "add" else u
        ref = _oracle(model, kind, seqs, r["hook"], r["mode"], r["scale"], vec, 1.5)
        for key in ("loss", "kl", "top1_agreement"):
            assert r[key] == pytest.approx(ref[key], abs=1e-6), (r["hook"], r["mode"], r["scale"], key)
        assert r["delta_loss"] == pytest.approx(ref["loss"] - clean, abs=1e-6)
        if r["scale"] == 0:  # the clean forward, bit for bit
            assert (r["delta_loss"], r["kl"], r["top1_agreement"]) == (0.0, 0.0, 1.0)
    assert {r["n_tokens"] for r in table.to_pylist()} == {sum(len(s) - 1 for s in seqs)}


def test_patch_and_mean_equal_the_oracle(tiny_lm, tiny, tmp_path, corpus):
    """Patch from another model's store of the same tokens (same tokenizer), and mean-ablate."""
    model = tiny_lm("gpt2")
    store = extract_local(model, tmp_path / "s", [POST], corpus, context_length=CTX)
    other = extract_local(tiny("gpt2"), tmp_path / "o", [POST], corpus, context_length=CTX)
    table = intervene({"model": model, "corpus": corpus, "hooks": [POST], "mode": ["patch", "mean"],
                       "scales": [0.5, 1], "source_store": str(other.url), "executor": "local", "context_length": CTX,
                       "progress": False})
    seqs, src = _sequences(store), _rows(other, POST)
    special = store.special_mask()
    mean = other.to_numpy(POST)[~special].astype(np.float64).mean(0)
    for r in table.to_pylist():
        ref = _oracle(model, "gpt2", seqs, POST, r["mode"], r["scale"], src=src, mean=mean)
        for key in ("loss", "kl", "top1_agreement"):
            assert r[key] == pytest.approx(ref[key], abs=1e-6), (r["mode"], r["scale"], key)
        assert r["kl"] > 0


def test_mean_from_a_clean_pass_and_positions(tiny_lm, tmp_path, corpus):
    """Without a source store the mean is the corpus' own (non-special tokens); positions restrict the edit."""
    model = tiny_lm("gpt2")
    store = extract_local(model, tmp_path / "s", [POST], corpus, context_length=CTX)
    table = intervene({"model": model, "corpus": corpus, "hooks": [POST], "mode": "mean", "scales": [1],
                       "executor": "local", "context_length": CTX, "progress": False})
    mean = store.to_numpy(POST)[~store.special_mask()].astype(np.float64).mean(0)
    ref = _oracle(model, "gpt2", _sequences(store), POST, "mean", 1.0, mean=mean)
    assert table.column("loss")[0].as_py() == pytest.approx(ref["loss"], abs=1e-5)
    last = intervene({"model": model, "corpus": corpus, "hooks": [POST], "mode": "zero", "scales": [1],
                      "positions": [-1], "executor": "local", "context_length": CTX, "progress": False})
    # the last position of a sequence predicts nothing, and no later position reads it: no effect at all
    assert last.column("kl")[0].as_py() == 0.0 and last.column("delta_loss")[0].as_py() == 0.0


def test_scale_zero_is_the_plain_forward_and_zero_gives_zeros(tiny_lm):
    lm = T.AutoModelForCausalLM.from_pretrained(tiny_lm("llama")).eval()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        plain = lm(input_ids=ids, use_cache=False).logits
    iv = Intervener(lm, [POST, PRE])
    v = torch.randn(1, 32)
    seen = {}
    probe = _block(lm, "llama", 1).register_forward_hook(
        lambda m, a, out: seen.__setitem__("h", (out if isinstance(out, torch.Tensor) else out[0]).clone()))
    edits = {POST: Edit("add", 0.0, vectors=v), PRE: Edit("ablate", 0.0, basis=v / v.norm())}
    assert torch.equal(iv.logits(ids, None, edits), plain.float())
    iv.logits(ids, None, {POST: Edit("zero", 1.0)})
    assert torch.equal(seen["h"], torch.zeros_like(seen["h"]))
    probe.remove()
    iv.close()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids, use_cache=False).logits, plain)  # hooks removed
    h = torch.randn(3, 5, 32)
    assert edited(h, Edit("clamp", 0.0, basis=v / v.norm(), value=9.0)) is h


def test_generate_and_outputs(tiny_lm, tmp_path, corpus):
    model = tiny_lm("gpt2")
    v = np.random.default_rng(1).standard_normal(32).astype(np.float32)  # not constant: LayerNorm removes those
    path = Direction(v, POST, "manual").save(tmp_path / "v.safetensors")
    out = tmp_path / "res"
    cfg = {"model": model, "corpus": corpus, "hooks": [POST], "mode": "add", "scales": [0, 8], "direction": path,
           "executor": "local", "context_length": CTX, "packing": False, "progress": False, "topk": 4,
           "generate": {"max_new_tokens": 6, "n_prompts": 2}, "out": str(out)}
    table = intervene(cfg)
    gens = table.column("generations").to_pylist()
    assert len(gens) == 2 and all(len(g) == 2 for g in gens)
    assert gens[0] != gens[1]  # a large push changes the greedy continuations
    assert intervene(cfg).column("generations").to_pylist() == gens  # deterministic
    row = table.to_pylist()[1]
    assert len(row["top_increased"]) == 4 and row["top_increased"][0]["delta_prob"] > 0 > row["top_decreased"][0]["delta_prob"]
    assert pq.read_table(out / "intervene.parquet").equals(table)
    import json

    saved = json.loads((out / "intervene.json").read_text())
    assert saved["provenance"]["kind"] == "intervene" and len(saved["prompts"]) == 2


def test_bad_inputs_refused_before_any_work(tiny_lm, tmp_path, corpus):
    model = tiny_lm("gpt2")
    base = {"model": model, "corpus": corpus, "hooks": [POST], "executor": "local", "progress": False}
    wide = Direction(np.ones(16, np.float32), POST, "manual").save(tmp_path / "w.safetensors")
    other = Direction(np.ones(32, np.float32), "blocks.0.hook_resid_post", "manual").save(tmp_path / "o.safetensors")
    with pytest.raises(actstore.ConfigError, match="width 16 but hook"):
        intervene({**base, "mode": "add", "scales": [1], "direction": wide})
    with pytest.raises(actstore.HookNameError, match="was made at 'blocks.0.hook_resid_post'"):
        intervene({**base, "mode": "add", "scales": [1], "direction": other})
    assert intervene({**base, "mode": "add", "scales": [0], "direction": other, "any_hook": True}).num_rows == 1
    with pytest.raises(actstore.ConfigError, match="scales: give at least one scale"):
        intervene({**base, "mode": "zero", "scales": []})
    with pytest.raises(actstore.ConfigError, match="mode add needs a direction"):
        intervene({**base, "mode": "add", "scales": [1]})
    with pytest.raises(actstore.ConfigError, match="not a direction file"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk")
        intervene({**base, "mode": "add", "scales": [1], "direction": str(tmp_path / "junk.safetensors")})
    with pytest.raises(actstore.HookNameError, match="out of range"):
        intervene({**base, "hooks": ["blocks.7.hook_resid_post"], "mode": "zero", "scales": [1]})


@pytest.mark.ray
@pytest.mark.slow
def test_ray_executor_gives_the_local_table(tiny_lm, corpus, ray_local):
    cfg = {"model": tiny_lm("gpt2"), "corpus": corpus, "hooks": [POST], "mode": ["zero", "mean"],
           "scales": [0, 1], "context_length": CTX, "shard_tokens": 48, "progress": False, "topk": 3}
    local = intervene({**cfg, "executor": "local"})
    ray = intervene({**cfg, "executor": "ray", "num_workers": 2})
    assert ray.equals(local)
