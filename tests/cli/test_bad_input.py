"""Bad input fails before any forward pass, with a one-line message and a non-zero exit, and writes nothing."""

from __future__ import annotations

import json

import pytest
import yaml

from actstore.cli import main
from actstore.workers import runner as runner_mod


def _forbid_forward(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("a forward pass / model load started before validation finished")

    monkeypatch.setattr(runner_mod.ModelRunner, "__init__", boom)


@pytest.fixture
def no_forward(monkeypatch):
    """Fail the test if a model forward (or weight load) starts."""
    _forbid_forward(monkeypatch)


def _run(tmp_path, capsys, **overrides):
    cfg = {"model": overrides.pop("model"), "corpus": overrides.pop("corpus", None), "hooks": ["blocks.0.hook_resid_post"],
           "executor": "local", "output": str(tmp_path / "out"), "progress": False, "context_length": 32}
    cfg.update(overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()  # drop anything fixtures printed
    code = main(["extract", str(path)])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def corpus_file(tmp_path, texts):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(texts[:4])))
    return str(p)


CASES = [
    ("unknown hook", {"hooks": ["blocks.0.hook_resid_bogus"]}, "unknown hook name"),
    ("layer out of range", {"hooks": ["blocks.7.hook_resid_post"]}, "out of range.*blocks.0..2.hook_resid_post"),
    ("missing model", {"model": "/nonexistent/model/dir"}, "does not exist"),
    ("missing text_field", {"text_field": "body"}, "has no field 'body'"),
    ("context too long", {"context_length": 4096}, "exceeds the model's limit of 128"),
    ("unknown dtype", {"dtype": "float8"}, "dtype"),
    ("unknown key", {"contxt_length": 12}, "did you mean 'context_length'"),
    ("zero size", {"batch_size": 0}, "batch_size"),
    ("path separator in hook", {"hooks": ["module:h/../../etc"]}, "invalid module hook"),
]


@pytest.mark.parametrize("name,change,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, tiny, corpus_file, no_forward, name, change, pattern):
    change = dict(change)
    code, err = _run(tmp_path, capsys, model=change.pop("model", tiny("gpt2")), corpus=corpus_file, **change)
    assert code != 0
    assert err.count("\n") == 0 and err.startswith("actstore: error:"), err
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path, capsys, tiny, no_forward):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = _run(tmp_path, capsys, model=tiny("gpt2"), corpus=str(empty))
    assert code != 0 and "holds no documents" in err and not (tmp_path / "out").exists()


def test_different_config_on_existing_store(tmp_path, capsys, tiny, corpus_file, monkeypatch):
    code, _ = _run(tmp_path, capsys, model=tiny("gpt2"), corpus=corpus_file)
    assert code == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    _forbid_forward(monkeypatch)
    code, err = _run(tmp_path, capsys, model=tiny("gpt2"), corpus=corpus_file, context_length=16)
    assert code != 0 and "different config" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before


def test_foreign_output_is_refused(tmp_path, capsys, tiny, corpus_file, no_forward):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, err = _run(tmp_path, capsys, model=tiny("gpt2"), corpus=corpus_file)
    assert code != 0 and "not an actstore store" in err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_malformed_yaml(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\nhooks: x\n")
    assert main(["extract", str(p)]) != 0
    err = capsys.readouterr().err.strip()
    assert "malformed YAML" in err and "line" in err and err.count("\n") == 0


def test_wrong_type(tmp_path, capsys, tiny, corpus_file, no_forward):
    code, err = _run(tmp_path, capsys, model=tiny("gpt2"), corpus=corpus_file, context_length="long")
    assert code != 0 and "context_length" in err


def test_non_utf8_document(tmp_path, capsys, tiny, no_forward):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"hello \xff\xfe world")
    code, err = _run(tmp_path, capsys, model=tiny("gpt2"), corpus=str(p))
    assert code != 0 and "not valid UTF-8" in err and "bad.txt" in err


def test_unmapped_architecture_suggests_module_hooks(tmp_path, capsys, no_forward):
    import transformers as T

    model = T.AutoModel.from_config(T.GPTJConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=50, rotary_dim=4))
    model.save_pretrained(tmp_path / "gptj")
    code, err = _run(tmp_path, capsys, model=str(tmp_path / "gptj"), corpus=["hi there"])
    assert code != 0 and "no canonical hook map" in err and "module:" in err


def test_help_config_lists_every_key(capsys):
    from actstore.cli import main
    from actstore.schemas.config import ExtractConfig, TokenOutputs

    assert main(["extract", "--help-config"]) == 0
    out = capsys.readouterr().out
    keys = [*ExtractConfig.model_fields, *(f"token_outputs.{k}" for k in TokenOutputs.model_fields)]
    assert all(f"\n{k}: " in f"\n{out}" for k in keys)
    assert "Literal['float32', 'float16', 'bfloat16'] (default 'float32')" in out  # dtype: choices and default
