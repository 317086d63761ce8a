"""SAE evaluation metrics against an independent numpy reference (forward pass included), uneven batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actstore.workers.sae.metrics import ce_kl_scores, evaluate
from actstore.workers.sae.model import SAEConfig, SparseAutoencoder

BATCH_SIZES = [37, 100, 1, 5, 58]  # uneven, including a single-token batch


def _relu_sae(transcoder: bool) -> SparseAutoencoder:
    """A ReLU SAE whose latents span always-on, occasional and never-firing (b_enc from +1 down to -8)."""
    d_out = 5 if transcoder else None
    sae = SparseAutoencoder(SAEConfig(d_in=6, architecture="relu", expansion=4, transcoder=transcoder,
                                      d_out=d_out), seed=3)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(6, 24, generator=gen))
        sae.W_dec.copy_(0.5 * torch.randn(24, sae.cfg.d_target, generator=gen))
        sae.b_enc.copy_(torch.linspace(1.0, -8.0, 24))
        sae.b_dec.copy_(torch.randn(sae.cfg.d_target, generator=gen))
    return sae


def _data(transcoder: bool) -> list:
    gen = torch.Generator().manual_seed(5)
    batches = []
    for n in BATCH_SIZES:
        x = 2.0 + 1.5 * torch.randn(n, 6, generator=gen)
        if n == 100:
            x[3] = 0.0  # a zero token: cosine counts 0, the l2 ratio divides by 1
        batches.append((x, torch.randn(n, 5, generator=gen)) if transcoder else x)
    return batches


def _numpy_forward(sae: SparseAutoencoder, x_in: np.ndarray, transcoder: bool):
    w_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    w_dec, b_dec = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    centred = x_in if transcoder else x_in - b_dec
    f = np.maximum(centred @ w_enc + b_enc, 0.0)
    return f @ w_dec + b_dec, f


def _numpy_metrics(sae: SparseAutoencoder, batches: list, transcoder: bool) -> dict[str, float]:
    xs, hats, fs, legacy = [], [], [], []
    for batch in batches:
        x_in = (batch[0] if transcoder else batch).double().numpy()
        x = batch[1].double().numpy() if transcoder else x_in
        hat, f = _numpy_forward(sae, x_in, transcoder)
        den = ((x - x.mean(axis=0)) ** 2).sum(axis=1)
        num = ((x - hat) ** 2).sum(axis=1)
        legacy.extend((1 - num[den > 0] / den[den > 0]).tolist())
        xs.append(x), hats.append(hat), fs.append(f)
    x, hat, f = np.concatenate(xs), np.concatenate(hats), np.concatenate(fs)
    n, d = x.shape
    resid = ((x - hat) ** 2).sum()
    nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(hat, axis=1)
    cos = np.array([xi @ hi / (a * b) if a * b > 0 else 0.0 for xi, hi, a, b in zip(x, hat, nx, nh)])
    freq = (f != 0).mean(axis=0)
    return {
        "fvu": resid / ((x - x.mean(axis=0)) ** 2).sum(),
        "ev_legacy": float(np.mean(legacy)),
        "ev_zero_centred": 1 - resid / (x**2).sum(),
        "mse": resid / (n * d),
        "cosine": cos.mean(),
        "l2_ratio": np.mean(nh / np.where(nx < 1e-4, 1.0, nx)),
        "shrinkage": (hat**2).sum() / (x * hat).sum(),
        "l0": (f != 0).sum(axis=1).mean(),
        "dead_fraction": (freq == 0).mean(),
        "dense_fraction_1pct": (freq > 0.01).mean(),
        "dense_fraction_10pct": (freq > 0.1).mean(),
        "n_tokens": float(n),
    }


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_every_metric_matches_numpy(transcoder):
    sae = _relu_sae(transcoder)
    batches = _data(transcoder)
    got = evaluate(sae, iter(batches))
    want = _numpy_metrics(sae, batches, transcoder)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    # The case exercises every regime of the density metrics, so they can fail.
    assert 0 < want["dead_fraction"] < 1 and 0 < want["dense_fraction_10pct"] < want["dense_fraction_1pct"] < 1


def test_fvu_is_stable_for_data_far_from_the_origin():
    sae = _relu_sae(False)
    with torch.no_grad():
        sae.b_dec.add_(1e4)  # reconstructions follow the shifted data
    batches = [x + 1e4 for x in _data(False)]
    got = evaluate(sae, batches)["fvu"]
    want = _numpy_metrics(sae, batches, False)["fvu"]
    assert got == pytest.approx(want, rel=1e-4)


def test_perfect_reconstruction_scores():
    sae = SparseAutoencoder(SAEConfig(d_in=4, architecture="relu", expansion=2), seed=0)
    with torch.no_grad():  # x_hat = relu(x) - relu(-x) = x exactly
        sae.W_enc.copy_(torch.cat([torch.eye(4), -torch.eye(4)], dim=1))
        sae.W_dec.copy_(torch.cat([torch.eye(4), -torch.eye(4)], dim=0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    m = evaluate(sae, [x[:20], x[20:]])
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert m["ev_legacy"] == m["ev_zero_centred"] == pytest.approx(1.0)
    assert m["cosine"] == m["l2_ratio"] == m["shrinkage"] == pytest.approx(1.0)


def test_evaluate_uses_inference_mode_and_restores_training_mode():
    sae = SparseAutoencoder(SAEConfig(d_in=8, architecture="batchtopk", expansion=2, k=2), seed=0)
    with torch.no_grad():
        sae.running_threshold.fill_(0.3)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    sae.train()
    m = evaluate(sae, [x])
    assert sae.training
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert m["l0"] == pytest.approx(float((z > 0.3).sum(1).float().mean()))


def test_ce_kl_scores_anchor_points():
    perfect = ce_kl_scores(clean_loss=2.5, recon_loss=2.5, zero_abl_loss=7.0, kl_recon=0.0, kl_zero=3.0)
    assert perfect["ce_loss_score"] == 1.0 and perfect["kl_score"] == 1.0 and perfect["delta_lm_loss"] == 0.0
    ablated = ce_kl_scores(clean_loss=2.5, recon_loss=7.0, zero_abl_loss=7.0, kl_recon=3.0, kl_zero=3.0)
    assert ablated["ce_loss_score"] == 0.0 and ablated["kl_score"] == 0.0
    mid = ce_kl_scores(clean_loss=2.0, recon_loss=3.0, zero_abl_loss=6.0, kl_recon=0.5, kl_zero=2.0)
    assert mid["ce_loss_score"] == pytest.approx(0.75)
    assert mid["kl_score"] == pytest.approx(0.75)
    assert mid["delta_lm_loss"] == pytest.approx(1.0)
    assert "kl_score" not in ce_kl_scores(2.0, 3.0, 6.0)
    assert math.isnan(ce_kl_scores(2.0, 2.0, 2.0)["ce_loss_score"])
