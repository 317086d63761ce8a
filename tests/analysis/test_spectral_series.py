"""`actstore.spectral_series`: per-document sliding-window spectra equal numpy's eigenvalues of np.corrcoef on the
same rows; `train_probe(features="spectral")` reads a planted per-document correlation; the CLI verb writes the
same table; bad inputs are refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import actstore
from actstore.cli import main

HOOK = "blocks.0.hook_resid_post"
D = 12


def _planted(n_docs: int = 40, seed: int = 0) -> tuple[np.ndarray, dict, dict]:
    """Docs of 20..44 rows (row 0 special, huge); odd docs share one strong direction (label 1), even are white
    noise (label 0). One extra 5-row document is shorter than any window used here."""
    rng = np.random.default_rng(seed)
    rows, doc, special, labels = [], [], [], []
    for i in range(n_docs + 1):
        n = 5 if i == n_docs else int(rng.integers(20, 45))
        x = rng.standard_normal((n, D))
        if i % 2:
            x += 3 * rng.standard_normal((n, 1)) * rng.standard_normal(D)[None, :]
        x[0] = 50.0 + rng.standard_normal(D)  # special token rows would dominate every window if kept
        rows.append(x)
        doc += [i] * n
        special += [True] + [False] * (n - 1)
        labels.append(i % 2)
    tokens = {"doc_id": np.array(doc), "seq_id": np.array(doc), "special": np.array(special),
              "position": np.concatenate([np.arange(len(r)) for r in rows])}
    return np.concatenate(rows).astype(np.float32), tokens, {"doc_id": np.arange(n_docs + 1), "label": labels}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, tokens, docs = _planted()
    return actstore.from_arrays({HOOK: x}, str(tmp_path_factory.mktemp("ss") / "s"), tokens=tokens, docs=docs,
                                shard_tokens=97)  # windows straddle shards


def _oracle_windows(store, window: int, stride: int) -> list[tuple[int, int, np.ndarray]]:
    x = store.to_numpy(HOOK).astype(np.float64)
    tok = store.tokens()
    doc, special = tok.column("doc_id").to_numpy(), tok.column("special").to_numpy(zero_copy_only=False)
    out = []
    for d in np.unique(doc):
        idx = np.flatnonzero((doc == d) & ~special)
        for s in range(0, len(idx) - window + 1, stride):
            out.append((int(d), int(idx[s]), np.sort(np.linalg.eigvalsh(np.corrcoef(x[idx[s:s + window]].T)))[::-1]))
    return out


def test_windows_equal_numpy_corrcoef_eigenvalues(store):
    window, stride = 8, 5
    t = actstore.spectral_series(store, HOOK, window=window, stride=stride)
    ref = _oracle_windows(store, window, stride)
    assert t.num_rows == len(ref) and set(t.column("hook").to_pylist()) == {HOOK}
    assert 40 not in t.column("doc_id").to_pylist()  # 4 kept rows < window: no window
    assert t.column("doc_id").to_pylist() == [r[0] for r in ref]
    assert t.column("first_row").to_pylist() == [r[1] for r in ref]
    assert np.all(np.asarray(t.column("window_end")) - np.asarray(t.column("window_start")) == window)
    eig = [np.clip(r[2], 0, None) for r in ref]
    p = [e / e.sum() for e in eig]
    entropy = np.array([-(q[q > 0] * np.log(q[q > 0])).sum() for q in p])
    np.testing.assert_allclose(t.column("top_eigenvalue").to_numpy(), [e[0] for e in eig], rtol=1e-9)
    np.testing.assert_allclose(t.column("spectral_entropy").to_numpy(), entropy, rtol=1e-9)
    np.testing.assert_allclose(t.column("effective_rank").to_numpy(), np.exp(entropy), rtol=1e-9)
    assert np.all(np.isfinite(t.column("ks").to_numpy()))


def test_covariance_basis_and_special_rows(store):
    t = actstore.spectral_series(store, [HOOK], window=10, basis="covariance", exclude_special=False)
    x = store.to_numpy(HOOK).astype(np.float64)
    r = t.slice(0, 1).to_pylist()[0]
    assert r["first_row"] == 0 and r["window_start"] == 0  # the special row is windowed now
    top = np.linalg.eigvalsh(np.cov(x[0:10].T))[-1]
    np.testing.assert_allclose(r["top_eigenvalue"], top, rtol=1e-9)


def test_spectral_probe_reads_the_planted_label(store):
    spectral = actstore.train_probe(store, HOOK, label="label", features="spectral", series_window=8)
    assert spectral.metrics["auroc"] >= 0.95  # chance is 0.5
    assert spectral.info["n_features"] == 12 and spectral.info["n_docs_imputed"] == 1  # the 5-row document
    plain = actstore.train_probe(store, HOOK, label="label")
    assert all(np.array_equal(spectral.split[k], plain.split[k]) for k in ("train", "val", "test"))


def test_response_rows(store, monkeypatch):
    with pytest.raises(actstore.ConfigError, match="no `response` column") as e:
        actstore.spectral_series(store, HOOK, window=4, rows="response")
    assert "\n" not in str(e.value)
    tok = store.tokens()
    resp = tok.column("position").to_numpy() >= 10
    monkeypatch.setattr(store, "tokens", lambda: tok.append_column("response", pa.array(resp)))
    t = actstore.spectral_series(store, HOOK, window=4, rows="response")
    first = np.asarray(t.column("first_row"))
    assert t.num_rows > 0 and resp[first].all() and resp[np.asarray(t.column("last_row"))].all()
    assert np.all(tok.column("position").to_numpy()[first[t.column("window_start").to_numpy() == 0]] == 10)


@pytest.mark.parametrize("kw, err, pattern", [
    ({"window": 1}, actstore.ConfigError, "window"),
    ({"window": 4, "stride": 0}, actstore.ConfigError, "stride"),
    ({"window": 4, "rows": "prompt"}, actstore.ConfigError, "rows"),
    ({"window": 4, "hooks": "blocks.3.hook_resid_post"}, actstore.ActstoreError, "blocks.3.hook_resid_post"),
])
def test_bad_input(store, kw, err, pattern):
    kw = {"hooks": HOOK, **kw}
    with pytest.raises(err, match=pattern) as e:
        actstore.spectral_series(store, **kw)
    assert "\n" not in str(e.value)


def test_cli_writes_the_table(store, tmp_path, capsys):
    out = tmp_path / "series.parquet"
    assert main(["spectral-series", store.url, "--window", "8", "--stride", "4", "--hook", HOOK, "-o", str(out)]) == 0
    assert "windows over" in capsys.readouterr().out
    written = pq.read_table(out)
    expect = actstore.spectral_series(store, HOOK, window=8, stride=4)
    assert written.replace_schema_metadata(None).equals(expect)
    prov = json.loads(written.schema.metadata[b"actstore"])
    assert prov["store_manifest_sha256"] == store.manifest_sha256 and prov["job"]["window"] == 8
    assert main(["spectral-series", store.url, "--window", "1"]) == 2
    assert "window" in capsys.readouterr().err


@pytest.mark.parametrize("basis", ["correlation", "covariance"])
@pytest.mark.parametrize("n, d", [(8, 40), (30, 40), (40, 12)])
def test_short_windows_via_the_gram_matrix_equal_the_full_matrix(basis, n, d):
    """Windows with fewer rows than columns take the (n, n) Gram route: same numbers as the (d, d) matrix."""
    from actstore.workers.covariance import CovarianceAccumulator
    from actstore.workers.spectra import accumulated_descriptors, window_descriptors

    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, d)
    x += 4 * rng.standard_normal((n, 1)) * rng.standard_normal(d)  # a spike
    x[:, 3] = 7.0  # a constant column: dropped in the correlation basis
    fast = window_descriptors(x, basis=basis)
    full = accumulated_descriptors(CovarianceAccumulator(d).update(x), 4.0, basis)
    assert fast.keys() == full.keys() and fast["n_outliers"] == full["n_outliers"]
    for k in fast:
        np.testing.assert_allclose(fast[k], full[k], rtol=1e-7, atol=1e-9, err_msg=k)


def test_report_draws_the_series_by_class(store, tmp_path, capsys):
    """The report finds the series file by its provenance and draws a few documents of each label class; a series
    of another store and a foreign Parquet file beside it are not drawn."""
    out = tmp_path / "res"
    out.mkdir()
    assert main(["spectral-series", store.url, "--window", "8", "--hook", HOOK, "-o", str(out / "s.parquet")]) == 0
    other = actstore.from_arrays({HOOK: np.ones((40, D), np.float32)}, str(tmp_path / "other"))
    actstore.spectral_series(other, HOOK, window=8)  # in memory only
    pq.write_table(pa.table({"x": [1, 2]}), out / "foreign.parquet")
    page = tmp_path / "r.html"
    assert main(["report", store.url, "-o", str(page), "--results", str(out), "--label", "label"]) == 0
    html = page.read_text()
    assert 'id="spectral-series"' in html and 'id="series-0"' in html and 'id="series-1"' not in html
    docs_table = html.split('id="series-0-docs"')[1].split("</table>")[0]
    rows = [[c.split("</td>")[0] for c in r.split("<td>")[1:]] for r in docs_table.split("<tr>")[2:]]
    assert sorted(r[1] for r in rows) == ["0"] * 4 + ["1"] * 4  # DOCS_PER_CLASS of each class
    labels = dict(zip(*(store.docs().column(c).to_pylist() for c in ("doc_id", "label"))))
    assert all(str(labels[int(r[0])]) == r[1] for r in rows)
    assert main(["report", store.url, "-o", str(tmp_path / "bad.html"), "--label", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "bad.html").exists()
