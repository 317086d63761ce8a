"""Bad input to every verb: refused with one line `actstore: error: ...`, exit 2, before any work (no Dask cluster,
no forward pass), and nothing written or overwritten. (Extraction's config mistakes: test_bad_input.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import actstore
from actstore.cli import main
from actstore.pipeline.analysis.directions import Direction
from actstore.pipeline.analysis.features import encode
from actstore.workers.sae.model import SAEConfig, SparseAutoencoder
from actstore.workers.sae.saelens import save_saelens
from tests.support import extract_local

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_lm):
    """A small store with binary, three-class, constant and partly missing labels, plus a few files; a store
    of a tiny causal LM with SAE folders, direction files and a feature store made from it."""
    root = tmp_path_factory.mktemp("bad")
    _causal_world(root, tiny_lm("gpt2"))
    n = 600
    x = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    docs = {"doc_id": np.arange(20), "label": np.arange(20) % 2, "topic": np.array(["a", "b", "c", "a"] * 5),
            "const": np.ones(20, np.int64)}
    tokens = {"doc_id": np.arange(n) // 30, "position": np.arange(n) % 30, "special": np.arange(n) % 30 == 0}
    actstore.from_arrays({HOOK: x}, str(root / "store"), tokens=tokens, docs=docs, shard_tokens=200)
    (root / "afile.txt").write_text("mine")
    (root / "existing.npy").write_bytes(b"keep me")
    (root / "folder").mkdir()
    (root / "interrupted").mkdir()
    (root / "interrupted" / "extract.json").write_text("{}")
    (root / "badman").mkdir()
    (root / "badman" / "manifest.json").write_text('{"schema_version": 1, "trunc')
    (root / "typo.yaml").write_text(yaml.safe_dump({"store": str(root / "store"), "hooks": [HOOK],
                                                    "out": str(root / "o"), "trian": {"lr": 1}}))
    return root


def _causal_world(root: Path, lm: str) -> None:
    """Inputs of the intervention, lens and feature verbs (built once per module)."""
    (root / "model").write_text(lm)  # the tiny LM's path, for the {lm} placeholder
    store = extract_local(lm, root / "lmstore", [HOOK, "blocks.0.hook_mlp_out"], ["some words here", "and more"])
    Direction(np.ones(16, np.float32), HOOK, "manual").save(root / "wide.safetensors")
    Direction(np.ones(32, np.float32), "blocks.1.hook_resid_post", "manual").save(root / "otherhook.safetensors")
    sae = SparseAutoencoder(SAEConfig(d_in=32, expansion=2, k=4))
    save_saelens(sae, root / "sae", HOOK, extra_metadata={"model_name": lm})
    save_saelens(sae, root / "sae-otherhook", "blocks.1.hook_resid_post", extra_metadata={"model_name": lm})
    save_saelens(sae, root / "sae-othermodel", HOOK, extra_metadata={"model_name": "EleutherAI/pythia-70m"})
    save_saelens(SparseAutoencoder(SAEConfig(d_in=16, expansion=2, k=4)), root / "sae-wide", HOOK)
    encode(store, root / "sae", str(root / "feat"), progress=False, scheduler=None)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _no_cluster(monkeypatch):
    from actstore.pipeline.analysis import jobs

    def refuse(*a, **k):
        raise AssertionError("a Dask cluster started before the input was checked")

    monkeypatch.setattr(jobs, "dask_client", refuse)


S, B, M, L, F = "{store}", "{root}", "{lm}", "{root}/lmstore", "{root}/feat"
_IV = ["intervene", "--model", M, "--corpus", "[some words]", "--hook", HOOK, "--executor", "local"]
CASES = [
    # inspect / verify
    ("inspect-missing", ["inspect", f"{B}/nothing"], "no actstore store"),
    ("inspect-interrupted", ["inspect", f"{B}/interrupted"], "incomplete.*extract.json"),
    ("inspect-bad-manifest", ["inspect", f"{B}/badman"], "manifest"),
    ("inspect-bad-options", ["inspect", S, "--storage-options", "{bad"], "not valid JSON"),
    ("inspect-options-not-object", ["inspect", S, "--storage-options", "[1]"], "JSON object"),
    ("verify-missing", ["verify", f"{B}/nothing"], "no actstore store"),
    ("verify-bad-manifest", ["verify", f"{B}/badman"], "manifest"),
    # spectra
    ("spectra-unknown-hook", ["spectra", S, "--hook", "blocks.9.hook_resid_post"], "not in this store"),
    ("spectra-bad-precision", ["spectra", S, "--precision", "float16"], "invalid choice"),
    ("spectra-max-tokens", ["spectra", S, "--max-tokens", "1"], "max_tokens"),
    ("spectra-no-store", ["spectra"], "store: Field required"),
    ("spectra-out-is-file", ["spectra", S, "--out", f"{B}/afile.txt"], "is a file"),
    ("spectra-negative-margin", ["spectra", S, "--tw-margin", "-1"], "tw_margin"),
    ("spectra-missing-config", ["spectra", "--config", f"{B}/nope.yaml"], "does not exist"),
    ("spectra-unknown-set", ["spectra", S, "--set", "bogus=1"], "unknown config key 'bogus'"),
    ("spectra-set-without-value", ["spectra", S, "--set", "hooks"], "expected key=value"),
    ("spectra-bad-hook-grammar", ["spectra", S, "--hook", "blocks.0/../x"], "unknown hook name"),
    # train sae
    ("sae-no-out", ["train", "sae", "--store", S, "--hook", HOOK], "out: give an output"),
    ("sae-unknown-hook", ["train", "sae", "--store", S, "--hook", "blocks.3.hook_resid_post", "--out", f"{B}/o"],
     "not in this store"),
    ("sae-k-zero", ["train", "sae", "--store", S, "--hook", HOOK, "--out", f"{B}/o", "--k", "0"], "k: must be >= 1"),
    ("sae-k-too-large", ["train", "sae", "--store", S, "--hook", HOOK, "--out", f"{B}/o", "--k", "100"],
     "must be in \\[1, d_sae=64\\]"),
    ("sae-bad-architecture", ["train", "sae", "--architecture", "gated"], "invalid choice"),
    ("sae-bad-sweep", ["train", "sae", "--store", S, "--hook", HOOK, "--out", f"{B}/o", "--sweep", "k="],
     "expected key=v1"),
    ("sae-sweep-unknown-key", ["train", "sae", "--store", S, "--hook", HOOK, "--out", f"{B}/o", "--sweep", "kk=1,2"],
     "not an sae or train field"),
    ("sae-tokens-below-batch", ["train", "sae", "--store", S, "--hook", HOOK, "--out", f"{B}/o",
                                "--training-tokens", "100"], "training_tokens: must be >= batch_size"),
    ("sae-batch-above-store", ["train", "sae", "--store", S, "--hook", HOOK, "--out", f"{B}/o",
                               "--batch-size", "4096", "--training-tokens", "8192"], "fewer than one batch"),
    ("sae-eval-fraction", ["train", "sae", "--store", S, "--hook", HOOK, "--out", f"{B}/o", "--eval-fraction", "1.5"],
     "eval_fraction"),
    ("sae-bad-lr", ["train", "sae", "--lr", "fast"], "invalid _?nullable|invalid float"),
    ("sae-out-is-file", ["train", "sae", "--store", S, "--hook", HOOK, "--out", f"{B}/afile.txt"], "is a file"),
    ("sae-yaml-typo", ["train", "sae", f"{B}/typo.yaml"], "unknown config key 'trian' \\(did you mean 'train'"),
    ("sae-store-as-config", ["train", "sae", S], "does not exist; .*to read the store at .*, pass --store"),
    ("probe-url-as-config", ["train", "probe", "s3://bucket/store"], "pass --store s3://bucket/store"),
    ("sae-missing-yaml", ["train", "sae", f"{B}/nope.yaml"], "config file '.*nope.yaml' does not exist$"),
    ("sae-missing-store", ["train", "sae", "--store", f"{B}/nothing", "--hook", HOOK, "--out", f"{B}/o"],
     "no actstore store"),
    # train transcoder
    ("tc-no-in-hook", ["train", "transcoder", "--store", S, "--out-hook", HOOK, "--out", f"{B}/o"],
     "in_hook: Field required"),
    ("tc-unknown-out-hook", ["train", "transcoder", "--store", S, "--in-hook", HOOK, "--out-hook",
                             "blocks.0.hook_mlp_out", "--out", f"{B}/o"], "not in this store"),
    # train probe
    ("probe-unknown-label", ["train", "probe", "--store", S, "--label", "sentiment"], "not a document field"),
    ("probe-multiclass", ["train", "probe", "--store", S, "--label", "topic"], "3 classes.*--multiclass"),
    ("probe-one-class", ["train", "probe", "--store", S, "--label", "const"], "1 class"),
    ("probe-bad-kind", ["train", "probe", "--kind", "svm"], "invalid choice"),
    ("probe-unknown-hook", ["train", "probe", "--store", S, "--label", "label", "--hook", "blocks.4.hook_resid_post"],
     "not in this store"),
    ("probe-bad-fractions", ["train", "probe", "--store", S, "--label", "label", "--set", "fractions=[0.5,0.5,0.5]"],
     "fractions"),
    ("probe-no-label", ["train", "probe", "--store", S], "label: Field required"),
    # report
    ("report-missing-store", ["report", f"{B}/nothing", "-o", f"{B}/r.html"], "no actstore store"),
    ("report-unknown-hook", ["report", S, "-o", f"{B}/r.html", "--hook", "blocks.5.hook_resid_post"],
     "not in this store"),
    ("report-parent-is-file", ["report", S, "-o", f"{B}/afile.txt/r.html"], "is a file"),
    ("report-out-is-folder", ["report", S, "-o", f"{B}/folder"], "is a folder"),
    # export
    ("export-reversed-rows", ["export", S, "--hook", HOOK, "--rows", "10:5", "-o", f"{B}/x.npy"], "selects no rows"),
    ("export-empty-rows", ["export", S, "--hook", HOOK, "--rows", "7:7", "-o", f"{B}/x.npy"], "selects no rows"),
    ("export-bad-rows", ["export", S, "--hook", HOOK, "--rows", "abc", "-o", f"{B}/x.npy"], "expected A:B"),
    ("export-existing-out", ["export", S, "--hook", HOOK, "-o", f"{B}/existing.npy"], "exists.*--overwrite"),
    ("export-unknown-hook", ["export", S, "--hook", "blocks.1.hook_resid_post", "-o", f"{B}/x.npy"],
     "not in this store"),
    ("export-bad-format", ["export", S, "--hook", HOOK, "--format", "csv", "-o", f"{B}/x.csv"], "invalid choice"),
    ("export-out-is-folder", ["export", S, "--hook", HOOK, "-o", f"{B}/folder"], "is a folder"),
    # intervene
    ("intervene-empty-scales", [*_IV, "--mode", "zero", "--scales", "[]"], "scales: give at least one scale"),
    ("intervene-no-direction", [*_IV, "--mode", "add", "--scales", "[1]"], "mode add needs a direction file"),
    ("intervene-direction-width", [*_IV, "--mode", "add", "--scales", "[1]", "--direction", f"{B}/wide.safetensors"],
     "direction .* has width 16 but hook"),
    ("intervene-direction-hook", [*_IV, "--mode", "ablate", "--scales", "[1]", "--direction",
                                  f"{B}/otherhook.safetensors"], "was made at 'blocks.1.hook_resid_post'"),
    ("intervene-missing-direction", [*_IV, "--mode", "add", "--scales", "[1]", "--direction", f"{B}/nope.safetensors"],
     "does not exist"),
    ("intervene-not-a-direction", [*_IV, "--mode", "add", "--scales", "[1]", "--direction", f"{B}/afile.txt"],
     "not a direction file"),
    ("intervene-patch-no-source", [*_IV, "--mode", "patch", "--scales", "[1]"], "patch needs source_store"),
    ("intervene-bad-mode", [*_IV, "--mode", "steer", "--scales", "[1]"], "mode.*Input should be"),
    ("intervene-unknown-layer", [*_IV[:5], "--hook", "blocks.9.hook_resid_post", "--mode", "zero", "--scales", "[1]"],
     "out of range"),
    ("intervene-out-is-file", [*_IV, "--mode", "zero", "--scales", "[1]", "--out", f"{B}/afile.txt"], "is a file"),
    # lens
    ("lens-non-residual", ["lens", L, "--hook", "blocks.0.hook_mlp_out"], "not a residual-stream hook"),
    ("lens-hook-not-stored", ["lens", L, "--hook", "blocks.1.hook_resid_post"], "not in this store"),
    ("lens-no-model", ["lens", S], "names no model"),
    ("lens-per-token-no-out", ["lens", L, "--per-token"], "per_token writes"),
    # encode / features
    ("encode-other-hook", ["encode", L, "--sae", f"{B}/sae-otherhook", "-o", f"{B}/f2"], "was trained on "
     "'blocks.1.hook_resid_post'"),
    ("encode-other-model", ["encode", L, "--sae", f"{B}/sae-othermodel", "-o", f"{B}/f2"],
     "trained on activations of 'EleutherAI/pythia-70m'"),
    ("encode-width", ["encode", L, "--sae", f"{B}/sae-wide", "-o", f"{B}/f2"], "reads d_in=16"),
    ("encode-not-an-sae", ["encode", L, "--sae", f"{B}/folder", "-o", f"{B}/f2"], "not an SAE directory"),
    ("encode-no-out", ["encode", L, "--sae", f"{B}/sae"], "out: Field required"),
    ("encode-k-too-large", ["encode", L, "--sae", f"{B}/sae", "-o", f"{B}/f2", "--k", "100"], "exceeds the SAE"),
    ("encode-out-foreign", ["encode", L, "--sae", f"{B}/sae", "-o", f"{B}/interrupted"], "holding other files"),
    ("encode-out-other-sae", ["encode", L, "--sae", f"{B}/sae", "-o", F, "--k", "2"], "another SAE"),
    ("features-missing", ["features", f"{B}/nothing"], "no feature store"),
    ("features-unknown-label", ["features", F, "--label", "sentiment"], "not a document field"),
    ("probe-features-other-store", ["train", "probe", "--store", S, "--label", "label", "--features", f"sae:{F}"],
     "was encoded from"),
    ("probe-features-bad-ref", ["train", "probe", "--store", S, "--label", "label", "--features", F],
     "expected sae:URL"),
    # plan, demo, the CLI itself
    ("plan-missing-config", ["plan", f"{B}/nope.yaml"], "does not exist"),
    ("plan-bad-yaml-key", ["plan", f"{B}/typo.yaml"], "unknown config key"),
    ("demo-bad-executor", ["demo", "--executor", "spark"], "invalid choice"),
    ("demo-out-is-file", ["demo", "--out", f"{B}/afile.txt"], "is a file"),
    ("unknown-verb", ["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("name,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_with_nothing_written(world, monkeypatch, capsys, name, argv, pattern):
    _no_cluster(monkeypatch)
    monkeypatch.chdir(world)
    lm = (world / "model").read_text()
    argv = [a.replace(S, str(world / "store")).replace(B, str(world)).replace(M, lm) for a in argv]
    before = _tree(world)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err.startswith("actstore: error:") and "\n" not in err, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert _tree(world) == before  # nothing written, nothing overwritten


def test_the_suite_covers_every_verb():
    verbs = {c[1][0] if c[1][0] != "train" else f"train {c[1][1]}" for c in CASES}
    assert {"inspect", "verify", "spectra", "train sae", "train transcoder", "train probe", "report", "export",
            "plan", "demo", "intervene", "lens", "encode", "features"} <= verbs
    assert len(CASES) + 9 >= 50  # with the extraction cases of test_bad_input.py


def test_extract_refuses_a_model_folder_without_tokenizer(tmp_path, tiny, capsys):
    import shutil

    model = tmp_path / "notok"
    model.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny("gpt2")) / f, model / f)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(model), "corpus": ["some text"], "hooks": [HOOK],
                                   "executor": "local", "output": str(tmp_path / "out")}))
    assert main(["extract", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer in" in err and str(model) in err and not (tmp_path / "out").exists()


def test_extract_refuses_a_tokenizer_larger_than_the_embedding(tmp_path, tiny, capsys):
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(tiny("gpt2"))
    cfg = T.AutoConfig.from_pretrained(tiny("gpt2"))
    cfg.vocab_size = len(tok) - 10
    small = tmp_path / "small"
    T.AutoModel.from_config(cfg).save_pretrained(small)
    tok.save_pretrained(small)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": str(small), "corpus": ["some text"], "hooks": [HOOK],
                                    "executor": "local", "output": str(tmp_path / "out")}))
    assert main(["extract", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"has {len(tok)} tokens but the model's embedding table only {len(tok) - 10} rows" in err
    assert not (tmp_path / "out").exists()


def test_extract_extensions_must_be_corpus_types(tmp_path, tiny, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": tiny("gpt2"), "corpus": str(tmp_path), "hooks": [HOOK],
                                    "extensions": [".csv"], "output": str(tmp_path / "out")}))
    assert main(["extract", str(path)]) == 2
    assert ".csv is not a corpus file type" in capsys.readouterr().err
