"""Extraction configuration: one typed model that YAML files, CLI `--set` overrides and Python dicts all build.

Every field carries a docstring (shown by `actstore extract --help-config` and in the JSON Schema). Invalid
values and combinations fail at construction with a one-line `ConfigError` that names the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actstore.schemas.errors import ConfigError  # noqa: F401  (defined with its siblings; raised here)
from actstore.schemas.generate import GenerateSettings
from actstore.schemas.hooks import HookNameError, parse_hooks
from actstore.schemas.validation import build

StorageDtype = Literal["float32", "float16", "bfloat16"]
# Content fields added after stores were first written: left out of the config hash while at their default, so
# that the stores written before them still resume and grow.
LATER_FIELDS: dict[str, Any] = {"extensions": None, "part_bytes": 256 << 20, "part_docs": 100_000,
                               "span_field": None, "generate": None}
# Fields that say where and how a run executes, never what it stores: outside the config hash.
RUN_FIELDS = frozenset({"output", "executor", "ray_address", "num_workers", "min_workers", "max_workers",
                        "threads_per_worker", "writer_threads", "shards_in_flight", "storage_options", "progress",
                        "device", "lease_stale_after", "append", "overwrite"})


class TokenOutputs(BaseModel):
    """Per-token model outputs stored next to the token index (`outputs.parquet` in every shard)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    topk: int = Field(default=0, ge=0, le=1000)
    """Also store the k most likely next tokens and their log-probabilities per token (0: next-token loss, its
    probability and the next-token entropy only)."""


class ExtractConfig(BaseModel):
    """Configuration of one extraction run: every key of `actstore extract` YAML files, `--set` and Python dicts."""

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
    span_field: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    """Field of .jsonl/.parquet/dict records holding span labels `[{start, end, label}, ...]` (character offsets into the
    text). The extraction maps them onto tokens as `labels/<span_field>.parquet` (as `actstore label` does) and
    leaves the field out of docs.parquet; a record without it has no spans."""
    split: Literal["document", "lines"] = "document"
    """For .txt files: one document per file (document) or one per non-empty line (lines)."""
    extensions: list[str] | None = None
    """For a corpus directory: the file types to read, e.g. [.jsonl, .txt]; default: the type of its first file
    (sorted), and files of other types are skipped and listed in a warning."""
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
    """Model actors in the Ray pool, a fixed size (default: one per GPU; on CPU clusters one per node, or one per
    `threads_per_worker` CPUs; see min_workers/max_workers to let the pool grow with the cluster)."""
    min_workers: int | None = Field(default=None, gt=0)
    """Ray: the autoscaling actor pool's lower bound (default: the pool size the cluster has now)."""
    max_workers: int | None = Field(default=None, gt=0)
    """Ray: the autoscaling actor pool's upper bound; nodes an autoscaler adds get actors up to it (default: the
    pool size the cluster has now, i.e. a fixed pool)."""
    threads_per_worker: int | None = Field(default=None, gt=0)
    """Ray on CPU nodes: torch threads per model actor; a node gets one actor per this many CPUs (default: one actor
    per node using all of its CPUs). Float32 bits depend on the thread count: keep it fixed across runs that must
    match byte for byte."""
    writer_threads: int = Field(default=2, ge=1, le=64)
    """Threads per worker that convert, hash, compress and write finished shards while the model runs the next."""
    shards_in_flight: int = Field(default=2, ge=1, le=64)
    """Finished shards a worker may hold in memory waiting for its writer threads (bounds memory; at 1 the forward
    pass waits for each shard's write)."""
    part_bytes: int = Field(default=256 << 20, ge=1)
    """Corpus files are read in parts of about this many bytes: small files are grouped, larger .jsonl/.txt files
    are cut at line boundaries and .parquet files at row groups. Packing never crosses a part, and shard ids derive
    from (part, position in part), so it is part of what a store holds."""
    part_docs: int = Field(default=100_000, ge=1)
    """A corpus given as a Python list is cut into parts of this many documents (see part_bytes)."""
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    """fsspec options for output and corpus (endpoint, key, secret). Never logged or stored."""
    overwrite: bool = False
    """Replace an actstore store or interrupted run already at `output` (never a folder holding other files).
    Without it, a complete store of another config is refused and an interrupted run of this config resumes."""
    progress: bool = True
    """Show a progress bar (tokens, tokens/s, ETA)."""
    lease_stale_after: float = Field(default=60.0, gt=0)
    """Seconds without heartbeat after which another run's lease on the output counts as dead and is taken over."""
    token_outputs: TokenOutputs | None = None
    """Store per-token outputs of a causal LM: next-token loss (and `topk` log-probabilities), e.g.
    `token_outputs: {topk: 5}`. Runs the whole model with its LM head, so it turns early exit off."""
    generate: GenerateSettings | None = None
    """Treat each record as a prompt and store the model's response to it: e.g. `generate: {max_new_tokens: 64}`
    (greedy) or `{do_sample: true, temperature: 0.7, seed: 1}`. Rows are the teacher-forced forward over prompt +
    response; tokens() gains `response`, docs() `response` and `finish_reason`. Needs packing: false and a causal
    LM. A prompt longer than context_length - max_new_tokens tokens keeps its last tokens (truncated from the
    left, after its first token when that is BOS)."""
    append: Literal["hooks", "tokens"] | None = None
    """Grow the complete store at `output` instead of writing a new one (existing shards are never rewritten; the
    manifest is replaced atomically at the end; rerunning an interrupted append resumes it shard by shard).
    hooks: add the hooks listed in `hooks` (none may be stored already) for the store's tokens; every other content
    field must equal the store's, and the corpus is re-read and checked against the store's corpus hash and token
    index. tokens: add the documents of a new `corpus` after the store's rows (its own max_docs, text_field and
    split may differ); every other content field, `hooks` included, must equal the store's. Not part of the
    config hash: it changes no stored byte, and the grown store records the config that describes all of it."""

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

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        out = [e if e.startswith(".") else f".{e}" for e in v]
        bad = [e for e in out if e not in (".txt", ".jsonl", ".parquet")]
        if bad or not out:
            raise ValueError(f"{bad[0] if bad else 'an empty list'} is not a corpus file type; use .txt, .jsonl "
                             "or .parquet")
        return out

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("corpus is an empty list: give at least one document")
        if isinstance(v, str) and not v.strip():
            raise ValueError("corpus must be a path, glob or list of documents")
        return v

    @model_validator(mode="after")
    def _generate(self) -> ExtractConfig:
        g = self.generate
        if g is not None and self.packing:
            raise ValueError("generate needs packing: false (one prompt and its response per sequence)")
        if g is not None and g.max_new_tokens >= self.context_length:
            raise ValueError(f"generate.max_new_tokens: {g.max_new_tokens} leaves no room for a prompt in "
                             f"context_length {self.context_length}")
        return self

    @model_validator(mode="after")
    def _pool(self) -> ExtractConfig:
        if self.num_workers is not None and (self.min_workers is not None or self.max_workers is not None):
            raise ValueError("num_workers fixes the pool size; give either num_workers or min_workers/max_workers")
        if self.min_workers is not None and self.max_workers is not None and self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) is above max_workers ({self.max_workers})")
        return self

    # ---- construction helpers -------------------------------------------------------------------------------
    @classmethod
    def build(cls, source: ExtractConfig | dict | str | Path, overrides: list[str] | None = None) -> ExtractConfig:
        """Build from a config object, dict or YAML path, applying `key=value` overrides (YAML-typed values;
        dotted keys reach nested settings, e.g. `token_outputs.topk=5`)."""
        return build(cls, source, overrides)

    def content_dict(self) -> dict[str, Any]:
        """Fields that determine the stored bytes (what the config hash covers)."""
        data = self.model_dump(exclude=set(RUN_FIELDS))
        for key, default in LATER_FIELDS.items():  # fields added later leave old hashes alone at their default
            if data.get(key) == default:
                data.pop(key, None)
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
