"""Every file and folder name of the store format, and the paths built from them, in one place.

A store is read by other tools (pyarrow, zarr, any JSON Schema validator), so its names are part of the format:
no other module spells them. Paths are plain "/"-joined strings, valid for local paths and every fsspec URL.
"""

from __future__ import annotations

MANIFEST = "manifest.json"  # the store's commit record, written last
RUN_RECORD = "extract.json"  # an interrupted run's config and corpus hashes (removed at commit)
LEASE = "lease.json"  # the single writer's heartbeat
DOCS = "docs.parquet"  # one row per corpus document
SHARDS = "shards"  # one folder per shard
STATS = "stats"  # merged per-hook statistics: stats/<hook>/stats.safetensors
TMP = ".tmp"  # shards/.tmp: shards being built (local disks) and append backups
LABELS = "labels"  # token-aligned label tables: labels/<name>.parquet
SHARD_INDEX = "shards.parquet"  # format v2: the per-shard records when the shard list is too long for the manifest
PARTS = "parts"  # format v2, during a run: one commit record (+ docs rows and merged stats) per finished corpus part

# inside shards/<shard_id>/
SHARD_RECORD = "shard.json"  # the shard's commit record, written last
TOKENS = "tokens.parquet"  # token index
ACTS = "acts.zarr"  # Zarr v3 group, one array per hook
SHARD_STATS = "stats.safetensors"  # the shard's mergeable statistics (also the merged file's name)
OUTPUTS = "outputs.parquet"  # optional per-token model outputs
RESPONSES = "responses.parquet"  # generate: one row per prompt (response text, finish_reason), joined into docs

# A feature store (`actstore encode`): sparse SAE codes with the source store's shards and token index.
FEATURES_MANIFEST = "features.json"  # the feature store's commit record, written last
ENCODE_RECORD = "encode.json"  # an interrupted encode's config hash (removed at commit)
CODES = "codes.zarr"  # inside shards/<shard_id>/: Zarr v3 group with latent_ids (int32) and latent_values (float16)
LATENT_IDS = "latent_ids"
LATENT_VALUES = "latent_values"
FEATURE_SUMMARY = "summary"  # `actstore features` results inside a feature store: latents, contexts, doc counts

# Names in a store root that an actstore writer may have put there (anything else is a foreign file).
ROOT_NAMES = frozenset({MANIFEST, RUN_RECORD, LEASE, DOCS, SHARDS, STATS, LABELS, SHARD_INDEX, PARTS})


def join(*parts: str) -> str:
    """Join path parts with "/" (a leading part keeps its own leading slash or protocol)."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def shard_id(part: int, position: int) -> str:
    """Format v2 shard id: the corpus part and the shard's position in it ("000003-000012"); sorting the ids as
    strings gives row order while both numbers fit their six digits (wider numbers keep them unique)."""
    return f"{part:06d}-{position:06d}"


def part_file(root: str, part: int, suffix: str) -> str:
    """parts/<part>.json (a finished part's commit record), .docs.parquet (its documents), .stats.safetensors."""
    return join(root, PARTS, f"{part:06d}{suffix}")


PART_RECORD, PART_DOCS, PART_STATS = ".json", ".docs.parquet", ".stats.safetensors"


def shard_dir(root: str, shard_id: str) -> str:
    return join(root, SHARDS, shard_id)


def shard_file(root: str, shard_id: str, name: str) -> str:
    return join(root, SHARDS, shard_id, name)


def label_file(root: str, name: str) -> str:
    """The token-aligned label table `name` (one row per token row)."""
    return join(root, LABELS, f"{name}.parquet")


def tmp_dir(root: str) -> str:
    return join(root, SHARDS, TMP)


def stats_file(root: str, hook: str) -> str:
    return join(root, STATS, hook, SHARD_STATS)


def append_record(tag: str) -> str:
    """Commit record of one `append: hooks` run inside a shard folder."""
    return f"append-{tag}.json"


def append_stats(tag: str) -> str:
    """Statistics of the hooks one `append: hooks` run added to a shard."""
    return f"stats-{tag}.safetensors"
