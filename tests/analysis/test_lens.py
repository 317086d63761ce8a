"""The logit lens against an oracle: the model's hidden states (output_hidden_states) through its own final norm
and LM head, per sequence, in float64; the last block reproduces the model exactly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers as T

import actstore
from actstore.pipeline.analysis.lens import logit_lens
from tests.support import corpus_texts, extract_local

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _norm_head(lm, kind):
    return {"gpt2": lambda: (lm.transformer.ln_f, lm.lm_head), "llama": lambda: (lm.model.norm, lm.lm_head),
            "neox_seq": lambda: (lm.gpt_neox.final_layer_norm, lm.get_output_embeddings())}[kind]()


def _oracle(model: str, kind: str, store) -> dict[str, dict[str, float]]:
    """hidden_states[i] is block i's input; hidden_states[-1] is after the final norm, so the last block's own
    output is taken with a forward hook, and resid_mid with a pre-hook on the MLP's norm."""
    lm = T.AutoModelForCausalLM.from_pretrained(model).eval()
    norm, head = _norm_head(lm, kind)
    blocks = {"gpt2": lambda: lm.transformer.h, "llama": lambda: lm.model.layers,
              "neox_seq": lambda: lm.gpt_neox.layers}[kind]()
    mid_mod = blocks[1].ln_2 if kind == "gpt2" else blocks[1].post_attention_layernorm
    cap = {}
    h1 = blocks[2].register_forward_hook(lambda m, a, o: cap.__setitem__("last", o if torch.is_tensor(o) else o[0]))
    h2 = mid_mod.register_forward_pre_hook(lambda m, a: cap.__setitem__("mid", a[0]))
    tok = store.tokens()
    seq, ids = tok.column("seq_id").to_numpy(), tok.column("token_id").to_numpy()
    sums = {h: np.zeros(4) for h in HOOKS}
    n = 0
    for s in np.unique(seq):
        x = torch.as_tensor(ids[seq == s], dtype=torch.long)[None]
        with torch.no_grad():
            out = lm(input_ids=x, output_hidden_states=True)
            final = torch.log_softmax(out.logits[0, :-1].double(), -1)
            hs = {HOOKS[0]: out.hidden_states[0], HOOKS[1]: cap["mid"], HOOKS[2]: out.hidden_states[2],
                  HOOKS[3]: cap["last"]}
            for h, v in hs.items():
                lp = torch.log_softmax(head(norm(v))[0, :-1].double(), -1)
                sums[h] += [float(-lp.gather(-1, x[0, 1:, None]).sum()), float((final.exp() * (final - lp)).sum()),
                            float((lp.argmax(-1) == final.argmax(-1)).sum()), float(-(lp.exp() * lp).sum())]
        n += x.shape[1] - 1
    h1.remove()
    h2.remove()
    return {h: dict(zip(("loss", "kl_to_final", "top1_agreement", "entropy"), v / n)) for h, v in sums.items()}


@pytest.mark.parametrize("kind,packing", [("gpt2", True), ("llama", False), ("neox_seq", True)])
def test_lens_equals_oracle_and_the_last_block_is_the_model(tiny_lm, tmp_path, kind, packing):
    model = tiny_lm(kind)
    texts = [t[:300] for t in corpus_texts(4, min_len=40)]
    store = extract_local(model, tmp_path / "s", HOOKS, texts, packing=packing, context_length=24)
    table = logit_lens(store, out=str(tmp_path / "res"), per_token=True, batch_rows=37)
    assert table.column("hook").to_pylist() == HOOKS
    ref = _oracle(model, kind, store)
    for r in table.to_pylist():
        for key in ("loss", "kl_to_final", "top1_agreement", "entropy"):
            assert r[key] == pytest.approx(ref[r["hook"]][key], abs=1e-6), (r["hook"], key)
    last = table.to_pylist()[-1]
    assert last["kl_to_final"] == 0.0 and last["top1_agreement"] == 1.0  # float32 store: exactly the model
    ranks = pq.read_table(tmp_path / "res" / "lens-tokens.parquet")
    assert ranks.num_rows == store.n_tokens
    seq = store.tokens().column("seq_id").to_numpy()
    r = ranks.column("rank/blocks.2.hook_resid_post").to_numpy(zero_copy_only=False)
    last_pos = np.r_[seq[1:] != seq[:-1], True]
    assert np.isnan(r[last_pos]).all() and not np.isnan(r[~last_pos]).any()
    saved = json.loads((tmp_path / "res" / "lens.json").read_text())
    assert saved["provenance"]["store_manifest_sha256"] == store.manifest_sha256


def test_lens_refuses_encoders_and_non_residual_hooks(tiny, tiny_lm, tmp_path):
    enc = extract_local(tiny("bert"), tmp_path / "b", ["blocks.0.hook_resid_post"], ["some words here"])
    with pytest.raises(actstore.AnalysisError, match="does not apply to 'bert'"):
        logit_lens(enc)
    store = extract_local(tiny_lm("gpt2"), tmp_path / "g", ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"],
                          ["some words here"])
    with pytest.raises(actstore.HookNameError, match="not a residual-stream hook"):
        logit_lens(store, hooks=["blocks.0.hook_mlp_out"])
    with pytest.raises(actstore.ConfigError, match="per_token writes"):
        logit_lens(store, per_token=True)
    assert logit_lens(store).column("hook").to_pylist() == ["blocks.0.hook_resid_post"]
