"""Typed model of `manifest.json` (the store's commit record: format version, model, hooks, shards, statistics;
store format v2, v1 manifests still parse) and its committed JSON Schema.

Format v2 (streaming, partitioned extraction): the corpus is cut into parts that derive from the input, shard ids
are (part, position in part), document and sequence ids carry their part in the high 32 bits (`part << 32 | n`),
`parts` lists every part with its content hash, and a long shard list lives in a Parquet index (`shard_index`)
instead of the manifest. Format v1 stores (one plan over the whole corpus, shard ids = first sequence) read as
before.

`manifest.schema.json` beside this module is generated from these models (`python -m actstore.schemas.manifest`)
and shipped as package data, so any JSON Schema validator can check a manifest without importing actstore.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actstore.schemas import layout
from actstore.schemas.errors import (
    HookNameError,
    ManifestError,  # noqa: F401  (defined with its siblings; raised here)
    StoreError,
)

SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
MAX_MANIFEST_BYTES = 256 << 20  # refuse absurd manifests before parsing them


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
    """Shard id, derived from the input: v2 `<part>-<position in part>`; v1 the index of its first sequence."""
    part: int | None = None
    """v2: the corpus part the shard's rows come from (None in v1 stores and imported ones)."""
    seq_start: int = Field(ge=0)
    """seq_id of the shard's first sequence (v2: `part << 32 | index in part`)."""
    seq_end: int = Field(ge=0)
    token_start: int = Field(ge=0)
    """Global row of the shard's first token (in a v2 shard.json: its row within its part; the manifest holds the
    global row)."""
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
    responses_sha256: str | None = None
    """SHA-256 of responses.parquet (the generated responses of the shard's prompts) when the config has
    `generate`."""


class LabelInfo(_Model):
    """A token-aligned label table, `labels/<name>.parquet` (one row per token row of the store)."""

    name: str
    """Label name: `train_probe(..., label="span:<name>")` reads it."""
    n_rows: int = Field(ge=0)
    """Rows of the table (the store's n_tokens when it was written)."""
    n_labelled: int = Field(ge=0)
    """Rows with a (non-null) label."""
    dtype: Literal["string", "int64"]
    """Type of the `label` column."""
    sha256: str
    """SHA-256 of the Parquet file as written."""
    source: str = "spans"
    """How the labels were made: `spans` (character spans mapped onto tokens)."""


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
    part_start: int | None = None
    """v2: index of this corpus' first part (its parts follow the previous corpus' parts)."""


class PartInfo(_Model):
    """One corpus part of a v2 store (files, a byte range of one file, Parquet row groups, or list items)."""

    index: int = Field(ge=0)
    """The part's number: the high 32 bits of its documents' and sequences' ids."""
    source: str
    """What the part holds, e.g. `data.jsonl bytes 0-268435456` or `list[0:100000]`."""
    fingerprint: str
    """SHA-256 of the part's listing (files, sizes, range): what a resumed or appending run checks without reading."""
    sha256: str
    """Hash of the part's documents (text and metadata, in order)."""
    n_docs: int = Field(ge=0)
    n_sequences: int = Field(ge=0)
    n_tokens: int = Field(ge=0)
    n_shards: int = Field(ge=0)


class ShardIndex(_Model):
    """Where the per-shard records are when the manifest does not list them (long shard lists)."""

    path: str
    """File beside manifest.json: a Parquet table, one row per shard in row order (ShardInfo's fields; the array
    hashes as `arrays.<hook>` columns)."""
    sha256: str
    """SHA-256 of that file as written."""
    n_shards: int = Field(ge=0)


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
    """Every shard in row order (empty when `shard_index` holds them; `open_store` loads them from there)."""
    shard_index: ShardIndex | None = None
    """v2: the Parquet file holding the shard list when it is long (see ShardIndex)."""
    parts: list[PartInfo] | None = None
    """v2: every corpus part in order (None for v1 stores and imported ones)."""
    extract_config: dict[str, Any] | None = None
    """The extract config without credentials."""
    versions: dict[str, str] = Field(default_factory=dict)
    """Library versions used to write the store."""
    stats: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)
    """Per-hook summary statistics over non-special tokens."""
    labels: list[LabelInfo] | None = None
    """Token-aligned label tables (`actstore label`); absent from stores without any."""

    def hook(self, name: str) -> HookInfo:
        for h in self.hooks:
            if h.name == name:
                return h
        raise HookNameError(f"hook {name!r} is not in this store (hooks: {', '.join(h.name for h in self.hooks)})")

    def label(self, name: str) -> LabelInfo:
        for lab in self.labels or []:
            if lab.name == name:
                return lab
        have = ", ".join(lab.name for lab in self.labels or []) or "none"
        raise StoreError(f"label {name!r} is not in this store (labels: {have}); add it with `actstore label`")

    def to_json(self) -> bytes:
        data = self.model_dump(mode="json")
        if data.get("labels") is None:
            data.pop("labels", None)  # a store without labels keeps the manifest older readers know
        return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def identity_sha256(raw: bytes) -> str:
    """The store's identity as results record it (`store_manifest_sha256`): the SHA-256 of manifest.json as
    committed, leaving out the `labels` list, so that labels added later (`actstore label`, which rewrites the
    manifest and nothing else) do not make the results made before them look like another store's. A store without
    labels: exactly the SHA-256 of its manifest.json bytes."""
    if b'"labels"' not in raw:  # the common case costs no second parse of a (possibly large) manifest
        return hashlib.sha256(raw).hexdigest()
    data = json.loads(raw)
    if not isinstance(data, dict) or "labels" not in data:
        return hashlib.sha256(raw).hexdigest()
    data.pop("labels")
    return hashlib.sha256((json.dumps(data, indent=2, sort_keys=False) + "\n").encode()).hexdigest()


def parse_manifest(raw: bytes, where: str = layout.MANIFEST) -> Manifest:
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
    schema["$id"] = f"https://actstore.dev/schemas/manifest-v{SCHEMA_VERSION}.schema.json"
    schema["title"] = f"actstore manifest v{SCHEMA_VERSION} (reads v1 too)"
    return schema


if __name__ == "__main__":  # regenerate the committed schema
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2) + "\n")
    print(f"wrote {SCHEMA_PATH}")
