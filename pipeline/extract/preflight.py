"""Checks that run before any weight is loaded or any byte written: model config, hooks, context, output.

Bad input costs seconds and leaves no trace: every check here reads only the model's config and tokenizer
files and the output's listing.
"""

from __future__ import annotations

from typing import Any

from actstore.pipeline.extract.run_record import check_output
from actstore.schemas.config import ConfigError, ExtractConfig
from actstore.schemas.errors import ModelLoadError
from actstore.schemas.hooks import parse_hooks
from actstore.workers import hookmap
from actstore.workers.corpus import check_generated_fields, iter_documents
from actstore.workers.families import is_causal_lm
from actstore.workers.runner import load_config, load_tokenizer, max_context


def preflight(cfg: ExtractConfig, fs: Any, root: str) -> tuple[Any, Any]:
    """Checks that need the model config but no weights; returns (model config, tokenizer)."""
    model_cfg = check_model(cfg)
    check_output(fs, root, cfg.output, cfg.config_hash(), overwrite=cfg.overwrite)
    tok = load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    check_vocab(tok, model_cfg, cfg.model)
    if cfg.generate is not None:  # the first record shows a clash with generate's columns before any weight loads
        first = next(iter_documents(cfg.corpus, cfg.text_field, cfg.split, cfg.storage_options, 1, cfg.extensions),
                     None)
        if first is not None:
            check_generated_fields(first)
    return model_cfg, tok


def check_vocab(tok: Any, model_cfg: Any, model: str) -> None:
    """Token ids must index the model's embedding table: a larger tokenizer would fail mid-run (or silently
    read the wrong rows on some devices)."""
    vocab = getattr(model_cfg, "vocab_size", None)
    if isinstance(vocab, int) and len(tok) > vocab:
        raise ModelLoadError(f"the tokenizer of {model!r} has {len(tok):,} tokens but the model's embedding table "
                             f"only {vocab:,} rows; use the tokenizer the model was trained with")


def check_model(cfg: ExtractConfig) -> Any:
    """Config checks against the model config (hooks, context limit) and the executor; returns the model config."""
    if cfg.executor == "ray" and cfg.output.startswith("memory://"):
        raise ConfigError("output: memory:// lives in one process; use executor: local or a file/s3 output")
    model_cfg = load_config(cfg.model, cfg.revision, cfg.trust_remote_code)
    hookmap.check_hooks(parse_hooks(cfg.hooks), model_cfg)
    limit = max_context(model_cfg)
    if limit is not None and cfg.context_length > limit:
        raise ConfigError(f"context_length: {cfg.context_length} exceeds the model's limit of {limit} positions")
    if cfg.shard_tokens < cfg.context_length:
        raise ConfigError(f"shard_tokens: {cfg.shard_tokens} is smaller than context_length {cfg.context_length}")
    if cfg.token_outputs is not None:
        check_causal(model_cfg, "token_outputs", "next-token loss needs one (remove token_outputs for this model)")
    if cfg.generate is not None:
        check_causal(model_cfg, "generate", "only a causal LM generates responses (remove generate for this model)")
    return model_cfg


def check_causal(model_cfg: Any, what: str, why: str) -> None:
    """Refuse bidirectional encoders and models without a causal LM head for features that predict next tokens."""
    if not is_causal_lm(model_cfg):
        raise ConfigError(f"{what}: {model_cfg.model_type!r} is not a causal language model; {why}")
