"""The Parquet shard index: records round-trip exactly (equal to pydantic-validated ones), an index written before
a column was added still reads (the column null), and a damaged or incomplete index is a one-line ManifestError."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actstore.pipeline.store.shard_index import index_bytes, read_index
from actstore.schemas.errors import ManifestError
from actstore.schemas.manifest import ShardInfo


def _shards(n: int) -> list[ShardInfo]:
    return [ShardInfo(id=f"{i // 3:06d}-{i % 3:06d}", part=i // 3, seq_start=10 * i, seq_end=10 * i + 10,
                      token_start=100 * i, token_end=100 * i + 100, doc_start=i, doc_end=i, n_tokens=100,
                      arrays={"h0": f"{i:064x}", "h1": f"{i + 1:064x}"}, tokens_sha256=f"{i + 2:064x}",
                      outputs_sha256=None if i % 2 else f"{i + 3:064x}",
                      responses_sha256=f"{i + 4:064x}" if i % 3 else None)
            for i in range(n)]


def test_records_round_trip_equal_validated_ones():
    shards = _shards(7)
    back = read_index(index_bytes(shards, ["h0", "h1"]), "shards.parquet")
    assert [s.model_dump() for s in back] == [s.model_dump() for s in shards]
    assert [ShardInfo.model_validate(s.model_dump()) for s in back] == shards


def test_an_index_without_a_later_column_reads_it_as_null():
    table = pq.read_table(pa.BufferReader(index_bytes(_shards(4), ["h0", "h1"]))).drop_columns(["responses_sha256"])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    back = read_index(buf.getvalue(), "shards.parquet")
    assert [s.responses_sha256 for s in back] == [None] * 4
    assert [s.tokens_sha256 for s in back] == [s.tokens_sha256 for s in _shards(4)]


def test_damaged_or_incomplete_index_is_one_line():
    with pytest.raises(ManifestError, match="not a readable shard index") as e:
        read_index(b"not parquet", "s3://b/st/shards.parquet")
    assert "\n" not in str(e.value)
    table = pq.read_table(pa.BufferReader(index_bytes(_shards(2), ["h0"]))).drop_columns(["tokens_sha256"])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with pytest.raises(ManifestError, match=r"lacks the columns \['tokens_sha256'\]"):
        read_index(buf.getvalue(), "shards.parquet")
