"""Cross-layer transcoders from stores: planted-circuit recovery through the store, the saved artifact and its
provenance, the replacement model's CE/KL (exact CLT, and the multi-hook splice against hand-written hooks),
refusals before any work, the Dask job and the CLI verb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

import actstore
from actstore.cli import main
from actstore.pipeline.analysis.clt import replacement_scores, run_clt_job
from actstore.schemas.errors import ConfigError
from actstore.schemas.jobs import CLTJob
from actstore.schemas.sae import CLTConfig
from actstore.workers.sae.clt import CrossLayerTranscoder
from actstore.workers.sae.clt_io import load_clt
from tests.support import extract_local
from tests.workers.sae.test_clt import planted_circuit, recovery

N_LAYERS, D = 3, 16


def _hooks(x: np.ndarray, y: np.ndarray, layers: range = range(N_LAYERS)) -> dict[str, np.ndarray]:
    out = {}
    for layer in layers:
        out[f"blocks.{layer}.hook_mlp_in"] = x[:, layer].astype(np.float32)
        out[f"blocks.{layer}.hook_mlp_out"] = y[:, layer].astype(np.float32)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    x, y, decs = planted_circuit(12000, n_layers=N_LAYERS, d=D)
    store = actstore.from_arrays(_hooks(x, y), str(tmp_path_factory.mktemp("clt") / "s"), shard_tokens=4096)
    return store, decs


FAST = dict(expansion=2, k=2, training_tokens=48000, batch_size=256, norm_estimation_tokens=2048, buffer_rows=4096)


def test_train_clt_recovers_the_planted_circuit_and_saves(planted, tmp_path):
    store, decs = planted
    out = tmp_path / "clt"
    res = actstore.train_clt(store, out_dir=str(out), **FAST)
    cos = recovery(res.sae, decs)
    assert np.mean(cos > 0.95) >= 0.9, np.round(cos, 3)
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["fvu_per_layer"]) == N_LAYERS and m["fvu"] < 0.1 and m["layers"] == [0, 1, 2]
    assert m["l0"] == pytest.approx(3 * 2, abs=0.5) and m["ce_kl"].startswith("skipped")
    prov = m["provenance"]
    assert prov["store_url"] == store.url and prov["store_manifest_sha256"] == store.manifest_sha256
    assert prov["job"]["sae"]["k"] == 2 and prov["actstore_version"] == actstore.__version__
    clt, meta = load_clt(str(out))
    assert meta["hooks_in"] == [f"blocks.{i}.hook_mlp_in" for i in range(3)]
    assert meta["hooks_out"] == [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    assert meta["metadata"]["provenance"]["store_manifest_sha256"] == store.manifest_sha256
    x = torch.randn(7, N_LAYERS * D)
    torch.testing.assert_close(clt(x)[0], res.sae(x)[0])
    assert not list(out.glob("*.tmp-*")) and not list(out.rglob("*.pkl"))
    from actstore.pipeline.analysis.report import write_report

    html = Path(write_report(store, tmp_path / "report.html", results_dir=tmp_path, spectra_hooks=[])).read_text()
    row = html.split('id="clt-0-results"')[1].split("</table>")[0]
    assert 'id="clts"' in html and 'id="clt-0"' in html and f"{m['fvu']:.4g}" in row


def test_refusals_before_any_work(planted, tmp_path):
    x, y, _ = planted_circuit(600, n_layers=N_LAYERS, d=D)
    hooks = _hooks(x, y)
    del hooks["blocks.1.hook_mlp_out"]
    gap = actstore.from_arrays(hooks, str(tmp_path / "gap"))
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"lacks blocks\.1\.hook_mlp_out") as e:
        actstore.train_clt(gap, out_dir=str(out), **FAST)
    assert "\n" not in str(e.value) and not out.exists()
    wide = _hooks(x, y)
    wide["blocks.2.hook_mlp_out"] = np.zeros((600, 8), np.float32)
    with pytest.raises(ConfigError, match="one width"):
        actstore.train_clt(actstore.from_arrays(wide, str(tmp_path / "wide")), **FAST)
    only_resid = actstore.from_arrays({"blocks.0.hook_resid_post": x[:, 0].astype(np.float32)}, str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="no blocks"):
        actstore.train_clt(only_resid, **FAST)
    with pytest.raises(ConfigError, match="consecutive"):
        actstore.train_clt(planted[0], layers=[0, 2], **FAST)
    with pytest.raises(ConfigError, match=r"lacks blocks\.3\.hook_mlp_in"):
        actstore.train_clt(planted[0], layers=[2, 3], **FAST)
    with pytest.raises(ConfigError, match="unknown training option"):
        actstore.train_clt(planted[0], sweep={"k": [1, 2]}, **FAST)


def test_layer_subset_trains_on_those_layers(planted):
    res = actstore.train_clt(planted[0], layers=[1, 2], **{**FAST, "training_tokens": 2048})
    assert res.sae.cfg.n_layers == 2 and res.hooks[0] == "blocks.1.hook_mlp_in" and res.metrics["layers"] == [1, 2]


# ------------------------------------------------------------------------------------- replacement model
@pytest.fixture(scope="module")
def relu_lm():
    """A tiny random GPT-2 whose MLPs use ReLU: a CLT can then reproduce every MLP exactly."""
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=32, vocab_size=50, activation_function="relu",
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lm = T.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return lm


def _seqs(n: int = 3, length: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 50, size=length) for _ in range(n)]


HOOKS_IN = [f"blocks.{i}.hook_mlp_in" for i in range(3)]
HOOKS_OUT = [f"blocks.{i}.hook_mlp_out" for i in range(3)]


def _exact_clt(lm) -> CrossLayerTranscoder:
    """W_enc = c_fc, W_dec[l][:, 0] = c_proj, nothing written to later layers: each layer's MLP exactly."""
    clt = CrossLayerTranscoder(CLTConfig(d_model=16, n_layers=3, expansion=4, architecture="relu")).eval()
    with torch.no_grad():
        for i, block in enumerate(lm.transformer.h):
            clt.W_enc[i] = block.mlp.c_fc.weight
            clt.b_enc[i] = block.mlp.c_fc.bias
            clt.W_dec[i].zero_()
            clt.W_dec[i][:, 0] = block.mlp.c_proj.weight
            clt.b_dec[i] = block.mlp.c_proj.bias
    return clt


def test_exact_clt_scores_zero_loss_delta(relu_lm):
    m = replacement_scores(relu_lm, _seqs(), _exact_clt(relu_lm), HOOKS_IN, HOOKS_OUT)
    assert abs(m["delta_lm_loss"]) < 1e-5 and m["kl_div_with_sae"] < 1e-6
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and m["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["ce_loss_with_ablation"] != pytest.approx(m["ce_loss_clean"])


def _manual_losses(lm, seqs, clt) -> tuple[float, float]:
    """Mean CE and KL(clean || replaced) with every MLP replaced by the CLT, via hooks written here."""
    feats: list[torch.Tensor] = []

    def hook(j):
        def run(mod, args, out):
            if j == 0:
                feats.clear()
            x = args[0]
            feats.append(torch.relu(x @ clt.W_enc[j] + clt.b_enc[j]))
            y = clt.b_dec[j] + sum(feats[s] @ clt.W_dec[s][:, j - s] for s in range(j + 1))
            return y
        return run

    ce = kl = 0.0
    with torch.no_grad():
        for s in seqs:
            ids = torch.as_tensor(s)[None]
            clean = F.log_softmax(lm(ids).logits[:, :-1].float(), -1)
            hs = [b.mlp.register_forward_hook(hook(j)) for j, b in enumerate(lm.transformer.h)]
            try:
                rep = F.log_softmax(lm(ids).logits[:, :-1].float(), -1)
            finally:
                for h in hs:
                    h.remove()
            ce += float(-rep.gather(-1, ids[:, 1:, None]).mean())
            kl += float((clean.exp() * (clean - rep)).sum(-1).mean())
    return ce / len(seqs), kl / len(seqs)


def test_multi_hook_splice_equals_hand_written_hooks(relu_lm):
    clt = CrossLayerTranscoder(CLTConfig(d_model=16, n_layers=3, expansion=2, architecture="relu"), seed=3).eval()
    with torch.no_grad():
        for p in clt.parameters():
            p.mul_(0.5)
    seqs = _seqs()
    m = replacement_scores(relu_lm, seqs, clt, HOOKS_IN, HOOKS_OUT)
    ce, kl = _manual_losses(relu_lm, seqs, clt)
    assert m["ce_loss_with_sae"] == pytest.approx(ce, rel=1e-5) and m["kl_div_with_sae"] == pytest.approx(kl, rel=1e-4)
    assert kl > 1e-3  # the cross-layer decoders really changed the output


def test_replacement_metrics_on_an_extracted_store(tiny, tmp_path):
    hooks = [f"blocks.{i}.hook_mlp_{k}" for i in range(3) for k in ("in", "out")]
    texts = ["the quick brown fox jumps over the lazy dog " * 6, "lorem ipsum dolor sit amet " * 8] * 4
    store = extract_local(tiny("gpt2"), tmp_path / "s", hooks, texts)
    res = actstore.train_clt(store, expansion=2, k=4, training_tokens=2048, batch_size=128, n_eval_seqs=2,
                             eval_fraction=0.25, norm_estimation_tokens=256)
    assert res.metrics["layers"] == [0, 1, 2] and np.isfinite(res.metrics["ce_loss_score"])
    other = tmp_path / "other"  # a model of another shape: its spliced scores would measure another network
    T.GPT2Config(n_layer=5, n_embd=32, n_head=4, vocab_size=400).save_pretrained(other)
    with pytest.raises(ConfigError, match="5 layers of width 32.*3 layers"):
        actstore.train_clt(store, expansion=2, k=4, training_tokens=2048, batch_size=128, model=str(other),
                           eval_fraction=0.25, out_dir=str(tmp_path / "clt"))
    assert not (tmp_path / "clt").exists()
    with pytest.raises(ConfigError, match=r"model: model path .*nowhere.* does not exist.*n_eval_seqs: 0"):
        actstore.train_clt(store, expansion=2, k=4, training_tokens=2048, batch_size=128,
                           model=str(tmp_path / "nowhere"), eval_fraction=0.25, out_dir=str(tmp_path / "clt"))
    assert not (tmp_path / "clt").exists()
    assert np.isfinite(res.metrics["kl_score"])


# ---------------------------------------------------------------------------------------- Dask job, CLI
def test_cli_train_clt_with_yaml_and_overrides(planted, tmp_path, capsys):
    store, _ = planted
    cfg = tmp_path / "clt.yaml"
    cfg.write_text(f"store: {store.url}\nout: {tmp_path / 'o'}\nsae: {{expansion: 2, k: 3}}\n"
                   "train: {training_tokens: 4096, batch_size: 256, norm_estimation_tokens: 1024}\n")
    assert main(["train", "clt", str(cfg), "--set", "sae.k=2", "--buffer-rows", "2048", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["layers"] == [0, 1, 2] and len(row["fvu_per_layer"]) == 3
    clt, meta = load_clt(str(tmp_path / "o"))
    assert meta["clt_config"]["k"] == 2 and meta["metadata"]["provenance"]["job"]["buffer_rows"] == 2048
    # a second run finds the finished output and does not train again
    assert main(["train", "clt", str(cfg), "--set", "sae.k=2", "--buffer-rows", "2048", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed"] == "already finished"


def test_cli_refuses_a_store_without_every_layer(tmp_path, capsys):
    x, y, _ = planted_circuit(300, n_layers=2, d=D)
    hooks = _hooks(x, y, range(2))
    del hooks["blocks.0.hook_mlp_in"]
    store = actstore.from_arrays(hooks, str(tmp_path / "s"))
    assert main(["train", "clt", "--store", store.url, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("actstore: error: ") and "blocks.0.hook_mlp_in" in err and "\n" not in err
    assert 'pass --layers "[1]"' in err  # the layers that hold both hooks
    assert not (tmp_path / "o").exists()


def test_run_clt_job_needs_an_output(planted):
    with pytest.raises(ConfigError, match="out"):
        run_clt_job(CLTJob(store=planted[0].url))


# ------------------------------------------------------------------------------ circuit-tracer export
def _saved_clt(tmp_path, arch: str, layers: tuple[int, ...] = (0, 1, 2), n_layers: int = 3) -> tuple[str, Any]:
    from actstore.schemas.sae import TrainConfig
    from actstore.workers.sae.training import TrainResult

    clt = CrossLayerTranscoder(CLTConfig(d_model=8, n_layers=len(layers), expansion=2, k=3, architecture=arch),
                               seed=5).eval()
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if arch == "batchtopk":
            clt.running_threshold.copy_(torch.tensor([0.1, 0.3, 0.2][:len(layers)]))
    hooks = [f"blocks.{i}.hook_mlp_in" for i in layers] + [f"blocks.{i}.hook_mlp_out" for i in layers]
    res = TrainResult(clt, {}, clt.cfg, TrainConfig(), hooks=hooks,
                      provenance={"store_url": "file:///s", "store_manifest_sha256": "ab" * 32})
    folder = str(tmp_path / f"clt-{arch}")
    res.save(folder, extra_metadata={"model_name": "tiny", "model_type": "gpt2", "n_layers": n_layers})
    return folder, clt


def _documented_forward(folder, x: torch.Tensor, n_layers: int) -> torch.Tensor:
    """circuit-tracer's CLT maths on the exported files, as its loader documents them: f_l = act(x_l W_enc_l^T +
    b_enc_l) (JumpReLU when threshold_l exists, else ReLU), y_t = sum_{l<=t} f_l W_dec_l[:, t - l] + b_dec_t."""
    from safetensors.torch import load_file

    enc = [load_file(f"{folder}/W_enc_{i}.safetensors") for i in range(n_layers)]
    dec = [load_file(f"{folder}/W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n_layers)]
    feats = []
    for i, e in enumerate(enc):
        z = x[:, i] @ e[f"W_enc_{i}"].T + e[f"b_enc_{i}"]
        feats.append(z * (z > e[f"threshold_{i}"]) if f"threshold_{i}" in e else torch.relu(z))
    return torch.stack([enc[t][f"b_dec_{t}"] + sum(feats[s] @ dec[s][:, t - s] for s in range(t + 1))
                        for t in range(n_layers)], 1)


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk", "relu"])
def test_circuit_tracer_export_of_a_clt_is_exact(tmp_path, arch):
    import yaml

    folder, clt = _saved_clt(tmp_path, arch)
    out = tmp_path / "ct"
    info = actstore.export_transcoders([folder], str(out))
    assert info["model_kind"] == "cross_layer_transcoder" and info["notes"] == []
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg == {"model_kind": "cross_layer_transcoder", "model_name": "tiny", "feature_input_hook": "mlp.hook_in",
                   "feature_output_hook": "mlp.hook_out", "scan": "ct"}
    from safetensors.torch import load_file

    for i in range(3):
        assert load_file(str(out / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"].shape == (16, 3 - i, 8)
        assert load_file(str(out / f"W_enc_{i}.safetensors"))[f"W_enc_{i}"].shape == (16, 8)
    x = torch.randn(9, 3, 8)
    y, f = clt(x)
    assert (f != 0).any() and (f == 0).any()
    torch.testing.assert_close(_documented_forward(out, x, 3), y, atol=1e-5, rtol=1e-5)
    record = json.loads((out / "actstore_export.json").read_text())
    assert record["store_manifest_sha256"] == "ab" * 32 and record["source"] == folder


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_circuit_tracer_own_loader_reads_the_clt_export(tmp_path, arch):
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    folder, clt = _saved_clt(tmp_path, arch)
    out = tmp_path / "ct"
    actstore.export_transcoders([folder], str(out))
    theirs = ct.load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    x = torch.randn(9, 3, 8)
    y, f = clt(x)
    feats = theirs.encode(x.transpose(0, 1))  # (layers, positions, features)
    torch.testing.assert_close(feats.transpose(0, 1), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(feats).transpose(0, 1), y, atol=1e-5, rtol=1e-5)


def test_clt_export_refusals_and_topk_note(tmp_path):
    partial, _ = _saved_clt(tmp_path, "relu", layers=(1, 2), n_layers=3)
    with pytest.raises(ConfigError, match=r"every layer 0\.\.2"):
        actstore.export_transcoders([partial], str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    whole, _ = _saved_clt(tmp_path, "topk")
    with pytest.raises(ConfigError, match="alone"):
        actstore.export_transcoders([whole, partial], str(tmp_path / "b"))
    info = actstore.export_transcoders([whole], str(tmp_path / "c"))
    assert "ReLU" in info["notes"][0]


def test_splice_with_a_hook_the_model_lacks_leaves_no_hook_behind(relu_lm):
    """A model with fewer layers than the hooks name: one HookNameError, and no hook stays on the model."""
    from actstore.schemas.errors import HookNameError

    clt = CrossLayerTranscoder(CLTConfig(d_model=16, n_layers=3, expansion=2, architecture="relu"), seed=3).eval()
    modules = list(relu_lm.modules())
    count = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)  # noqa: E731
    before = count()
    with pytest.raises(HookNameError, match="blocks.9.hook_mlp_in"):
        replacement_scores(relu_lm, _seqs(), clt, [HOOKS_IN[0], "blocks.9.hook_mlp_in", HOOKS_IN[2]], HOOKS_OUT)
    assert count() == before
    m = replacement_scores(relu_lm, _seqs(), clt, HOOKS_IN, HOOKS_OUT)  # the model still scores as before
    assert np.isfinite(m["kl_div_with_sae"])


def test_cli_train_clt_offers_only_its_architectures(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "clt", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "{topk,batchtopk,jumprelu,relu}" in text and "matryoshka_batchtopk" not in text
    assert "--matryoshka-widths" not in text and "--skip" not in text
    with pytest.raises(SystemExit) as e:
        main(["train", "clt", "--architecture", "matryoshka_batchtopk"])
    assert e.value.code == 2 and "invalid choice: 'matryoshka_batchtopk'" in capsys.readouterr().err
