"""The HTML report renders in headless Chromium with every figure embedded, every table present, nothing external."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.pipeline.analysis.report import default_spectra_hooks, scan_results, write_report
from actstore.pipeline.analysis.spectra import save_spectrum, spectrum

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post",
         "blocks.1.mlp.hook_post"]
FIGURES = [f"spectrum-{h}" for h in HOOKS] + ["layer-norms", "layer-cosine", "layer-updates", "layer-massive",
                                              "mlp-sparsity", "probe-auroc"]
TABLES = ["store-summary", "hook-summary", "spectra-summary", "spectra-massive-dims", "massive-activations",
          "sae-results", "probe-results"]
EVIL = "<script>alert('x')</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A store (3 residual layers + MLP neurons, n=3000, d=16) beside SAE, probe and spectrum results."""
    rng = np.random.default_rng(0)
    n, d = 3000, 16
    x0 = rng.standard_normal((n, d))
    x1 = x0 + 0.5 * rng.standard_normal((n, d))
    x2 = 2 * x1 + rng.standard_normal((n, d))
    x2[5, 3] = 4000.0  # a massive activation
    mlp = np.maximum(rng.standard_normal((n, 64)) - 0.5, 0)
    arrays = dict(zip(HOOKS, (a.astype(np.float32) for a in (x0, x1, x2, mlp))))
    tokens = {"special": np.arange(n) % 100 == 0, "doc_id": np.arange(n) // 100, "position": np.arange(n) % 100}
    root = tmp_path_factory.mktemp("run")
    store = actstore.from_arrays(arrays, str(root / "store"), tokens=tokens, shard_tokens=1000)
    mine = {"store_manifest_sha256": store.manifest_sha256}  # results are matched to the store by this hash
    sae = root / "saes" / "l1-topk"
    sae.mkdir(parents=True)
    (sae / "cfg.json").write_text(json.dumps({"hook_name": "blocks.1.hook_resid_post", "architecture": "topk",
                                              "d_in": d, "d_sae": 128}))
    (sae / "metrics.json").write_text(json.dumps({"fvu": 0.125, "ev_legacy": 0.9, "ev_zero_centred": 0.95,
                                                  "l0": 8.0, "dead_fraction": 0.0, "note": EVIL,
                                                  "provenance": mine}))
    probes = [{"hook": h, "auroc": a, "accuracy": 0.8, "f1": 0.7, "recall_at_1pct_fpr": 0.1,
               "recall_at_5pct_fpr": 0.3} for h, a in zip(HOOKS[:3], (0.6, 0.75, 0.9))]
    (root / "probes-has_example.json").write_text(json.dumps({"label": "has_example", "rows": probes,
                                                              "provenance": mine}))
    (root / "probes-broken.json").write_text("{not json")
    spec_dir = root / "spectra"
    spec_dir.mkdir()
    res = spectrum(store, HOOKS[0])
    # No string metrics (basis, null): the report must then take them from the file's top level, and find the
    # hook from the file name alone.
    res.metrics = {k: v for k, v in res.metrics.items() if not isinstance(v, str)}
    save_spectrum(res, str(spec_dir / f"spectrum-{HOOKS[0]}.json"), store=store)
    return root


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    out = run_dir / "out" / "report.html"
    assert write_report(str(run_dir / "store"), out) == str(out)  # results_dir defaults to the store's parent
    return out


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=120, check=True)


class _DOM(HTMLParser):
    """Collects every element's attributes (by tag) and the page text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def dom(report, tmp_path_factory) -> _DOM:
    res = _chromium(["--dump-dom", report.as_uri()], tmp_path_factory.mktemp("chromium"))
    parser = _DOM()
    parser.feed(res.stdout.decode("utf-8"))
    assert any(tag == "body" for tag, _ in parser.elements), res.stderr.decode()[-2000:]
    return parser


def _png_width(src: str) -> int:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix) and len(src) > len(prefix) + 100
    png = base64.b64decode(src[len(prefix):], validate=True)
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    return struct.unpack(">I", png[16:20])[0]


def test_every_figure_is_an_embedded_png(dom):
    imgs = {a.get("id"): a for tag, a in dom.elements if tag == "img"}
    assert set(FIGURES) <= set(imgs), sorted(set(FIGURES) - set(imgs))
    for fig_id in FIGURES:
        assert imgs[fig_id]["alt"] == fig_id
        assert _png_width(imgs[fig_id]["src"]) > 100


def test_tables_and_escaped_text(dom, report):
    tables = {a.get("id") for tag, a in dom.elements if tag == "table"}
    assert set(TABLES) <= tables, sorted(set(TABLES) - tables)
    text = " ".join(dom.text)
    for expected in ("3,000", "float32", "blocks.2.hook_resid_post", "l1-topk", "has_example", "0.125", EVIL):
        assert expected in text
    assert not any(tag == "script" for tag, _ in dom.elements)  # the planted markup stayed text
    assert "&lt;script&gt;" in report.read_text()
    # the stored spectrum was reused, the others computed; the broken probes file is reported, not fatal
    stored = report.parent.parent / "spectra" / f"spectrum-{HOOKS[0]}.json"
    assert f"{HOOKS[0]} correlation spectrum ({stored})" in text
    assert f"{HOOKS[1]} correlation spectrum (computed for this report)" in text
    assert "share of total variance" in text  # the dominant dimensions table (x2 has a 4000 at dim 3)
    assert text.count("probes-broken.json") == 1 and "skipped" in text


def test_no_external_resources(dom, report):
    for tag, attrs in dom.elements:
        assert tag not in ("script", "link", "iframe", "object", "embed")
        for k in ("src", "href", "srcset", "poster", "data", "action"):
            v = attrs.get(k, "").strip().lower()
            assert not v.startswith(("http:", "https:", "//")), (tag, k, v[:80])
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", report.read_text(), re.IGNORECASE)


def test_screenshot_renders(report, tmp_path):
    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri()], tmp_path / "profile")
    assert _png_width("data:image/png;base64," + base64.b64encode(shot.read_bytes()).decode()) == 1200


def test_results_scan_skips_stores_and_bad_files(run_dir):
    found = scan_results(run_dir)
    assert list(found.spectra) == [HOOKS[0]]
    assert [Path(d).name for d, _, _ in found.saes] == ["l1-topk"]
    assert [label for label, _, _ in found.probes] == ["has_example"]
    assert any("probes-broken.json" in n for n in found.notes)


def test_default_spectra_hooks_are_capped_and_spread():
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(12)] + ["blocks.3.mlp.hook_post"]
    picked = default_spectra_hooks(hooks)
    assert len(picked) == 8 and picked[0] == "blocks.0.hook_resid_post" and picked[-1] == "blocks.11.hook_resid_post"
    assert default_spectra_hooks(HOOKS) == [HOOKS[0], HOOKS[3], HOOKS[1], HOOKS[2]]
