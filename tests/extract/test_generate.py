"""Activations of generated responses (`generate:`): the stored responses equal `model.generate`, every row
equals a teacher-forced HF forward over prompt + response, and reruns, resumes and executors agree byte for byte.

The oracles run each prompt alone (no padding) through a freshly loaded *ForCausalLM: `generate` for the ids,
a plain forward with `output_hidden_states` for the rows and torch's log-softmax for the token outputs.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers as T

import actstore
from actstore.pipeline.extract import estimate
from actstore.schemas.errors import AppendError, ConfigError, LabelError
from actstore.schemas.generate import GenerateSettings
from tests.support import corpus_texts, crash_after_shards, extract_local, tree_digest

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
PROMPTS = [t[:90] for t in corpus_texts(8)]


@functools.lru_cache(maxsize=4)
def _lm(path: str):
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


def _gen(path: str, out, **kw):
    corpus, hooks = kw.pop("corpus", PROMPTS), kw.pop("hooks", HOOKS)
    cfg = dict(packing=False, context_length=48, shard_tokens=120, generate={"max_new_tokens": 10})
    cfg.update(kw)
    return extract_local(path, out, hooks, corpus, **cfg)


def _by_doc(store):
    tok = store.tokens().to_pandas()
    return {d: g for d, g in tok.groupby("doc_id", sort=False)}


def _hf_generate(path: str, prompt: np.ndarray, n: int) -> list[int]:
    lm = _lm(path)
    with torch.no_grad():
        out = lm.generate(torch.tensor(prompt[None], dtype=torch.long), attention_mask=torch.ones(1, len(prompt),
                          dtype=torch.long), max_new_tokens=n, do_sample=False,
                          pad_token_id=lm.generation_config.eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_ids_and_rows_equal_hf(tmp_path, tiny_lm, family):
    path = tiny_lm(family)
    store = _gen(path, tmp_path / "s")
    assert store.verify().ok and len(store.manifest.shards) >= 2  # several shards, several batches
    tok = T.AutoTokenizer.from_pretrained(path)
    acts = {h: store.activations(h).compute() for h in HOOKS}
    docs = store.docs().to_pandas().set_index("doc_id")
    eos = _lm(path).generation_config.eos_token_id
    for doc_id, g in _by_doc(store).items():
        prompt = g[~g.response]["token_id"].to_numpy()
        resp = g[g.response]["token_id"].to_numpy()
        want = _hf_generate(path, prompt, 10)
        if eos in want:
            want = want[:want.index(eos) + 1]
        assert resp.tolist() == want, doc_id
        assert g["response"].tolist() == [False] * len(prompt) + [True] * len(resp)  # prompt first, then response
        assert docs.loc[doc_id, "response"] == tok.decode(resp.tolist(), skip_special_tokens=True)
        assert docs.loc[doc_id, "finish_reason"] == ("eos" if resp[-1] == eos else "length")
        assert docs.loc[doc_id, "n_tokens"] == len(g)
        with torch.no_grad():
            hs = _lm(path)(input_ids=torch.tensor(g["token_id"].to_numpy()[None], dtype=torch.long),
                           output_hidden_states=True).hidden_states
        rows = g.index.to_numpy()
        for i, h in enumerate(HOOKS):
            np.testing.assert_allclose(acts[h][rows], hs[i + 1][0].numpy(), rtol=1e-6, atol=1e-6, err_msg=h)


def test_response_char_spans_index_the_response(tmp_path, tiny_lm):
    store = _gen(tiny_lm("gpt2"), tmp_path / "s")
    docs = store.docs().to_pandas().set_index("doc_id")
    for doc_id, g in _by_doc(store).items():
        r = g[g.response & (g.char_start >= 0)]
        text = docs.loc[doc_id, "response"]
        assert r["char_start"].iloc[0] == 0 and r["char_end"].iloc[-1] == len(text)
        assert (r["char_start"].to_numpy()[1:] == r["char_end"].to_numpy()[:-1]).all()  # they tile the text
        p = g[~g.response & (g.char_start >= 0)]
        assert p["char_end"].max() <= docs.loc[doc_id, "n_chars"]  # prompt spans index the record's text
    assert store.verify().ok and all(s.responses_sha256 for s in store.manifest.shards)
    f = tmp_path / "s" / "shards" / store.manifest.shards[0].id / "responses.parquet"
    f.write_bytes(f.read_bytes()[:-9] + b"x" * 9)
    assert any("responses.parquet checksum mismatch" in p for p in store.verify().problems)


def test_progress_counts_prompt_and_response_rows(tmp_path, tiny_lm, capfd):
    store = _gen(tiny_lm("gpt2"), tmp_path / "s", progress=True)
    counts = [int(n) for n in re.findall(r"(\d+)tok(?!/)", capfd.readouterr().err)]
    assert counts and max(counts) == store.n_tokens > int((~store.tokens().column("response").to_numpy(
        zero_copy_only=False)).sum())


def _save_with_eos(src: str, dst: Path, eos: int) -> str:
    lm = T.AutoModelForCausalLM.from_pretrained(src)
    lm.config.eos_token_id = lm.generation_config.eos_token_id = eos
    lm.save_pretrained(dst)
    T.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


def test_a_shipped_generation_config_does_not_change_decoding(tmp_path, tiny_lm):
    """A model folder whose generation_config.json asks for a repetition penalty and no repeated tokens decodes
    exactly as the same weights without it: only the extract config's settings decide."""
    base = tiny_lm("gpt2")
    lm = T.AutoModelForCausalLM.from_pretrained(base)
    lm.generation_config.repetition_penalty, lm.generation_config.no_repeat_ngram_size = 5.0, 1
    lm.save_pretrained(tmp_path / "shipped")
    T.AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "shipped")
    plain = _gen(base, tmp_path / "a", corpus=PROMPTS[:3])
    shipped = _gen(str(tmp_path / "shipped"), tmp_path / "b", corpus=PROMPTS[:3])
    assert shipped.docs().column("response").to_pylist() == plain.docs().column("response").to_pylist()
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "shipped")  # the shipped config really bites in HF
    tok = T.AutoTokenizer.from_pretrained(base)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"][:30]])
    with torch.no_grad():
        a = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id)
        b = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id,
                        repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert not torch.equal(a, b)


def test_finish_reasons_eos_stop_length(tmp_path, tiny_lm):
    base = tiny_lm("gpt2")
    tok = T.AutoTokenizer.from_pretrained(base)
    prompt0 = np.array(tok(PROMPTS[0])["input_ids"])
    first = _hf_generate(base, prompt0, 10)
    k = next(i for i in range(1, 10) if first[i] not in first[:i])  # a token greedy decoding reaches after k steps
    path = _save_with_eos(base, tmp_path / "eos-model", first[k])
    room = dict(context_length=120, shard_tokens=240)  # prompts kept whole: they equal prompt0
    store = _gen(path, tmp_path / "eos", corpus=PROMPTS[:3], **room)
    docs = store.docs().to_pandas()
    assert docs["finish_reason"].iloc[0] == "eos"
    resp0 = store.tokens().to_pandas().query("response and doc_id == 0")["token_id"].tolist()
    assert resp0 == first[:k + 1]  # the EOS is kept as the response's last token

    text1 = tok.decode(first[:2], skip_special_tokens=True)
    stop = text1[-2:] if len(text1.strip()) >= 2 else text1
    store = _gen(base, tmp_path / "stop", corpus=PROMPTS[:3], generate={"max_new_tokens": 10, "stop": [stop]},
                 **room)
    docs = store.docs().to_pandas()
    assert docs["finish_reason"].iloc[0] == "stop" and stop in docs["response"].iloc[0]
    cut = store.tokens().to_pandas().query("response and doc_id == 0")["token_id"].tolist()
    assert cut == first[:len(cut)] and stop not in tok.decode(cut[:-1], skip_special_tokens=True)
    store = _gen(base, tmp_path / "length", corpus=PROMPTS[:3], generate={"max_new_tokens": 10, "stop": ["\x00"]},
                 **room)
    tokens = store.tokens().to_pandas()
    assert store.docs().column("finish_reason").to_pylist() == ["length"] * 3
    assert (tokens[tokens.response].groupby("doc_id").size() == 10).all()


def test_long_prompt_is_truncated_from_the_left(tmp_path, tiny_lm):
    path = tiny_lm("llama")  # a BOS tokenizer: the BOS stays first
    tok = T.AutoTokenizer.from_pretrained(path)
    long = corpus_texts(40, min_len=2000)[0][:2000]
    store = _gen(path, tmp_path / "s", corpus=[long])
    g = store.tokens().to_pandas()
    prompt = g[~g.response]["token_id"].tolist()
    full = tok(long)["input_ids"]
    assert len(prompt) == 48 - 10 and prompt[0] == tok.bos_token_id and prompt[1:] == full[-(len(prompt) - 1):]


def test_chat_template_wraps_the_prompt(tmp_path, tiny_lm):
    src = tiny_lm("gpt2")
    tok = T.AutoTokenizer.from_pretrained(src)
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Bot:"
    path = tmp_path / "chat-model"
    T.AutoModelForCausalLM.from_pretrained(src).save_pretrained(path)
    tok.save_pretrained(path)
    prompts = ["two plus two", "the sky is"]
    store = _gen(str(path), tmp_path / "s", corpus=prompts, generate={"max_new_tokens": 6, "chat_template": True})
    g = store.tokens().to_pandas()
    for doc_id, text in enumerate(prompts):
        p = g[(g.doc_id == doc_id) & ~g.response]
        assert tok.decode(p["token_id"].tolist()) == f"User: {text}\nBot:"
        inside = p[p.char_start >= 0]
        assert "".join(text[a:b] for a, b in zip(inside.char_start, inside.char_end)).strip() == text
        assert len(inside) < len(p)  # the template's own tokens have no span in the record's text
    with pytest.raises(actstore.CorpusError, match="no chat template"):
        _gen(src, tmp_path / "none", corpus=prompts, generate={"max_new_tokens": 4, "chat_template": True})
    # a system prompt holding the prompt's own words: the spans still land on the user's message
    tok.chat_template = "{% for m in messages %}System: be helpful\nUser: {{ m['content'] }}\n{% endfor %}Bot:"
    tok.save_pretrained(path)
    store = _gen(str(path), tmp_path / "sys", corpus=["helpful"], generate={"max_new_tokens": 4, "chat_template": True})
    g = store.tokens().to_pandas()
    p = g[~g.response].reset_index(drop=True)
    inside = p[p.char_start >= 0]
    assert "".join("helpful"[a:b] for a, b in zip(inside.char_start, inside.char_end)) == "helpful"
    assert "User:" in tok.decode(p["token_id"].tolist()[:inside.index[0]])


def test_sampling_is_seeded_and_reproducible(tmp_path, tiny_lm):
    gen = {"max_new_tokens": 10, "do_sample": True, "temperature": 2.0, "seed": 3}
    a = _gen(tiny_lm("gpt2"), tmp_path / "a", generate=gen)
    c = _gen(tiny_lm("gpt2"), tmp_path / "c", generate=gen)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "c")
    assert a.docs().equals(c.docs())
    d = _gen(tiny_lm("gpt2"), tmp_path / "d", generate={**gen, "seed": 4})
    assert d.docs().column("response").to_pylist() != a.docs().column("response").to_pylist()
    greedy = _gen(tiny_lm("gpt2"), tmp_path / "g")
    assert greedy.docs().column("response").to_pylist() != a.docs().column("response").to_pylist()
    assert a.verify().ok
    assert a.manifest.extract_config["generate"] == GenerateSettings(**gen).model_dump()


def test_resume_after_crash_is_identical(tmp_path, tiny_lm, monkeypatch):
    gen = {"max_new_tokens": 10, "do_sample": True, "seed": 7}
    clean = _gen(tiny_lm("gpt2"), tmp_path / "clean", generate=gen)
    assert len(clean.manifest.shards) >= 3
    crash_after_shards(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _gen(tiny_lm("gpt2"), tmp_path / "run", generate=gen)
    assert len(list((tmp_path / "run" / "shards").glob("*/shard.json"))) == 2
    calls = crash_after_shards(monkeypatch, 0, then=[])
    resumed = _gen(tiny_lm("gpt2"), tmp_path / "run", generate=gen)
    assert calls.count(2) == len(clean.manifest.shards) - 2  # committed shards were not generated again
    assert resumed.manifest.shards == clean.manifest.shards
    assert tree_digest(tmp_path / "run") == tree_digest(tmp_path / "clean")
    assert resumed.docs().equals(clean.docs()) and resumed.verify().ok


def test_token_outputs_loss_is_the_response_surprisal(tmp_path, tiny_lm):
    path = tiny_lm("llama")
    store = _gen(path, tmp_path / "s", token_outputs={"topk": 0})
    loss = store.token_outputs().column("loss").to_numpy(zero_copy_only=False)
    for _doc, g in _by_doc(store).items():
        ids = g["token_id"].to_numpy()
        with torch.no_grad():
            logp = torch.log_softmax(_lm(path)(input_ids=torch.tensor(ids[None])).logits[0].double(), -1)
        for pos in np.flatnonzero(g["response"].to_numpy()):
            want = -float(logp[pos - 1, ids[pos]])  # row pos-1 predicts the token chosen at pos
            np.testing.assert_allclose(loss[g.index[pos - 1]], want, rtol=1e-5, atol=1e-5)
    unc = actstore.uncertainty(store, rows="response")
    assert unc.docs.num_rows == store.docs().num_rows


def test_response_consumers_and_labels(tmp_path, tiny_lm):
    store = _gen(tiny_lm("gpt2"), tmp_path / "s", generate={"max_new_tokens": 12})
    series = actstore.spectral_series(store, HOOKS[:1], window=4, rows="response")
    resp_rows = set(np.flatnonzero(store.tokens().column("response").to_numpy(zero_copy_only=False)))
    assert series.num_rows and set(series.column("first_row").to_pylist()) <= resp_rows
    docs = store.docs().to_pandas()
    doc0, text0 = int(docs.doc_id[0]), docs.response[0]
    actstore.label(store, [{"doc_id": doc0, "start": 0, "end": 3, "label": "a", "target": "response"},
                           {"doc_id": doc0, "start": int(docs.n_chars[0]) - 3, "end": int(docs.n_chars[0]),
                            "label": "p"}], "both")  # the prompt's end (its start may be truncated away)
    tok = store.tokens().to_pandas()
    lab = pq.read_table(Path(store.root) / "labels" / "both.parquet").column("label").to_pylist()
    tok["label"] = lab
    a = tok[tok.label == "a"]
    p = tok[tok.label == "p"]
    assert len(a) and a.response.all() and (a.doc_id == doc0).all() and (a.char_start < 3).all()
    assert len(p) and (~p.response).all() and (p.doc_id == doc0).all()
    assert len(text0) >= 3
    with pytest.raises(LabelError, match="outside its response"):
        actstore.label(store, [{"doc_id": doc0, "start": 0, "end": len(text0) + 1, "label": "x",
                                "target": "response"}], "bad")
    assert store.verify().ok


def test_response_labels_refused_without_responses(tmp_path, tiny_lm):
    store = extract_local(tiny_lm("gpt2"), tmp_path / "s", HOOKS[:1], PROMPTS[:2], packing=False)
    with pytest.raises(LabelError, match="has none"):
        actstore.label(store, [{"doc_id": 0, "start": 0, "end": 2, "label": "a", "target": "response"}], "x")
    assert not (tmp_path / "s" / "labels").exists()


@pytest.mark.parametrize("kw, match", [
    ({"packing": True}, "packing: false"),
    ({"generate": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"generate": {"max_new_tokens": 48}}, "no room for a prompt"),
    ({"generate": {"max_new_tokens": 4, "temperature": 0}}, "temperature"),
])
def test_bad_settings_refused_before_work(tmp_path, tiny_lm, kw, match):
    with pytest.raises(ConfigError, match=match):
        _gen(tiny_lm("gpt2"), tmp_path / "s", **kw)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("field", ["response", "finish_reason"])
def test_prompt_fields_generate_writes_are_refused(tmp_path, tiny_lm, field):
    """A prompt record carrying `response` (a dataset's reference answer) would collide with the generated column:
    refused in one line, naming the record, before anything is written; a later record is caught at planning."""
    from actstore.schemas.errors import CorpusError

    with pytest.raises(CorpusError, match=f"list\\[0\\].*'{field}'.*reference_{field}"):
        _gen(tiny_lm("gpt2"), tmp_path / "s", corpus=[{"text": PROMPTS[0], field: "x"}])
    assert not (tmp_path / "s").exists()
    with pytest.raises(CorpusError, match=f"list\\[1\\].*'{field}'"):
        _gen(tiny_lm("gpt2"), tmp_path / "t", corpus=[{"text": PROMPTS[0]}, {"text": PROMPTS[1], field: "x"}])
    assert not list((tmp_path / "t").glob("shards/*/shard.json"))  # no shard committed


def test_encoder_model_refused_before_work(tmp_path, tiny):
    with pytest.raises(ConfigError, match="not a causal language model"):
        _gen(tiny("bert"), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_append_to_generated_store_refused(tmp_path, tiny_lm):
    store = _gen(tiny_lm("gpt2"), tmp_path / "s", corpus=PROMPTS[:2])
    before = tree_digest(tmp_path / "s")
    with pytest.raises(AppendError, match="generate"):
        _gen(tiny_lm("gpt2"), tmp_path / "s", corpus=PROMPTS[:2], append="hooks", hooks=["blocks.2.hook_resid_post"])
    assert tree_digest(tmp_path / "s") == before and store.verify().ok
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["extract_config"]["generate"]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_ray_equals_local(tmp_path, tiny_lm):
    gen = {"max_new_tokens": 8, "do_sample": True, "seed": 5}
    local = _gen(tiny_lm("gpt2"), tmp_path / "local", generate=gen)
    ray_store = _gen(tiny_lm("gpt2"), tmp_path / "ray", generate=gen, executor="ray")
    assert ray_store.manifest.shards == local.manifest.shards
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")
    assert ray_store.docs().equals(local.docs())


def test_parts_and_empty_prompts(tmp_path, tiny_lm):
    path = tiny_lm("gpt2")
    corpus = [*PROMPTS[:3], "", *PROMPTS[3:5]]
    store = _gen(path, tmp_path / "s", corpus=corpus, part_docs=2)
    assert len(store.manifest.parts) == 3 and store.verify().ok
    tok = T.AutoTokenizer.from_pretrained(path)
    docs = store.docs().to_pandas().set_index("doc_id")
    rows = store.tokens().to_pandas()
    assert docs["n_tokens"].sum() == store.n_tokens == len(rows)
    empty = docs[docs.n_chars == 0]
    assert len(empty) == 1 and empty["response"].isna().all() and empty["finish_reason"].isna().all()
    for doc_id, g in rows.groupby("doc_id"):
        assert docs.loc[doc_id, "response"] == tok.decode(g[g.response]["token_id"].tolist(), skip_special_tokens=True)
        assert docs.loc[doc_id, "n_tokens"] == len(g)
    assert sorted(rows.doc_id.unique() >> 32) == [0, 0, 1, 2, 2]  # doc ids of three parts


def test_plan_refuses_generate(tmp_path, tiny_lm):
    with pytest.raises(ConfigError, match="does not estimate runs with generate"):
        estimate.plan(dict(model=tiny_lm("gpt2"), corpus=PROMPTS[:2], hooks=HOOKS, output=str(tmp_path / "s"),
                           packing=False, context_length=48, generate={"max_new_tokens": 4}))
    assert not (tmp_path / "s").exists()
