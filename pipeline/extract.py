"""`actstore.extract`: validate everything cheap first, plan shards, run an executor, commit the manifest.

Order matters: config grammar, model config (hook layers, context limit), output state and corpus are all
checked before anything is written or any forward pass runs, so bad input costs seconds and leaves no trace.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from actstore.pipeline.finalize import finalize_extract
from actstore.pipeline.lease import Lease
from actstore.pipeline.output import check_output, write_run_record
from actstore.pipeline.plan import make_plan
from actstore.pipeline.store import Store, open_store
from actstore.schemas.config import ConfigError, ExtractConfig
from actstore.schemas.hooks import parse_hooks
from actstore.workers import hookmap, storage
from actstore.workers.runner import load_config, load_tokenizer, max_context
from actstore.workers.shard_writer import is_committed

log = logging.getLogger("actstore")


def extract(config: ExtractConfig | dict | str | Path, overrides: list[str] | None = None) -> Store:
    """Run an extraction described by a config object, dict or YAML path; return the finished Store."""
    cfg = ExtractConfig.build(config, overrides)
    if cfg.append is not None:  # grow an existing store instead (actstore.pipeline.append)
        from actstore.pipeline.append import append

        return append(cfg)
    fs, root = storage.get_fs(cfg.output, cfg.storage_options)
    model_cfg, tok = preflight(cfg, fs, root)
    if cfg.executor == "local":
        return _run(cfg, model_cfg, tok, fs, root, None)
    from actstore.pipeline.ray_executor import ray_session
    from actstore.pipeline.ray_tokenize import ray_tokenizer

    with ray_session(ray_address(cfg)):  # one session for tokenizing tasks and the actor pool
        return _run(cfg, model_cfg, tok, fs, root, ray_tokenizer(cfg))


def _run(cfg: ExtractConfig, model_cfg: Any, tok: Any, fs, root: str, tokenize) -> Store:
    plan = make_plan(cfg, tok, tokenize)
    state = check_output(fs, root, cfg.output, cfg.config_hash(), plan.corpus_sha256)
    if state.complete:
        log.info("output %s already holds this store; nothing to do", cfg.output)
        return open_store(cfg.output, cfg.storage_options)
    with Lease(fs, root, cfg.output, stale_after=cfg.lease_stale_after, beat=min(5.0, cfg.lease_stale_after / 3)):
        write_run_record(fs, root, cfg.config_hash(), plan.corpus_sha256, cfg.public_dict())
        todo = [p for p in plan.shards if not is_committed(fs, root, p.shard_id)]
        done = plan.n_tokens - sum(p.n_tokens for p in todo)
        with tqdm(total=plan.n_tokens, initial=done, unit="tok", unit_scale=True, disable=not cfg.progress,
                  desc="extract", dynamic_ncols=True) as bar:
            execute(cfg, todo, plan.special.pad, fs, root, bar.update)
        finalize_extract(cfg, plan, model_cfg, tok, fs, root)
    return open_store(cfg.output, cfg.storage_options)


def preflight(cfg: ExtractConfig, fs, root: str) -> tuple[Any, Any]:
    """Checks that need the model config but no weights; returns (model config, tokenizer)."""
    model_cfg = check_model(cfg)
    check_output(fs, root, cfg.output, cfg.config_hash())
    return model_cfg, load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)


# Bidirectional encoders that transformers can still wrap in a *ForCausalLM class (as a decoder, untrained).
_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "electra", "ernie", "camembert", "megatron-bert"})


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
        check_causal(model_cfg)
    return model_cfg


def check_causal(model_cfg: Any) -> None:
    """token_outputs are next-token predictions: refuse bidirectional encoders and models without an LM head."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    encoder = model_cfg.model_type in _ENCODERS and not getattr(model_cfg, "is_decoder", False)
    if encoder or type(model_cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"token_outputs: {model_cfg.model_type!r} is not a causal language model; next-token loss "
                          "needs one (remove token_outputs for this model)")


def execute(cfg: ExtractConfig, todo: list, pad_id: int, fs, root: str, progress) -> None:
    """Run (write and commit) the planned shards `todo` with the configured executor."""
    if not todo:
        return
    if cfg.executor == "local":
        from actstore.pipeline.local_executor import run_local

        run_local(cfg, todo, pad_id, fs, root, progress)
    else:
        from actstore.pipeline.ray_executor import run_ray

        run_ray(cfg, todo, pad_id, progress, ray_address=ray_address(cfg))


def ray_address(cfg: ExtractConfig) -> str | None:
    return cfg.ray_address or os.environ.get("RAY_ADDRESS")
