"""Typed model of `manifest.json` (store format v1, design §5) and its committed JSON Schema.

`manifest.schema.json` beside this module is generated from these models (`python -m actstore.schemas.manifest`)
and shipped as package data, so any JSON Schema validator can check a manifest without importing actstore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
MAX_MANIFEST_BYTES = 256 << 20  # refuse absurd manifests before parsing them


class ManifestError(ValueError):
    """manifest.json is missing, truncated, edited into an invalid state, or from a newer format."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class HookInfo(_Model):
    name: str
    """Canonical hook name."""
    d: int = Field(gt=0)
    """Row width."""
    dtype: Literal["float32", "float16", "bfloat16"]
    """Storage dtype (bfloat16 is stored as its uint16 bit pattern)."""
    stored_dtype: Literal["float32", "float16", "uint16"]
    """numpy dtype of the bytes in the Zarr arrays."""


class ShardInfo(_Model):
    id: str
    """Shard id (derived from the input: index of the first sequence)."""
    seq_start: int = Field(ge=0)
    seq_end: int = Field(ge=0)
    token_start: int = Field(ge=0)
    """Global row of the shard's first token."""
    token_end: int = Field(ge=0)
    doc_start: int
    """First document id with a token in this shard (-1 when the shard has no document ids)."""
    doc_end: int
    """Last document id in this shard, inclusive."""
    n_tokens: int = Field(ge=0)
    arrays: dict[str, str]
    """hook -> SHA-256 of the array's stored bytes (C order, little-endian)."""
    tokens_sha256: str
    """SHA-256 of tokens.parquet as written."""
    outputs_sha256: str | None = None
    """SHA-256 of outputs.parquet (per-token model outputs) when the config asked for `token_outputs`."""


class ModelInfo(_Model):
    id: str
    revision: str | None = None
    commit: str | None = None
    """Resolved hub commit when known."""
    model_type: str | None = None
    n_layers: int | None = None
    d_model: int | None = None
    model_dtype: str | None = None


class TokenizerInfo(_Model):
    name: str
    vocab_size: int
    bos_id: int | None = None
    sep_id: int | None = None
    pad_id: int | None = None
    special_ids: list[int] = Field(default_factory=list)


class CorpusPart(_Model):
    """One corpus of a store grown with `append: tokens`, with the rows it starts at (parts are in row order)."""

    corpus: str
    """The corpus as given (path, URL or glob), or `<in-memory list of N documents>`."""
    text_field: str
    split: str
    max_docs: int | None = None
    sha256: str
    """Hash of this corpus' documents (text and metadata, in order)."""
    n_docs: int = Field(ge=0)
    doc_start: int = Field(ge=0)
    """doc_id of its first document."""
    seq_start: int = Field(ge=0)
    token_start: int = Field(ge=0)


class CorpusInfo(_Model):
    sha256: str
    """Hash of every document's text and metadata, in order (detects a corpus changed between runs). For a store of
    several corpora (`parts`), SHA-256 of the line `actstore-corpus-parts-v1` followed by one line per part hash."""
    n_docs: int
    parts: list[CorpusPart] | None = None
    """None for a store made from one corpus; after `append: tokens`, every corpus of the store in row order."""


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    format: Literal["actstore"] = "actstore"
    created_by: str
    """actstore version that wrote the store."""
    config_hash: str | None = None
    """SHA-256 of the content-determining extract config fields."""
    model: ModelInfo | None = None
    tokenizer: TokenizerInfo | None = None
    context_length: int | None = None
    packing: bool | None = None
    hooks: list[HookInfo]
    n_tokens: int = Field(ge=0)
    n_sequences: int = Field(ge=0)
    n_docs: int = Field(ge=0)
    corpus: CorpusInfo | None = None
    shards: list[ShardInfo]
    extract_config: dict[str, Any] | None = None
    """The extract config without credentials."""
    versions: dict[str, str] = Field(default_factory=dict)
    """Library versions used to write the store."""
    stats: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)
    """Per-hook summary statistics over non-special tokens."""

    def hook(self, name: str) -> HookInfo:
        for h in self.hooks:
            if h.name == name:
                return h
        raise KeyError(f"hook {name!r} is not in this store (hooks: {', '.join(h.name for h in self.hooks)})")

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n").encode()


def parse_manifest(raw: bytes, where: str = "manifest.json") -> Manifest:
    """Parse and validate manifest bytes with one-line errors (truncated, edited, newer format)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON (truncated or edited?): {e}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must hold a JSON object")
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ManifestError(f"{where} has schema_version {version}, newer than this actstore reads "
                            f"({SCHEMA_VERSION}); upgrade actstore")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ManifestError(f"{where} is invalid at {loc}: {first['msg']} ({e.error_count()} problem(s))") from None


def json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://actstore.dev/schemas/manifest-v1.schema.json"
    schema["title"] = "actstore manifest v1"
    return schema


if __name__ == "__main__":  # regenerate the committed schema
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2) + "\n")
    print(f"wrote {SCHEMA_PATH}")
