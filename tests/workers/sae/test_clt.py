"""Cross-layer transcoders: forward and loss against oracles written here, scale folding, per-layer metrics,
planted-circuit recovery, save/load, config refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.schemas.errors import ConfigError
from actstore.schemas.sae import CLTConfig, TrainConfig
from actstore.workers.sae.clt import CrossLayerTranscoder
from actstore.workers.sae.metrics import evaluate_layers
from actstore.workers.sae.training import train

L, D = 3, 8


def _random_clt(arch: str = "topk", k: int = 3, seed: int = 0) -> CrossLayerTranscoder:
    clt = CrossLayerTranscoder(CLTConfig(d_model=D, n_layers=L, expansion=2, k=k, architecture=arch), seed=seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return clt


def _oracle(clt: CrossLayerTranscoder, x: np.ndarray, arch: str) -> tuple[np.ndarray, np.ndarray]:
    """(outputs (n, L, D), features (n, L, m)) by hand: loops over layers, numpy float64."""
    n, m = x.shape[0], clt.cfg.d_sae
    w_enc, b_enc = clt.W_enc.detach().double().numpy(), clt.b_enc.detach().double().numpy()
    f = np.zeros((n, L, m))
    for layer in range(L):
        z = x[:, layer] @ w_enc[layer] + b_enc[layer]
        if arch == "topk":
            for t in range(n):
                top = np.argsort(-z[t])[:clt.cfg.k]
                f[t, layer, top] = np.maximum(z[t, top], 0)
        elif arch == "jumprelu":
            theta = np.exp(clt.log_threshold.detach().double().numpy()[layer])
            f[:, layer] = z * (z > theta)
        else:
            f[:, layer] = np.maximum(z, 0)
    y = np.tile(clt.b_dec.detach().double().numpy(), (n, 1, 1))
    for src in range(L):
        w = clt.W_dec[src].detach().double().numpy()  # (m, L - src, D)
        for tgt in range(src, L):
            y[:, tgt] += f[:, src] @ w[:, tgt - src]
    return y, f


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_forward_matches_hand_oracle(arch):
    clt = _random_clt(arch).eval()
    x = np.random.default_rng(0).normal(size=(16, L, D))
    y_ref, f_ref = _oracle(clt, x, arch)
    y, f = clt(torch.tensor(x, dtype=torch.float32).reshape(16, L * D))
    np.testing.assert_allclose(f.detach().numpy(), f_ref, atol=1e-4)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, atol=1e-4)
    # layer by layer, as the replacement model runs it
    feats = [clt.encode_layer(j, torch.tensor(x[:, j], dtype=torch.float32)) for j in range(L)]
    for j in range(L):
        np.testing.assert_allclose(clt.decode_layer(j, feats).detach().numpy(), y_ref[:, j], atol=1e-4)


def test_features_never_write_to_earlier_layers():
    clt = _random_clt("relu").eval()
    f = torch.zeros(1, L, clt.cfg.d_sae)
    f[0, 2, 5] = 1.0  # one feature of the last layer
    y = clt.decode(f) - clt.b_dec
    assert torch.all(y[0, :2] == 0) and y[0, 2].abs().sum() > 0


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_training_loss_matches_hand_oracle(arch):
    clt = _random_clt(arch).train()
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(32, L, D)), rng.normal(size=(32, L, D))
    y_ref, f_ref = _oracle(clt, x, arch)
    rec = ((y_ref - t) ** 2).sum((1, 2)).mean() / (L * D)
    if arch == "jumprelu":
        z = np.einsum("nld,ldm->nlm", x, clt.W_enc.detach().double().numpy()) + clt.b_enc.detach().double().numpy()
        sparsity = (z > np.exp(clt.log_threshold.detach().double().numpy())).sum((1, 2)).mean() * 1e-3
    elif arch == "relu":
        norms = np.stack([np.linalg.norm(w.detach().double().numpy().reshape(w.shape[0], -1), axis=1)
                          for w in clt.W_dec])
        sparsity = (f_ref * norms).sum((1, 2)).mean() / np.sqrt(D) * 0.1
    else:
        sparsity = 0.0
    loss, stats = clt.training_loss(torch.tensor(x, dtype=torch.float32).reshape(32, -1),
                                    torch.tensor(t, dtype=torch.float32).reshape(32, -1))
    assert float(loss.detach()) == pytest.approx(rec + sparsity, rel=1e-4)
    assert float(stats["rec"]) == pytest.approx(rec, rel=1e-4)
    assert float(stats["l0"]) == pytest.approx((f_ref != 0).sum((1, 2)).mean())


def test_auxk_loss_matches_hand_oracle():
    """Dead features of each layer (top-k_aux by pre-activation) decode, without biases, to the residual."""
    clt = _random_clt("topk").train()
    m, k_aux = clt.cfg.d_sae, clt.cfg.aux_k_resolved
    rng = np.random.default_rng(3)
    x, t = rng.normal(size=(20, L, D)), rng.normal(size=(20, L, D))
    dead = rng.random((L, m)) < 0.5
    y_ref, _ = _oracle(clt, x, "topk")
    z = np.einsum("nld,ldm->nlm", x, clt.W_enc.detach().double().numpy()) + clt.b_enc.detach().double().numpy()
    f_aux = np.zeros_like(z)
    for layer in range(L):
        cand = np.where(dead[layer])[0]
        for n in range(20):
            top = cand[np.argsort(-z[n, layer, cand])[:k_aux]]
            f_aux[n, layer, top] = np.maximum(z[n, layer, top], 0)
    e_hat = np.zeros_like(t)
    for src in range(L):
        w = clt.W_dec[src].detach().double().numpy()
        for tgt in range(src, L):
            e_hat[:, tgt] += f_aux[:, src] @ w[:, tgt - src]
    e = t - y_ref
    aux = ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    _, stats = clt.training_loss(torch.tensor(x, dtype=torch.float32).reshape(20, -1),
                                 torch.tensor(t, dtype=torch.float32).reshape(20, -1),
                                 dead=torch.tensor(dead.reshape(-1)))
    assert float(stats["aux"]) == pytest.approx(aux, rel=1e-4)


def test_fold_scale_makes_the_clt_read_raw_activations():
    clt = _random_clt("jumprelu").eval()
    s_in, s_out = [2.0, 0.5, 3.0], [0.25, 4.0, 1.5]
    folded = _random_clt("jumprelu").eval()
    folded.load_state_dict(clt.state_dict())
    folded.fold_scale_(s_in, s_out)
    x = torch.randn(10, L, D)
    y_scaled, _ = clt(x * torch.tensor(s_in)[None, :, None])
    y_raw, _ = folded(x)
    torch.testing.assert_close(y_raw, y_scaled / torch.tensor(s_out)[None, :, None], atol=1e-5, rtol=1e-5)


def test_evaluate_layers_matches_numpy():
    clt = _random_clt("topk").eval()
    rng = np.random.default_rng(2)
    x, t = rng.normal(size=(300, L, D)), rng.normal(size=(300, L, D)) * np.array([1.0, 2.0, 5.0])[None, :, None]
    batches = [(torch.tensor(x[i:i + 64], dtype=torch.float32).reshape(-1, L * D),
                torch.tensor(t[i:i + 64], dtype=torch.float32).reshape(-1, L * D)) for i in range(0, 300, 64)]
    m = evaluate_layers(clt, batches)
    y, f = _oracle(clt, x, "topk")
    resid = ((t - y) ** 2).sum((0, 2))
    var = ((t - t.mean(0)) ** 2).sum((0, 2))
    np.testing.assert_allclose(m["fvu_per_layer"], resid / var, rtol=1e-4)
    assert m["fvu"] == pytest.approx(resid.sum() / var.sum(), rel=1e-4)
    np.testing.assert_allclose(m["l0_per_layer"], (f != 0).sum(2).mean(0), rtol=1e-6)
    assert m["l0"] == pytest.approx((f != 0).sum((1, 2)).mean())
    assert m["dead_fraction"] == pytest.approx(((f != 0).sum(0) == 0).mean())
    assert len(m["layers"]) == L and m["layers"][1]["fvu"] == pytest.approx(resid[1] / var[1], rel=1e-4)


# ------------------------------------------------------------------------------------- planted circuit
def planted_circuit(n: int, n_layers: int = 3, d: int = 16, n_feat: int = 8, active: int = 2, seed: int = 0,
                    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(x (n, L, d), y (n, L, d), decoders): each layer's input is a sparse sum of `active` of its n_feat unit
    directions; feature i of layer l writes decoders[l][i, j] to the output of layer l + j (unit total norm)."""
    rng = np.random.default_rng(seed)
    enc = rng.normal(size=(n_layers, n_feat, d))
    enc /= np.linalg.norm(enc, axis=2, keepdims=True)
    decs = []
    for layer in range(n_layers):
        w = rng.normal(size=(n_feat, n_layers - layer, d))
        decs.append(w / np.linalg.norm(w.reshape(n_feat, -1), axis=1)[:, None, None])
    x, y = np.zeros((n, n_layers, d)), np.zeros((n, n_layers, d))
    for layer in range(n_layers):
        a = np.zeros((n, n_feat))
        idx = np.argsort(rng.random((n, n_feat)), axis=1)[:, :active]
        np.put_along_axis(a, idx, rng.uniform(1.0, 2.0, size=(n, active)), axis=1)
        x[:, layer] = a @ enc[layer] + 0.01 * rng.normal(size=(n, d))
        for j in range(n_layers - layer):
            y[:, layer + j] += a @ decs[layer][:, j]
    return x, y, decs


def recovery(clt: CrossLayerTranscoder, decs: list[np.ndarray]) -> np.ndarray:
    """Per planted feature, the best cosine between its whole decoder and a learned feature's of its layer."""
    best = []
    for layer, planted in enumerate(decs):
        learned = clt.W_dec[layer].detach().double().numpy().reshape(clt.cfg.d_sae, -1)
        learned = learned / np.linalg.norm(learned, axis=1, keepdims=True).clip(1e-12)
        p = planted.reshape(planted.shape[0], -1)
        best.append((p @ learned.T).max(1))
    return np.concatenate(best)


def test_planted_circuit_is_recovered():
    """Training on the planted circuit recovers its cross-layer decoders (cos > 0.95 for nearly all)."""
    x, y, decs = planted_circuit(12000)
    n = x.shape[0]
    batches = [(torch.tensor(x[i:i + 512].reshape(-1, 48), dtype=torch.float32),
                torch.tensor(y[i:i + 512].reshape(-1, 48), dtype=torch.float32)) for i in range(0, n, 512)]
    cfg = CLTConfig(d_model=16, n_layers=3, expansion=2, k=2, architecture="topk")
    res = train(batches * 4, cfg, TrainConfig(batch_size=256, training_tokens=4 * n, seed=0,
                                              norm_estimation_tokens=2048))
    cos = recovery(res.sae, decs)
    assert np.mean(cos > 0.95) >= 0.9, np.round(cos, 3)
    held = [(torch.tensor(x[:2000].reshape(-1, 48), dtype=torch.float32),
             torch.tensor(y[:2000].reshape(-1, 48), dtype=torch.float32))]
    m = evaluate_layers(res.sae, held)
    assert m["fvu"] < 0.1 and all(v < 0.15 for v in m["fvu_per_layer"])
    # a CLT that never saw the data recovers nothing: the threshold above is not met by chance
    assert np.mean(recovery(CrossLayerTranscoder(cfg, seed=1), decs) > 0.95) < 0.1


def test_clt_config_refusals():
    with pytest.raises(ConfigError, match="architecture"):
        CLTConfig(d_model=8, n_layers=2, architecture="matryoshka_batchtopk")
    with pytest.raises(ConfigError, match="skip"):
        CLTConfig(d_model=8, n_layers=2, skip=True)
    with pytest.raises(ConfigError, match="k"):
        CLTConfig(d_model=8, n_layers=2, expansion=1, k=9)
    with pytest.raises(ConfigError, match="n_layers"):
        CLTConfig(d_model=8, n_layers=0)


def test_interrupted_training_resumes_bit_identically(tmp_path):
    """A CLT run stopped mid-way and restarted from its checkpoint ends exactly where an uninterrupted run does
    (per-layer scale factors, Adam state and dead counters all survive the checkpoint)."""
    import threading

    from actstore.workers.sae.training import TrainingInterrupted

    x, y, _ = planted_circuit(2048, n_layers=2, d=8, n_feat=4)
    batches = [(torch.tensor(x[i:i + 256].reshape(-1, 16), dtype=torch.float32),
                torch.tensor(y[i:i + 256].reshape(-1, 16), dtype=torch.float32)) for i in range(0, 2048, 256)]
    cfg = CLTConfig(d_model=8, n_layers=2, expansion=2, k=2, architecture="batchtopk")
    tcfg = TrainConfig(batch_size=128, training_tokens=4096, norm_estimation_tokens=512, checkpoint_every=3,
                       select_dtype="float32", dead_window_tokens=256)
    whole = train(batches * 2, cfg, tcfg)
    stop = threading.Event()

    def progress(info):
        if info["step"] >= 10:
            stop.set()

    with pytest.raises(TrainingInterrupted):
        train(batches * 2, cfg, TrainConfig(**{**tcfg.__dict__, "log_every": 1}), tmp_path / "ck", progress, stop)
    resumed = train(batches * 2, cfg, TrainConfig(**{**tcfg.__dict__, "log_every": 1}), tmp_path / "ck")
    assert isinstance(resumed.metrics["scale_in"], list) and len(resumed.metrics["scale_in"]) == 2
    for key, value in whole.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[key]), key
