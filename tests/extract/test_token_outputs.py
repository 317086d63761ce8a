"""Per-token outputs (`token_outputs`): next-token loss and top-k log-probabilities equal an independent oracle.

The oracle runs every stored sequence alone through a freshly loaded *ForCausalLM and computes the numbers with
torch's cross_entropy; the store's rows come from padded, length-sorted batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import actstore
from actstore.schemas.config import ConfigError
from tests.support import _causal_tokenizer, _config, corpus_texts, extract_local


@pytest.fixture(scope="module")
def llama_lm(tmp_path_factory) -> str:
    """A tiny Llama *with its own (untied) LM head*, saved as a causal-LM checkpoint."""
    path = tmp_path_factory.mktemp("lm") / "tiny-llama-lm"
    tok = _causal_tokenizer("llama")
    torch.manual_seed(1)
    model = T.LlamaForCausalLM(_config("llama", len(tok), tok))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _oracle(path: str, store, topk: int):
    lm = T.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = store.tokens()
    seq, ids = tok.column("seq_id").to_numpy(), tok.column("token_id").to_numpy()
    loss, top_ids, top_lp = [], [], []
    for s in np.unique(seq):  # rows of one sequence are contiguous and in position order
        x = torch.as_tensor(ids[seq == s], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=x).logits[0].double(), -1)
        nll = torch.nn.functional.nll_loss(logp[:-1], x[0, 1:], reduction="none")
        loss.append(np.append(nll.numpy(), np.nan))
        v, i = torch.topk(logp, topk, -1)
        top_ids.append(i.numpy())
        top_lp.append(v.numpy())
    return np.concatenate(loss), np.concatenate(top_ids), np.concatenate(top_lp)


@pytest.mark.parametrize("packing", [True, False])
def test_outputs_equal_oracle(llama_lm, tmp_path, packing):
    texts = corpus_texts(10, min_len=5)
    store = extract_local(llama_lm, tmp_path / "s", ["blocks.0.hook_resid_post"], texts, packing=packing,
                          token_outputs={"topk": 3})
    out = store.token_outputs()
    assert out.num_rows == store.n_tokens
    loss = out.column("loss").to_numpy(zero_copy_only=False)
    ref_loss, ref_ids, ref_lp = _oracle(llama_lm, store, 3)
    assert np.array_equal(np.isnan(loss), np.isnan(ref_loss))  # null exactly at each sequence's last token
    assert np.isnan(loss).sum() == len(np.unique(store.tokens().column("seq_id").to_numpy()))
    ok = ~np.isnan(ref_loss)
    np.testing.assert_allclose(loss[ok], ref_loss[ok], rtol=1e-4, atol=1e-4)
    lp = np.stack(out.column("topk_logprobs").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4, atol=1e-4)
    ids = np.stack(out.column("topk_ids").to_numpy(zero_copy_only=False))
    assert (ids == ref_ids).mean() > 0.99  # near-ties may swap order within float32 noise
    assert store.verify().ok


def test_outputs_checked_and_early_exit_unchanged(llama_lm, tmp_path):
    """Activations are the same with and without outputs; verify catches a changed outputs file."""
    texts = corpus_texts(6, min_len=5)
    hooks = ["blocks.0.hook_resid_post"]
    a = extract_local(llama_lm, tmp_path / "a", hooks, texts, token_outputs={"topk": 0})
    b = extract_local(llama_lm, tmp_path / "b", hooks, texts)
    np.testing.assert_array_equal(a.activations(hooks[0]).compute(), b.activations(hooks[0]).compute())
    assert a.token_outputs().column_names == ["loss", "chosen_prob", "entropy"]
    with pytest.raises(ValueError, match="no per-token outputs"):
        b.token_outputs()
    f = tmp_path / "a" / "shards" / a.manifest.shards[0].id / "outputs.parquet"
    f.write_bytes(f.read_bytes()[:-9] + b"x" * 9)
    rep = a.verify()
    assert not rep.ok and any("outputs.parquet checksum mismatch" in p for p in rep.problems)


def test_outputs_refused_for_encoders_and_headless(tiny, llama_lm, tmp_path):
    with pytest.raises(ConfigError, match="not a causal language model"):
        extract_local(tiny("bert"), tmp_path / "e", ["blocks.0.hook_resid_post"], ["a b c"], token_outputs={})
    # tiny("llama") is a base-model checkpoint: a head would be random, so the run stops before writing
    with pytest.raises(actstore.workers.runner.ModelLoadError, match="no trained LM head"):
        extract_local(tiny("llama"), tmp_path / "h", ["blocks.0.hook_resid_post"], ["a b c d"], token_outputs={})
    assert not (tmp_path / "h" / "manifest.json").exists()


def test_inspect_reports_loss(llama_lm, tmp_path, capsys):
    from actstore.cli import main

    store = extract_local(llama_lm, tmp_path / "s", ["blocks.0.hook_resid_post"], corpus_texts(4, min_len=5),
                          token_outputs={"topk": 1})
    assert main(["inspect", str(tmp_path / "s")]) == 0
    loss = store.token_outputs().column("loss").to_numpy(zero_copy_only=False)
    assert f"next-token loss {np.nanmean(loss):.4g}" in capsys.readouterr().out
