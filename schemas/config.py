"""Extraction configuration: one typed model that YAML files, CLI `--set` overrides and Python dicts all build.

Every field carries a docstring (shown by `actstore extract --help-config` and in the JSON Schema). Invalid
values and combinations fail at construction with a one-line `ConfigError` that names the field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actstore.schemas.hooks import HookNameError, parse_hooks

StorageDtype = Literal["float32", "float16", "bfloat16"]
MAX_CONFIG_BYTES = 1 << 20  # config files are tiny; a huge one is a mistake or an attack


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the field and the fix."""


class TokenOutputs(BaseModel):
    """Per-token model outputs stored next to the token index (`outputs.parquet` in every shard)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    topk: int = Field(default=0, ge=0, le=1000)
    """Also store the k most likely next tokens and their log-probabilities per token (0: next-token loss only)."""


class ExtractConfig(BaseModel):
    """Configuration of one extraction run (design §2)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    model: str
    """Local Hugging Face model directory or hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; recorded in the manifest."""
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype the model runs in (independent of the storage dtype)."""
    device: str = "auto"
    """Torch device for the forward pass: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code. Off unless you trust the source."""
    corpus: str | list[str] | list[dict[str, Any]]
    """A .txt/.jsonl/.parquet file, a directory or glob of those, or (Python only) a list of strings/dicts."""
    text_field: str = "text"
    """Field holding the document text in .jsonl/.parquet/dict records; other fields become docs.parquet columns."""
    split: Literal["document", "lines"] = "document"
    """For .txt files: one document per file (document) or one per non-empty line (lines)."""
    max_docs: int | None = Field(default=None, gt=0)
    """Read at most this many documents (in corpus order)."""
    hooks: list[str] = Field(min_length=1)
    """Canonical hook names (blocks.{i}.hook_resid_post, ...) or module:<dotted.path>."""
    context_length: int = Field(default=128, gt=0)
    """Tokens per sequence (window length with packing, truncation length without)."""
    packing: bool = True
    """True: documents joined with the separator/EOS into context_length windows, each starting with BOS/CLS.
    False: one document per sequence, truncated to context_length; padding is never stored."""
    dtype: StorageDtype = "float32"
    """Storage dtype: float32, float16 (overflow detected) or bfloat16 (stored losslessly as uint16 bits)."""
    on_overflow: Literal["error", "inf"] = "error"
    """float16 storage only: error (stop before committing the shard) or inf (store inf, count it in the manifest)."""
    compression: Literal["none", "zstd"] = "none"
    """Zarr codec for activation chunks; activations compress poorly, so none is the default (BENCHMARKS.md)."""
    batch_size: int = Field(default=32, gt=0)
    """Sequences per forward pass."""
    shard_tokens: int = Field(default=65536, gt=0)
    """Token rows per shard: the unit of work, commit and resume."""
    output: str
    """Store URL: local path, file://, memory:// or s3://bucket/prefix."""
    executor: Literal["ray", "local"] = "ray"
    """ray (default; actor pool) or local (in-process, for debugging and as the reference)."""
    ray_address: str | None = None
    """Ray cluster to join; RAY_ADDRESS does the same. With neither, a private local Ray is started."""
    num_workers: int | None = Field(default=None, gt=0)
    """Model actors in the Ray pool (default: one per GPU, else 1 on CPU)."""
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    """fsspec options for output and corpus (endpoint, key, secret). Never logged or stored."""
    progress: bool = True
    """Show a progress bar (tokens, tokens/s, ETA)."""
    lease_stale_after: float = Field(default=60.0, gt=0)
    """Seconds without heartbeat after which another run's lease on the output counts as dead and is taken over."""
    token_outputs: TokenOutputs | None = None
    """Store per-token outputs of a causal LM: next-token loss (and `topk` log-probabilities), e.g.
    `token_outputs: {topk: 5}`. Runs the whole model with its LM head, so it turns early exit off."""
    append: Literal["hooks", "tokens"] | None = None
    """Grow the complete store at `output` instead of writing a new one (existing shards are never rewritten; the
    manifest is replaced atomically at the end; rerunning an interrupted append resumes it shard by shard).
    hooks: add the hooks listed in `hooks` (none may be stored already) for the store's tokens; every other content
    field must equal the store's, and the corpus is re-read and checked against the store's corpus hash and token
    index. tokens: add the documents of a new `corpus` after the store's rows (its own max_docs, text_field and
    split may differ); every other content field, `hooks` included, must equal the store's. Not part of the
    config hash: it changes no stored byte, and the grown store records the config that describes all of it."""

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"unknown config key {key!r}{hint}")
        return data

    @field_validator("hooks")
    @classmethod
    def _hooks(cls, v: list[str]) -> list[str]:
        try:
            parse_hooks(v)
        except HookNameError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output must be a non-empty path or URL")
        return v

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("corpus is an empty list: give at least one document")
        if isinstance(v, str) and not v.strip():
            raise ValueError("corpus must be a path, glob or list of documents")
        return v

    # ---- construction helpers -------------------------------------------------------------------------------
    @classmethod
    def build(cls, source: ExtractConfig | dict | str | Path, overrides: list[str] | None = None) -> ExtractConfig:
        """Build from a config object, dict or YAML path, applying `key=value` overrides (YAML-typed values)."""
        if isinstance(source, ExtractConfig):
            data = source.model_dump()
        elif isinstance(source, dict):
            data = dict(source)
        else:
            data = load_yaml(source)
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--set {item!r}: expected key=value")
            data[key.strip()] = yaml.safe_load(value)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(one_line(e)) from None

    def content_dict(self) -> dict[str, Any]:
        """Fields that determine the stored bytes (what the config hash covers)."""
        skip = {"output", "executor", "ray_address", "num_workers", "storage_options", "progress", "device",
                "lease_stale_after", "append"}
        data = self.model_dump(exclude=skip)
        if not isinstance(self.corpus, str):
            data["corpus"] = "<in-memory>"  # its content is covered by the corpus hash instead
        return data

    def public_dict(self) -> dict[str, Any]:
        """The config as recorded in the manifest: everything except credentials and in-memory corpora."""
        data = self.model_dump(exclude={"storage_options"})
        if not isinstance(self.corpus, str):
            data["corpus"] = f"<in-memory list of {len(self.corpus)} documents>"
        return data

    def config_hash(self) -> str:
        blob = json.dumps(self.content_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file with a size limit and one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {str(p)!r}{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return data


def one_line(err: ValidationError) -> str:
    """Collapse a pydantic ValidationError into one line naming the field(s)."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(x) for x in item["loc"]) or "config"
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)
