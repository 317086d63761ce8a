"""Analysis results name their store, job and version; the report shows only results of its own store; results go
to the output URL as given (memory://, s3://), never to a local folder named after the scheme."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.cli import main
from actstore.pipeline.analysis.jobs import run_probe_job, run_sae_job, run_spectrum_job
from actstore.pipeline.analysis.report import scan_results, write_report
from actstore.schemas.jobs import ProbeJob, SAEJob, SpectrumJob
from tests.support import s3_bucket, s3_options

HOOK = "blocks.0.hook_resid_post"
N, D = 2400, 16


def _store(root: Path, name: str, seed: int, labels: list) -> actstore.Store:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    doc = np.arange(N) // 40  # 60 documents of 40 tokens
    y = np.array(labels * (60 // len(labels)))
    x[:, 0] += 3 * (y[doc] == y[0])  # a direction that tells the classes apart
    tokens = {"doc_id": doc, "position": np.arange(N) % 40, "special": np.arange(N) % 40 == 0}
    docs = {"doc_id": np.arange(60), "label": y}
    return actstore.from_arrays({HOOK: x}, str(root / name), tokens=tokens, docs=docs, shard_tokens=800)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    return root, _store(root, "a", 0, ["yes", "no"]), _store(root, "b", 1, ["yes", "no"])


def _quick_sae(store, out) -> SAEJob:
    return SAEJob.build({"store": store.url, "hooks": [HOOK], "out": str(out), "n_eval_seqs": 0,
                         "sae": {"expansion": 2, "k": 4},
                         "train": {"training_tokens": 4096, "batch_size": 512, "threads": 1}})


@pytest.mark.dask
def test_every_result_records_its_store_job_and_version(stores):
    root, a, _ = stores
    run_sae_job(_quick_sae(a, root / "out-a" / "sae"))
    metrics = json.loads(next((root / "out-a" / "sae").glob("*/metrics.json")).read_text())
    probe = run_probe_job(ProbeJob.build({"store": a.url, "label": "label", "out": str(root / "out-a"),
                                          "probe": {"threads": 1}}))
    run_spectrum_job(SpectrumJob.build({"store": a.url, "out": str(root / "out-a" / "spectra")}))
    probes = json.loads((root / "out-a" / "probes-label.json").read_text())
    spec = json.loads((root / "out-a" / "spectra" / f"spectrum-{HOOK}.json").read_text())
    for prov, kind in ((metrics["provenance"], "sae"), (probes["provenance"], "probe_sweep"),
                       (spec["provenance"], "spectrum")):
        assert prov["kind"] == kind and prov["store_url"] == a.url
        assert prov["store_manifest_sha256"] == a.manifest_sha256
        assert prov["actstore_version"] == actstore.__version__ and prov["job"]["store"] == a.url
    assert metrics["provenance"]["job"]["sae"]["k"] == 4 and metrics["hooks"] == [HOOK]
    sae_meta = json.loads(next((root / "out-a" / "sae").glob("*/actstore.json")).read_text())
    cfg = json.loads(next((root / "out-a" / "sae").glob("*/cfg.json")).read_text())
    assert cfg["hook_name"] == HOOK and sae_meta["metadata"]["provenance"]["store_manifest_sha256"]
    assert probe.table[0]["n_test_docs"] > 0 and sum(probe.table[0]["test_class_counts"].values()) > 0
    weights = root / "out-a" / "probes-label" / f"{HOOK}.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "np") as f:
        meta = json.loads(f.metadata()["actstore"])
    assert meta["classes"] == ["no", "yes"] and meta["info"]["hook"] == HOOK


@pytest.mark.dask
def test_report_shows_only_results_of_its_store(stores):
    root, a, b = stores
    shared = root / "shared"
    for st in (a, b):
        run_spectrum_job(SpectrumJob.build({"store": st.url, "out": str(shared / Path(st.url).name)}))
    run_probe_job(ProbeJob.build({"store": b.url, "label": "label", "out": str(shared), "probe": {"threads": 1}}))
    found = scan_results(shared, a.manifest_sha256)
    assert list(found.spectra) == [HOOK] and "/a/" in found.spectra[HOOK][0]
    assert found.probes == [] and found.other_stores == 2  # b's spectrum and b's probe table
    out = write_report(a, str(root / "report-a.html"), results_dir=str(shared))
    page = Path(out).read_text()
    assert 'id="probe-results"' not in page and "made from other stores" in page


def test_train_result_save_knows_its_hook(stores, tmp_path):
    _, a, _ = stores
    res = actstore.train_sae(a, HOOK, expansion=2, k=4, training_tokens=2048, batch_size=512, n_eval_seqs=0)
    res.save(str(tmp_path / "sae"))  # no hook_name given: the result knows it
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["hook_name"] == HOOK and cfg["hook_layer"] == 0
    meta = json.loads((tmp_path / "sae" / "actstore.json").read_text())
    assert meta["metadata"]["provenance"]["store_manifest_sha256"] == a.manifest_sha256


@pytest.mark.s3
@pytest.mark.dask
def test_cli_results_go_to_s3_as_given(stores, tmp_path, monkeypatch, moto_endpoint):
    root, a, _ = stores
    opts = s3_options(moto_endpoint)
    fs = s3_bucket(opts, "results")
    monkeypatch.chdir(tmp_path)  # a local folder named "s3:" would appear here if a URL became a path
    so = json.dumps(opts)
    assert main(["train", "sae", "--store", a.url, "--hook", HOOK, "--out", "s3://results/sae", "--expansion", "2",
                 "--k", "4", "--training-tokens", "4096", "--batch-size", "512", "--n-eval-seqs", "0",
                 "--threads", "1", "--storage-options", so]) == 0
    assert main(["train", "probe", "--store", a.url, "--label", "label", "--out", "s3://results/probes",
                 "--threads", "1", "--storage-options", so]) == 0
    assert main(["spectra", a.url, "--out", "s3://results/spectra", "--storage-options", so]) == 0
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())
    names = {p.split("/", 1)[1] for p in fs.find("results")}
    run = f"sae/{HOOK}"
    assert {f"{run}/cfg.json", f"{run}/sae_weights.safetensors", f"{run}/metrics.json",
            f"{run}/checkpoints/latest.json", "probes/probes-label.json", "probes/probes-label.png",
            f"probes/probes-label/{HOOK}.safetensors", f"spectra/spectrum-{HOOK}.json"} <= names
    local = tmp_path / "copy"
    fs.get(f"results/{run}", str(local), recursive=True)
    from actstore.workers.sae.saelens import load_saelens

    sae = load_saelens(local)
    assert sae.cfg.d_in == D and sae.cfg.k == 4
    report = "s3://results/report.html"
    assert main(["report", a.url, "-o", report, "--results", "s3://results", "--storage-options", so]) == 0
    page = fs.cat_file("results/report.html").decode()
    assert 'id="probe-results"' in page and 'id="sae-results"' in page
