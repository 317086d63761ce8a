"""layer_statistics on a store with planted values: every statistic equals an independent numpy computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import actstore
from actstore.pipeline.analysis.layer_stats import layer_statistics, plan_layers, to_json

N, D, D_MLP = 2400, 16, 32
NORMS = {"blocks.0.hook_resid_pre": 2.0, "blocks.0.hook_resid_post": 5.0, "blocks.1.hook_resid_post": 5.0,
         "blocks.2.hook_resid_post": 8.0}
MASSIVE_ROW, MASSIVE_DIM, MASSIVE_VALUE = 777, 5, -5000.0
BIG_ROW = 901  # every entry 120: above 100 but not 1000 x the token's median, so "big" and not "massive"
DEAD = [0, 1, 2, 3]  # MLP neurons never positive on ordinary tokens (but positive on special ones)


def _rows_with_norm(rng: np.random.Generator, norm: float) -> np.ndarray:
    x = rng.standard_normal((N, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True) * norm).astype(np.float32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    pos = (np.arange(N) % 40).astype(np.int32)
    special = pos == 0
    assert not special[[MASSIVE_ROW, BIG_ROW]].any()
    a = {h: _rows_with_norm(rng, r) for h, r in NORMS.items()}
    a["blocks.1.hook_resid_post"] = a["blocks.0.hook_resid_post"].copy()  # identical layers: cosine 1, update 0
    a["blocks.2.hook_resid_post"][MASSIVE_ROW, MASSIVE_DIM] = MASSIVE_VALUE
    a["blocks.2.hook_resid_post"][BIG_ROW] = 120.0
    for h in NORMS:  # extreme special rows: any leak changes norms, cosines and the top entry
        a[h][special] = 0.0
        a[h][special, 3] = 1e4 * (1 + int(h[7]))
    for layer, rate in ((0, 0.3), (1, 0.1)):
        m = np.maximum(rng.standard_normal((N, D_MLP)) + np.quantile(rng.standard_normal(9999), rate), 0)
        m[:, DEAD] = -np.abs(m[:, DEAD])
        m[special] = 1.0  # on special tokens every neuron fires
        a[f"blocks.{layer}.mlp.hook_post"] = m.astype(np.float32)
    tokens = {"token_id": (np.arange(N) * 7 % 1000).astype(np.int32), "position": pos,
              "doc_id": np.arange(N) // 40, "special": special}
    store = actstore.from_arrays(a, str(tmp_path_factory.mktemp("ls") / "s"), tokens=tokens, shard_tokens=700)
    return store, a, tokens


def _ref(a: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, dict]:
    """Independent numpy statistics of the rows in `keep`."""
    x = {h: v[keep].astype(np.float64) for h, v in a.items()}
    norm = {h: np.linalg.norm(v, axis=1) for h, v in x.items() if "resid" in h}
    out = {"mean_norm": {h: v.mean() for h, v in norm.items()}, "cos": {}, "upd": {}, "massive": {}, "big": {}}
    for p, q in [("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"),
                 ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
                 ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")]:
        ok = norm[p] * norm[q] > 0
        out["cos"][q] = ((x[p] * x[q]).sum(1)[ok] / (norm[p] * norm[q])[ok]).mean()
        out["upd"][q] = np.linalg.norm(x[q] - x[p], axis=1).mean()
    for h in norm:
        ax = np.abs(x[h])
        out["big"][h] = (ax > 100).sum(0)
        out["massive"][h] = ((ax > 100) & (ax > 1000 * np.median(ax, axis=1, keepdims=True))).sum(0)
    out["fire"] = {h: (v > 0).mean() for h, v in x.items() if "mlp" in h}
    out["dead"] = {h: ((v > 0).sum(0) == 0).mean() for h, v in x.items() if "mlp" in h}
    return out


def _check(res: dict, ref: dict) -> None:
    for row in res["residual"]:
        assert row["mean_norm"] == pytest.approx(ref["mean_norm"][row["hook"]], rel=1e-9)
    assert [r["to"] for r in res["consecutive"]] == list(ref["cos"])
    for row in res["consecutive"]:
        assert row["mean_cosine"] == pytest.approx(ref["cos"][row["to"]], rel=1e-9, abs=1e-12)
        assert row["mean_update_norm"] == pytest.approx(ref["upd"][row["to"]], rel=1e-9, abs=1e-12)
    for row in res["massive"]:
        got_m, got_b = np.zeros(D, int), np.zeros(D, int)
        for e in row["dims"]:
            got_m[e["dim"]], got_b[e["dim"]] = e["n_massive"], e["n_above_abs"]
        np.testing.assert_array_equal(got_m, ref["massive"][row["hook"]])
        np.testing.assert_array_equal(got_b, ref["big"][row["hook"]])
    for row in res["mlp"]:
        assert row["fraction_positive"] == pytest.approx(ref["fire"][row["hook"]], rel=1e-12)
        assert row["dead_fraction"] == pytest.approx(ref["dead"][row["hook"]], rel=1e-12)


def test_planted_statistics_exclude_special(planted):
    store, a, tokens = planted
    res = layer_statistics(store, massive_top=5, block_rows=250)  # many blocks: exercises the merge
    keep = ~tokens["special"]
    assert res["n_tokens"] == keep.sum() and res["n_excluded"] == (~keep).sum()
    _check(res, _ref(a, keep))
    norms = {r["hook"]: r["mean_norm"] for r in res["residual"]}
    for h, r in NORMS.items():
        if h != "blocks.2.hook_resid_post":  # the planted entries change that layer's norms
            assert norms[h] == pytest.approx(r, rel=1e-6)
    cos = {r["to"]: r for r in res["consecutive"]}
    assert cos["blocks.1.hook_resid_post"]["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert cos["blocks.1.hook_resid_post"]["mean_update_norm"] == 0.0
    mlp = {r["hook"]: r for r in res["mlp"]}
    assert mlp["blocks.0.mlp.hook_post"]["dead_fraction"] == pytest.approx(len(DEAD) / D_MLP)


def test_massive_activation_located(planted):
    store, _, tokens = planted
    res = layer_statistics(store, massive_top=3, block_rows=333)
    last = {r["hook"]: r for r in res["massive"]}["blocks.2.hook_resid_post"]
    top = last["top"][0]
    assert (top["dim"], top["row"], top["value"]) == (MASSIVE_DIM, MASSIVE_ROW, MASSIVE_VALUE)
    assert top["token_id"] == tokens["token_id"][MASSIVE_ROW] and top["position"] == tokens["position"][MASSIVE_ROW]
    assert top["ratio_to_median"] > 1000
    assert last["n_massive"] == 1 and last["dims"][0] == {"dim": MASSIVE_DIM, "n_massive": 1, "n_above_abs": 2}
    assert last["n_above_abs"] == 1 + D and last["max_abs"] == 5000.0
    assert [t["row"] for t in last["top"][1:]] == [BIG_ROW, BIG_ROW]  # ties broken by dim
    assert [t["dim"] for t in last["top"][1:]] == [0, 1]


def test_special_tokens_counted_when_asked(planted):
    store, a, tokens = planted
    res = layer_statistics(store, exclude_special=False, block_rows=500)
    _check(res, _ref(a, np.ones(N, bool)))
    top = {r["hook"]: r for r in res["massive"]}["blocks.2.hook_resid_post"]["top"][0]
    assert top["value"] == 3e4 and tokens["special"][top["row"]]


def test_block_size_does_not_change_results(planted):
    store, _, _ = planted
    one, many = layer_statistics(store), layer_statistics(store, block_rows=97, workers=2)
    assert [r["top"] for r in one["massive"]] == [r["top"] for r in many["massive"]]
    assert one["mlp"] == many["mlp"]
    for x, y in zip(one["residual"] + one["consecutive"], many["residual"] + many["consecutive"]):
        assert x.keys() == y.keys()
        for k, v in x.items():
            assert v == (pytest.approx(y[k], rel=1e-12) if isinstance(v, float) else y[k])


def test_to_json_round_trips(planted, tmp_path):
    store, _, _ = planted
    res = layer_statistics(store, hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    assert json.loads(to_json(res, tmp_path / "l.json")) == res == json.loads((tmp_path / "l.json").read_text())
    assert [r["hook"] for r in res["residual"]] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert res["mlp"] == []


def test_stream_chain_with_gaps_and_duplicate_points():
    plan = plan_layers(["blocks.5.hook_resid_post", "blocks.5.hook_resid_pre", "blocks.3.hook_resid_post",
                        "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.2.mlp.hook_post",
                        "blocks.0.hook_attn_out"])
    assert plan.resid == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.3.hook_resid_post",
                          "blocks.5.hook_resid_pre", "blocks.5.hook_resid_post"]
    # resid_pre[1] is resid_post[0] (same stream point); resid_pre[5] is kept since layer 4 is not stored.
    assert plan.chain == ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post", "blocks.5.hook_resid_pre",
                          "blocks.5.hook_resid_post"]
    assert plan.mlp == ["blocks.2.mlp.hook_post"]
    from actstore.pipeline.analysis.layer_stats import blocks_spanned

    assert [blocks_spanned(a, b) for a, b in plan.pairs] == [[1, 2, 3], [4], [5]]
