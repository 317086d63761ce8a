"""The intervene, lens, encode and features verbs end to end, and the report's lens plot and feature pages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from actstore.cli import main
from actstore.pipeline.analysis.directions import Direction
from actstore.workers.sae.model import SAEConfig, SparseAutoencoder
from actstore.workers.sae.saelens import save_saelens
from tests.support import corpus_texts, extract_local

HOOK = "blocks.1.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_intervene_from_yaml_with_overrides(tiny_lm, tmp_path, capsys):
    model = tiny_lm("gpt2")
    path = Direction(np.random.default_rng(0).standard_normal(32), HOOK, "manual").save(tmp_path / "v.safetensors")
    cfg = tmp_path / "iv.yaml"
    cfg.write_text(yaml.safe_dump({"model": model, "corpus": [t[:200] for t in corpus_texts(3)], "hooks": [HOOK],
                                   "mode": "add", "scales": [0, 4], "direction": path, "executor": "local",
                                   "context_length": 24, "progress": False}))
    assert main(["intervene", str(cfg), "--set", "topk=2", "--mode", "[add, ablate]", "--out", str(tmp_path / "o"),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["mode"], r["scale"]) for r in rows] == [("add", 0.0), ("add", 4.0), ("ablate", 0.0), ("ablate", 4.0)]
    assert rows[0]["delta_loss"] == 0.0 and rows[1]["kl"] > 0 and len(rows[1]["top_increased"]) == 2
    assert (tmp_path / "o" / "intervene.parquet").exists()


def test_lens_encode_features_and_report(tiny_lm, tmp_path, capsys):
    model = tiny_lm("gpt2")
    docs = [{"text": t[:300], "label": i % 2} for i, t in enumerate(corpus_texts(10))]
    store = extract_local(model, tmp_path / "s", ["blocks.0.hook_resid_post", HOOK, "blocks.2.hook_resid_post"], docs)
    assert main(["lens", store.url, "-o", str(tmp_path / "res"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1]["kl_to_final"] == 0.0 and rows[-1]["top1_agreement"] == 1.0
    save_saelens(SparseAutoencoder(SAEConfig(d_in=32, expansion=2, k=4)), tmp_path / "sae", HOOK,
                 extra_metadata={"model_name": model})
    assert main(["encode", store.url, "--sae", str(tmp_path / "sae"), "-o", str(tmp_path / "feat"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == 4
    assert main(["features", str(tmp_path / "feat"), "--label", "label", "--top-n", "2", "--json"]) == 0
    lists = json.loads(capsys.readouterr().out)
    assert set(lists) == {"most_frequent", "most_label_correlated"} and lists["most_frequent"]
    assert (tmp_path / "feat" / "summary" / "latents.parquet").exists()
    assert main(["report", store.url, "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert 'id="logit-lens"' in page and 'id="feature-density-0"' in page and "<mark>" in page
    assert page.count('id="features-0-most_frequent"') == 1
