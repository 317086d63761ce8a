"""Corpus reading as a newcomer meets it: byte-order marks, folders with other files, mixed metadata types."""

from __future__ import annotations

import json
import logging

import pytest

from actstore.pipeline.extract.sharding import make_plan
from actstore.schemas.config import ExtractConfig
from actstore.workers.corpus import iter_documents
from actstore.workers.runner import load_tokenizer


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first", "k": 1}).encode() + b"\n"
                                       + json.dumps({"text": "second", "k": 2}).encode())
    (tmp_path / "b.txt").write_bytes("\ufeffplain text".encode("utf-8"))
    docs = list(iter_documents(str(tmp_path / "a.jsonl")))
    assert [d.text for d in docs] == ["first", "second"] and docs[0].meta == {"k": 1}
    assert [d.text for d in iter_documents(str(tmp_path / "b.txt"))] == ["plain text"]


def test_a_folder_reads_one_type_and_lists_what_it_skips(tmp_path, caplog):
    for name, text in (("a.jsonl", "alpha"), ("b.jsonl", "beta")):
        (tmp_path / name).write_text(json.dumps({"text": text}))
    (tmp_path / "README.md").write_text("# about this corpus")
    (tmp_path / "notes.txt").write_text("not part of the corpus")
    with caplog.at_level(logging.WARNING, "actstore"):
        docs = [d.text for d in iter_documents(str(tmp_path))]
    assert docs == ["alpha", "beta"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "reading 2 .jsonl files" in warnings[0]
    assert "README.md" in warnings[0] and "notes.txt" in warnings[0]
    both = [d.text for d in iter_documents(str(tmp_path), extensions=[".jsonl", ".txt"])]
    assert both == ["alpha", "beta", "not part of the corpus"]


@pytest.fixture
def gpt2_tokenizer(tiny):
    return tiny("gpt2")


def test_mixed_metadata_types_are_stored_as_strings_and_named(tmp_path, gpt2_tokenizer, caplog):
    lines = [{"text": "one document", "label": 1, "score": 0.5}, {"text": "another", "label": "yes", "score": 2},
             {"text": "third one", "label": None, "score": 1.5}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))
    cfg = ExtractConfig(model=gpt2_tokenizer, corpus=str(path), hooks=["blocks.0.hook_resid_post"], output="x",
                        context_length=16)
    with caplog.at_level(logging.WARNING, "actstore"):
        plan = make_plan(cfg, load_tokenizer(gpt2_tokenizer))
    assert plan.docs.column("label").to_pylist() == ["1", "yes", None]
    assert plan.docs.column("score").to_pylist() == [0.5, 2.0, 1.5]  # ints and floats are one kind
    text = caplog.text
    assert "metadata field 'label' has mixed types" in text and f"{path} line 1" in text and f"{path} line 2" in text


def test_extensions_do_not_change_old_config_hashes():
    cfg = ExtractConfig(model="m", corpus="c", hooks=["blocks.0.hook_resid_post"], output="x")
    assert "extensions" not in cfg.content_dict()
    assert cfg.model_copy(update={"extensions": [".txt"]}).config_hash() != cfg.config_hash()
