"""The store's file and folder names are spelled in one module only (`actstore.schemas.layout`)."""

from __future__ import annotations

import ast
from pathlib import Path

from actstore.schemas import layout

ROOT = Path(__file__).resolve().parents[2]
FILE_NAMES = {layout.MANIFEST, layout.RUN_RECORD, layout.LEASE, layout.DOCS, layout.SHARD_RECORD, layout.TOKENS,
              layout.ACTS, layout.SHARD_STATS, layout.OUTPUTS, layout.FEATURES_MANIFEST, layout.ENCODE_RECORD,
              layout.CODES, layout.LATENT_IDS, layout.LATENT_VALUES}


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals that are not docstrings (messages that merely mention a name are longer strings)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_module_spells_store_file_names():
    offenders = []
    for pkg in ("actstore", "pipeline", "workers", "schemas"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "schemas" / "layout.py":
                continue
            for line, value in _string_constants(ast.parse(path.read_text())):
                if value in FILE_NAMES:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} {value!r}")
    assert not offenders, "use actstore.schemas.layout instead of:\n" + "\n".join(offenders)


def test_paths():
    assert layout.shard_file("s3://b/run", "000000007", layout.TOKENS) == "s3://b/run/shards/000000007/tokens.parquet"
    assert layout.stats_file("/data/run/", "blocks.0.hook_resid_post") == \
        "/data/run/stats/blocks.0.hook_resid_post/stats.safetensors"
    assert layout.tmp_dir("memory://x") == "memory://x/shards/.tmp"
