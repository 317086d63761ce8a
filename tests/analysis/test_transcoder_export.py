"""circuit-tracer export of per-layer transcoders: exact encode/decode after loading, and one-line refusals.

The loaded export is checked with circuit-tracer's own loader (`load_transcoder_set`, as its local-folder loader
calls it) where circuit-tracer is importable, and always against a reimplementation of its documented
`SingleLayerTranscoder` maths: f = act(x W_enc^T + b_enc), y = f W_dec + b_dec + x W_skip^T, act = JumpReLU when
the file has a threshold, else ReLU, or TopK (k largest pre-activations, no ReLU) when config.yaml says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import actstore
from actstore.cli import main
from actstore.schemas.errors import ConfigError, OutputError
from actstore.schemas.sae import SAEConfig
from actstore.workers.sae.circuit_tracer import layer_tensors
from actstore.workers.sae.model import SparseAutoencoder
from actstore.workers.sae.saelens import load_saelens, save_saelens
from tests.support import extract_local

D = 16


def _reference(t: dict[str, torch.Tensor], x: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    pre = x @ t["W_enc"].T + t["b_enc"]
    if cfg.get("activation") == "topk":
        keep = torch.zeros_like(pre).scatter(-1, pre.topk(cfg["k"], dim=-1).indices, 1.0)
        f = pre * keep
    elif "activation_function.threshold" in t:
        f = pre * (pre > t["activation_function.threshold"])
    else:
        f = torch.relu(pre)
    y = f @ t["W_dec"] + t["b_dec"]
    return f, (y + x @ t["W_skip"].T if "W_skip" in t else y)


def _circuit_tracer(folder: Path) -> list:
    """The export loaded by circuit-tracer's local-folder loader (`caching.load_transcoders_from_cache`, what
    `ReplacementModel.from_pretrained(model, "/abs/path")` calls), or, where that module cannot be imported (it
    needs huggingface_hub < 1.0), the same steps around circuit-tracer's own `load_transcoder_set`."""
    sl = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    try:
        from circuit_tracer.utils.caching import load_transcoders_from_cache
    except ImportError:
        pass
    else:
        if cfg.get("activation") != "topk":  # it ignores `activation`: TopK would load as ReLU
            tset, _ = load_transcoders_from_cache(str(folder.resolve()), device=torch.device("cpu"),
                                                  dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
            return list(tset)
    paths = {int(p.stem.split("_")[1]): str(p) for p in sorted(folder.glob("layer_*.safetensors"))}
    kw = {"activation": cfg.get("activation"), "k": cfg.get("k")} if cfg.get("activation") == "topk" else {}
    try:
        tset = sl.load_transcoder_set(paths, scan=cfg["scan"], feature_input_hook=cfg["feature_input_hook"],
                                      feature_output_hook=cfg["feature_output_hook"], device=torch.device("cpu"),
                                      dtype=torch.float32, lazy_encoder=False, lazy_decoder=False, **kw)
    except TypeError:
        pytest.skip("this circuit-tracer release has no TopK per-layer transcoders")
    return list(tset)


def _random_transcoder(arch: str, skip: bool, seed: int = 0) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=D, architecture=arch, expansion=4, k=5, transcoder=True, skip=skip)
    sae = SparseAutoencoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(sae.cfg.d_sae, generator=g).log())
        if arch == "batchtopk":
            sae.running_threshold.fill_(0.3)
            sae.running_threshold_count.fill_(5)
    return sae.eval()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "topk"])
def test_layer_tensors_match_circuit_tracer_maths(arch, skip):
    from actstore.workers.sae.circuit_tracer import activation_of

    sae = _random_transcoder(arch, skip)
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(1))
    t = layer_tensors(sae)
    assert t["W_enc"].shape == (sae.cfg.d_sae, D) and t["W_dec"].shape == (sae.cfg.d_sae, D)
    f_ref, y_ref = _reference(t, x, activation_of(sae))
    with torch.no_grad():
        f, y = sae.encode(x), sae.decode(sae.encode(x), x)
    if arch == "topk":  # circuit-tracer's TopK keeps negative values among the top k; ours applies a ReLU
        f_ref = torch.relu(f_ref)
        y_ref = f_ref @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(f_ref, f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_ref, y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- end to end on a store
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, texts):
    """A tiny Llama store with MLP in/out at all 3 layers and a JumpReLU skip transcoder per layer."""
    root = tmp_path_factory.mktemp("ct")
    hooks = [f"blocks.{i}.hook_mlp_{io}" for i in range(3) for io in ("in", "out")]
    store = extract_local(tiny("llama"), root / "store", hooks, texts[:6])
    for i in range(3):
        actstore.train_transcoder(store, f"blocks.{i}.hook_mlp_in", f"blocks.{i}.hook_mlp_out", architecture="jumprelu",
                                  expansion=2, training_tokens=4096, batch_size=256, skip=True, n_eval_seqs=0,
                                  out_dir=str(root / "tc" / f"layer{i}"))
    return store, root


@pytest.mark.parametrize("loader", ["circuit-tracer", "reference"])
def test_export_loads_and_matches(trained, tmp_path, capsys, loader):
    store, root = trained
    out = tmp_path / "ct"
    assert main(["export-transcoders", str(root / "tc"), "--format", "circuit-tracer", "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_layers"] == 3 and info["activation"] == "jump_relu"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set" and cfg["scan"] == "ct"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert sorted(p.name for p in out.glob("layer_*")) == [f"layer_{i}.safetensors" for i in range(3)]
    loaded = _circuit_tracer(out) if loader == "circuit-tracer" else None
    for i in range(3):
        x = torch.from_numpy(store.activations(f"blocks.{i}.hook_mlp_in")[:300].compute()).float()
        ours = load_saelens(root / "tc" / f"layer{i}")
        with torch.no_grad():
            f, y = ours.encode(x), ours.decode(ours.encode(x), x)
            if loaded is not None:
                f_ct = loaded[i].encode(x)
                y_ct = loaded[i].decode(f_ct, x)
            else:
                f_ct, y_ct = _reference(load_file(str(out / f"layer_{i}.safetensors")), x, cfg)
        assert (f > 0).any()
        torch.testing.assert_close(f_ct, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_ct, y, rtol=1e-5, atol=1e-5)


def test_export_refuses_existing_output(trained, tmp_path, capsys):
    _, root = trained
    out = tmp_path / "ct"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export-transcoders", str(root / "tc"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--overwrite" in err and err.count("\n") == 0
    assert main(["export-transcoders", str(root / "tc"), "-o", str(out), "--overwrite"]) == 0
    assert (out / "config.yaml").exists() and (out / "keep.txt").exists()


def test_export_refuses_missing_layer(trained, tmp_path, capsys):
    _, root = trained
    assert main(["export-transcoders", str(root / "tc" / "layer0"), str(root / "tc" / "layer2"),
                 "-o", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip()
    assert "layer 1 is missing" in err and "0..2" in err and err.count("\n") == 0
    assert not (tmp_path / "ct").exists()


# --------------------------------------------------------------------------- refusals on fabricated folders
def _folder(path: Path, layer: int, arch: str = "relu", transcoder: bool = True, store: str = "sha-a",
            model: str = "m", kinds: tuple[str, str] = ("hook_mlp_in", "hook_mlp_out"), expansion: int = 4) -> str:
    cfg = SAEConfig(d_in=D, architecture=arch, expansion=expansion, k=4, transcoder=transcoder)
    hooks = [f"blocks.{layer}.{kinds[0]}", f"blocks.{layer}.{kinds[1]}"] if transcoder else [f"blocks.{layer}.{kinds[0]}"]
    meta = {"hooks": hooks, "model_name": model, "model_type": "llama", "n_layers": 2,
            "provenance": {"store_url": f"/nowhere/{store}", "store_manifest_sha256": store}}
    if transcoder:
        meta["hook_name_out"] = hooks[1]
    save_saelens(SparseAutoencoder(cfg), path, hooks[0], extra_metadata=meta)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("sae", "not a transcoder"),
    ("stores", "mix stores"),
    ("models", "mix models"),
    ("duplicate", "two transcoders for layer 1"),
    ("kinds", "replace MLPs"),
    ("widths", "mix widths"),
    ("activations", "mix activations"),
    ("layers", "layer 2 is out of range"),
])
def test_refusals(tmp_path, case, message):
    a = _folder(tmp_path / "a", 0)
    b_kw = {"sae": {"transcoder": False}, "stores": {"store": "sha-b"}, "models": {"model": "other"},
            "kinds": {"kinds": ("hook_resid_pre", "hook_mlp_out")}, "widths": {"expansion": 2},
            "activations": {"arch": "topk"}}.get(case, {})
    b = _folder(tmp_path / "b", 2 if case == "layers" else 1, **b_kw)
    dirs = [a, b] + ([_folder(tmp_path / "c", 1)] if case == "duplicate" else [])
    with pytest.raises(ConfigError, match=message) as err:
        actstore.export_transcoders(dirs, str(tmp_path / "out"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_not_a_transcoder_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a transcoder folder"):
        actstore.export_transcoders([str(tmp_path / "empty")], str(tmp_path / "out"))


def test_output_file_refused(tmp_path):
    dirs = [_folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1)]
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        actstore.export_transcoders(dirs, str(tmp_path / "out"))


def test_topk_export_records_k_and_notes(tmp_path, capsys):
    dirs = [_folder(tmp_path / "a", 0, arch="topk"), _folder(tmp_path / "b", 1, arch="topk")]
    assert main(["export-transcoders", *dirs, "-o", str(tmp_path / "out"), "--scan", "my-scan"]) == 0
    captured = capsys.readouterr()
    cfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert cfg["activation"] == "topk" and cfg["k"] == 4 and cfg["scan"] == "my-scan" and cfg["model_name"] == "m"
    assert "note:" in captured.err and "ReLU" in captured.err
    rec = json.loads((tmp_path / "out" / "actstore_export.json").read_text())
    assert [r["layer"] for r in rec["layers"]] == [0, 1] and rec["model_type"] == "llama"


def test_post_norm_family_uses_hook_mlp_out(tmp_path):
    """Gemma 2/3 and OLMo 2 norm the MLP output before the residual add: circuit-tracer's hook_mlp_out."""
    dirs = []
    for i in range(2):
        path = _folder(tmp_path / f"l{i}", i)
        meta = json.loads((Path(path) / "actstore.json").read_text())
        meta["metadata"]["model_type"] = "gemma2"
        (Path(path) / "actstore.json").write_text(json.dumps(meta))
        dirs.append(path)
    info = actstore.export_transcoders(dirs, str(tmp_path / "out"))
    assert (info["feature_input_hook"], info["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
