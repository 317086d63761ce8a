"""Stored activations equal an independent computation: HF hidden states and hooks written here.

The oracle runs each stored sequence alone (no padding) through a freshly loaded model and reads hook points
through module names spelled out in this file (not through actstore's hook map), plus the residual-stream
identities (resid_mid = resid_pre + attn_out, ...) that must hold for pre-LN blocks.

For the later families (Gemma 1-3, Qwen3, Phi-3, OLMo 2, Mistral) the oracle reads only sublayer and norm
outputs and computes the rest from the definitions: resid_mid = resid_pre + attn_out, and mlp.hook_post =
act(x W_gate^T) * (x W_up^T) from the MLP input and the weights, with the activation named in the config.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

from tests.support import extract_local

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


def _resid_mid(g, i, block):
    return g[f"blocks.{i}.hook_resid_pre"] + g[f"blocks.{i}.hook_attn_out"]


def _same_as_resid_mid(g, i, block):
    return g[f"blocks.{i}.hook_resid_mid"]


_ACTS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _gated_post(g, i, block):
    """act(x W_gate^T) * (x W_up^T) from the weights; Phi-3 stores gate and up as one fused projection."""
    mlp, x = block.mlp, g[f"blocks.{i}.hook_mlp_in"]
    if hasattr(mlp, "gate_up_proj"):
        gate, up = F.linear(x, mlp.gate_up_proj.weight).chunk(2, dim=-1)
    else:
        gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
    cfg = _ORACLE_MODEL[0].config
    return _ACTS[getattr(cfg, "hidden_activation", None) or cfg.hidden_act](gate) * up


# family -> points read from modules, then kinds computed in this order from what was read (kind -> fn(got, i, block))
_PRE_NORM = ({"hook_attn_out": ("self_attn", "out"), "hook_mlp_in": ("post_attention_layernorm", "out"),
              "hook_mlp_out": ("mlp", "out")}, {"hook_resid_mid": _resid_mid, "mlp.hook_post": _gated_post})
_SANDWICH = ({"hook_attn_out": ("post_attention_layernorm", "out"), "hook_mlp_in": ("pre_feedforward_layernorm", "out"),
              "hook_mlp_out": ("post_feedforward_layernorm", "out")},
             {"hook_resid_mid": _resid_mid, "mlp.hook_post": _gated_post})
_POST_NORM = ({"hook_attn_out": ("post_attention_layernorm", "out"), "hook_mlp_out": ("post_feedforward_layernorm", "out")},
              {"hook_resid_mid": _resid_mid, "hook_mlp_in": _same_as_resid_mid, "mlp.hook_post": _gated_post})
LATER = {"gemma": _PRE_NORM, "qwen3": _PRE_NORM, "phi3": _PRE_NORM, "mistral": _PRE_NORM, "gemma2": _SANDWICH,
         "gemma3": _SANDWICH, "olmo2": _POST_NORM}
ORACLE.update({f: ("layers", points, "norm") for f, (points, _) in LATER.items()})
DERIVED = {f: derived for f, (_, derived) in LATER.items()}
_ORACLE_MODEL: list = [None]  # the model the derived kinds read their config from


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
    _ORACLE_MODEL[0] = model
    for i in layers:
        got[f"blocks.{i}.hook_resid_pre"] = hs[i][0]
        got[f"blocks.{i}.hook_resid_post"] = got["final_in"] if (i == n - 1 and final) else hs[i + 1][0]
        with torch.no_grad():
            for kind, fn in DERIVED.get(family, {}).items():
                got[f"blocks.{i}.{kind}"] = fn(got, i, blocks[i])
    return {k: v.numpy() for k, v in got.items()}


def _hooks_for(family: str, layers: list[int]) -> list[str]:
    kinds = [k for k in KINDS if not (family == "neox" and k == "hook_resid_mid")]
    return [f"blocks.{i}.{k}" for i in layers for k in kinds]


@pytest.mark.parametrize("family", ["gpt2", "neox", "neox_seq", "llama", "bert", *LATER])
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


@pytest.mark.parametrize("family", ["gpt2", "neox_seq", "llama", *LATER])
def test_residual_identities(tmp_path, tiny, texts, family):
    """Pre-LN algebra: resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out, row by row (also
    for the sandwich- and post-normed families, whose attn_out / mlp_out are what is added to the stream)."""
    store = extract_local(tiny(family), tmp_path / "s", _hooks_for(family, [1]), texts[:3])
    a = {k.split(".", 2)[2]: store.activations(k).compute() for k in store.hooks}
    np.testing.assert_allclose(a["hook_resid_mid"], a["hook_resid_pre"] + a["hook_attn_out"], atol=1e-5)
    np.testing.assert_allclose(a["hook_resid_post"], a["hook_resid_mid"] + a["hook_mlp_out"], atol=1e-5)
    if family == "olmo2":  # no norm before the MLP: it reads the stream itself
        np.testing.assert_array_equal(a["hook_mlp_in"], a["hook_resid_mid"])
    if family in ("gemma2", "gemma3"):  # the MLP reads the stream through pre_feedforward_layernorm
        assert not np.allclose(a["hook_mlp_in"], a["hook_resid_mid"])


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_gemma_embedding_scaling(tmp_path, tiny, texts, family):
    """Gemma multiplies its embeddings by sqrt(d_model) before block 0: resid_pre of block 0 is the scaled row."""
    model_dir = tiny(family)
    store = extract_local(model_dir, tmp_path / "s", ["blocks.0.hook_resid_pre"], texts[:2])
    emb = _load(model_dir).get_input_embeddings().weight.detach()
    ids = torch.as_tensor(store.tokens().column("token_id").to_numpy(), dtype=torch.long)
    want = emb[ids] * torch.tensor(emb.shape[1] ** 0.5, dtype=emb.dtype)
    np.testing.assert_allclose(store.activations("blocks.0.hook_resid_pre").compute(), want.numpy(), rtol=1e-6,
                               atol=1e-6)
    assert not np.allclose(want.numpy(), emb[ids].numpy())


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
