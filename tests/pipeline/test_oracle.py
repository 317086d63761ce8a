"""Stored activations equal an independent computation: HF hidden states and hooks written here.

The oracle runs each stored sequence alone (no padding) through a freshly loaded model and reads hook points
through module names spelled out in this file (not through actstore's hook map), plus the residual-stream
identities (resid_mid = resid_pre + attn_out, ...) that must hold for pre-LN blocks.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers as T
from conftest import extract_local

KINDS = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "mlp.hook_post", "hook_mlp_out",
         "hook_resid_post"]
# family -> (blocks path, {kind: (module path in block, "in"/"out")}, final norm path)
ORACLE = {
    "gpt2": ("h", {"hook_attn_out": ("attn", "out"), "hook_resid_mid": ("ln_2", "in"), "hook_mlp_in": ("mlp", "in"),
                   "mlp.hook_post": ("mlp.act", "out"), "hook_mlp_out": ("mlp", "out")}, "ln_f"),
    "neox": ("layers", {"hook_attn_out": ("attention", "out"), "hook_mlp_in": ("mlp", "in"),
                        "mlp.hook_post": ("mlp.act", "out"), "hook_mlp_out": ("mlp", "out")}, "final_layer_norm"),
    "neox_seq": ("layers", {"hook_attn_out": ("attention", "out"), "hook_resid_mid": ("post_attention_layernorm", "in"),
                            "hook_mlp_in": ("mlp", "in"), "mlp.hook_post": ("mlp.act", "out"),
                            "hook_mlp_out": ("mlp", "out")}, "final_layer_norm"),
    "llama": ("layers", {"hook_attn_out": ("self_attn", "out"), "hook_resid_mid": ("post_attention_layernorm", "in"),
                         "hook_mlp_in": ("mlp", "in"), "mlp.hook_post": ("mlp.down_proj", "in"),
                         "hook_mlp_out": ("mlp", "out")}, "norm"),
    "bert": ("encoder.layer", {"hook_attn_out": ("attention.output.dense", "out"),
                               "hook_resid_mid": ("attention.output.LayerNorm", "out"),
                               "hook_mlp_in": ("intermediate.dense", "in"),
                               "mlp.hook_post": ("intermediate.intermediate_act_fn", "out"),
                               "hook_mlp_out": ("output.dense", "out")}, None),
}


def _first(x):
    return x if isinstance(x, torch.Tensor) else x[0]


@functools.lru_cache(maxsize=2)
def _load(model_dir: str):
    return T.AutoModel.from_pretrained(model_dir).eval()


def oracle(model_dir: str, family: str, seq: np.ndarray, layers: list[int]) -> dict[str, np.ndarray]:
    model = _load(model_dir)
    blocks_path, points, final = ORACLE[family]
    blocks = model.get_submodule(blocks_path)
    got: dict[str, np.ndarray] = {}
    handles = []

    def grab(name, where):
        if where == "in":
            return lambda m, a, kw: got.__setitem__(name, (a[0] if a else kw["hidden_states"])[0].clone())
        return lambda m, a, o: got.__setitem__(name, _first(o)[0].clone())

    for i in layers:
        for kind, (path, where) in points.items():
            mod = blocks[i].get_submodule(path)
            fn = grab(f"blocks.{i}.{kind}", where)
            handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True) if where == "in"
                           else mod.register_forward_hook(fn))
    if final:
        handles.append(model.get_submodule(final).register_forward_pre_hook(
            grab("final_in", "in"), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor(seq[None], dtype=torch.long), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    n = len(blocks)
    for i in layers:
        got[f"blocks.{i}.hook_resid_pre"] = hs[i][0]
        got[f"blocks.{i}.hook_resid_post"] = got["final_in"] if (i == n - 1 and final) else hs[i + 1][0]
    return {k: v.numpy() for k, v in got.items()}


def _hooks_for(family: str, layers: list[int]) -> list[str]:
    kinds = [k for k in KINDS if not (family == "neox" and k == "hook_resid_mid")]
    return [f"blocks.{i}.{k}" for i in layers for k in kinds]


@pytest.mark.parametrize("family", ["gpt2", "neox", "neox_seq", "llama", "bert"])
@pytest.mark.parametrize("packing", [True, False])
def test_matches_oracle(tmp_path, tiny, texts, family, packing):
    model_dir = tiny(family)
    layers = [0, 2]  # first and last block (last: resid_post before the final norm)
    hooks = _hooks_for(family, layers)
    store = extract_local(model_dir, tmp_path / "s", hooks, texts[:6], packing=packing, context_length=24,
                          shard_tokens=96)
    tokens = store.tokens().to_pandas()
    acts = {h: store.activations(h).compute() for h in hooks}
    assert store.n_tokens == len(tokens) and all(a.shape[0] == len(tokens) for a in acts.values())
    for seq_id, grp in list(tokens.groupby("seq_id"))[:8]:
        assert grp["position"].tolist() == list(range(len(grp)))
        ref = oracle(model_dir, family, grp["token_id"].to_numpy(), layers)
        rows = grp.index.to_numpy()
        for h in hooks:
            np.testing.assert_allclose(acts[h][rows], ref[h], rtol=1e-6, atol=1e-6, err_msg=f"{family} {h} seq {seq_id}")


@pytest.mark.parametrize("family", ["gpt2", "neox_seq", "llama"])
def test_residual_identities(tmp_path, tiny, texts, family):
    """Pre-LN algebra: resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out, row by row."""
    store = extract_local(tiny(family), tmp_path / "s", _hooks_for(family, [1]), texts[:3])
    a = {k.split(".", 2)[2]: store.activations(k).compute() for k in store.hooks}
    np.testing.assert_allclose(a["hook_resid_mid"], a["hook_resid_pre"] + a["hook_attn_out"], atol=1e-5)
    np.testing.assert_allclose(a["hook_resid_post"], a["hook_resid_mid"] + a["hook_mlp_out"], atol=1e-5)


def test_parallel_residual_identity(tmp_path, tiny, texts):
    """Parallel NeoX blocks: resid_post = resid_pre + attn_out + mlp_out."""
    store = extract_local(tiny("neox"), tmp_path / "s", _hooks_for("neox", [1]), texts[:3])
    a = {k.split(".", 2)[2]: store.activations(k).compute() for k in store.hooks}
    np.testing.assert_allclose(a["hook_resid_post"], a["hook_resid_pre"] + a["hook_attn_out"] + a["hook_mlp_out"],
                               atol=1e-5)


def test_minilm_matches_oracle(tmp_path, minilm, texts):
    """The real trained MiniLM-L6 (BERT family) from its package."""
    hooks = _hooks_for("bert", [0, 5])
    store = extract_local(minilm, tmp_path / "s", hooks, texts[:3], packing=False, context_length=64)
    tokens = store.tokens().to_pandas()
    acts = {h: store.activations(h).compute() for h in hooks}
    for _, grp in tokens.groupby("seq_id"):
        ref = oracle(minilm, "bert", grp["token_id"].to_numpy(), [0, 5])
        for h in hooks:
            np.testing.assert_allclose(acts[h][grp.index.to_numpy()], ref[h], rtol=1e-5, atol=1e-5, err_msg=h)
