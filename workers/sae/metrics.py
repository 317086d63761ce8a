"""Streaming evaluation of sparse autoencoders / transcoders on held-out activation batches.

`evaluate(sae, batches)` makes one pass, accumulating float64 sums, so memory does not grow with the number of
tokens. With n tokens x (targets), reconstructions x_hat and latents f (d_sae), the reported metrics are:

- fvu:             sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean over the whole evaluated set (total-variance
                   fraction of variance unexplained; 1 - fvu is the "explained variance" of sparsify/OpenAI).
- ev_legacy:       SAELens' `explained_variance_legacy`: for each batch B with batch mean m_B, each token gets
                   1 - ||x - x_hat||^2 / ||x - m_B||^2; the result is the mean over all tokens. It depends on
                   how the tokens are batched and is dominated by tokens near the batch mean; reported only for
                   comparison with published numbers. Tokens equal to their batch mean (e.g. a batch of one
                   token) have no defined value and are left out of the mean.
- ev_zero_centred: 1 - sum ||x - x_hat||^2 / sum ||x||^2 (variance measured around 0, not the mean).
- mse:             sum ||x - x_hat||^2 / (n * d), the mean squared error per element.
- cosine:          mean over tokens of cos(x, x_hat); a token where either vector is 0 counts as 0.
- l2_ratio:        mean over tokens of ||x_hat|| / ||x||, with ||x|| < 1e-4 replaced by 1 (as SAELens does).
- shrinkage:       sum ||x_hat||^2 / sum <x, x_hat> (relative reconstruction bias, eq. 10 of Rajamanoharan et al.
                   2024); 1 = unbiased, < 1 = the reconstruction is shrunk towards 0.
- l0:              mean number of non-zero latents per token.
- dead_fraction:   fraction of latents that never fire (are non-zero) on the evaluated set.
- dense_fraction_1pct / dense_fraction_10pct: fraction of latents firing on more than 1% / 10% of the tokens.
- n_tokens:        tokens evaluated.

The SAE must operate on raw activations (the trainer folds its scaling back in), so no scaling is undone here.
`evaluate_layers` does the same for a cross-layer transcoder, once per layer (targets: that layer's MLP output;
latents: that layer's features), and adds totals: fvu over all layers (summed residuals over summed variances),
l0 summed over layers, dead_fraction over all features.
`ce_kl_scores` turns the losses of a spliced forward pass into the CE-loss and KL scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from actstore.schemas.errors import AnalysisError
from actstore.workers.sae.model import SparseAutoencoder

_NORM_FLOOR = 1e-4  # SAELens: ||x|| below this is replaced by 1 in the l2 ratio


@dataclass
class _Sums:
    """Running float64 sums over all evaluated tokens."""

    n: int = 0
    shift: Tensor | None = None  # first batch's mean: variance sums are taken around it for stability
    sum_shifted: Tensor | None = None  # (d,) sum of (x - shift)
    sq_shifted: float = 0.0  # sum ||x - shift||^2
    sq_x: float = 0.0  # sum ||x||^2
    sq_resid: float = 0.0  # sum ||x - x_hat||^2
    sq_hat: float = 0.0  # sum ||x_hat||^2
    dot: float = 0.0  # sum <x, x_hat>
    ev_legacy: float = 0.0  # sum over tokens of the per-token legacy EV
    cosine: float = 0.0
    l2_ratio: float = 0.0
    l0: float = 0.0
    fires: Tensor | None = None  # (d_sae,) tokens on which each latent fired
    n_legacy: int = 0  # tokens with a non-zero legacy denominator
    d: int = 0


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, batches: Iterable[Tensor | tuple[Tensor, Tensor]],
             device: str | torch.device | None = None) -> dict[str, float]:
    """Metrics of `sae` over held-out batches (tensors for SAEs, (x_in, x_out) pairs for transcoders)."""
    device = torch.device(device) if device is not None else sae.W_enc.device
    was_training = sae.training
    sae.eval()  # batchtopk must use its inference threshold
    sums = _Sums()
    try:
        for batch in batches:
            x_in, x_out = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, batch)
            x_in = x_in.reshape(-1, x_in.shape[-1]).to(device, torch.float32)
            x_out = x_out.reshape(-1, x_out.shape[-1]).to(device, torch.float32)
            if x_in.shape[0] == 0:
                continue
            f = sae.encode(x_in)
            _accumulate(sums, x_out.double(), sae.decode(f, x_in).double(), f)
    finally:
        sae.train(was_training)
    if sums.n == 0:
        raise AnalysisError("evaluate(): the batches held no tokens")
    return _finish(sums)


def _accumulate(s: _Sums, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
    if s.shift is None:
        s.shift, s.sum_shifted, s.d = x.mean(0), torch.zeros_like(x[0]), x.shape[1]
        s.fires = torch.zeros(f.shape[-1], dtype=torch.float64, device=f.device)
    resid = (x - x_hat).pow(2).sum(-1)
    centred = x - s.shift
    s.n += x.shape[0]
    s.sum_shifted += centred.sum(0)
    s.sq_shifted += float(centred.pow(2).sum())
    s.sq_x += float(x.pow(2).sum())
    s.sq_resid += float(resid.sum())
    s.sq_hat += float(x_hat.pow(2).sum())
    s.dot += float((x * x_hat).sum())
    legacy_den = (x - x.mean(0)).pow(2).sum(-1)
    ok = legacy_den > 0
    s.ev_legacy += float((1 - resid[ok] / legacy_den[ok]).sum())
    s.n_legacy += int(ok.sum())
    norm_x, norm_hat = x.norm(dim=-1), x_hat.norm(dim=-1)
    denom = norm_x * norm_hat
    s.cosine += float(torch.where(denom > 0, (x * x_hat).sum(-1) / denom.clamp_min(1e-300), 0.0).sum())
    s.l2_ratio += float((norm_hat / torch.where(norm_x < _NORM_FLOOR, 1.0, norm_x)).sum())
    active = f != 0
    s.l0 += float(active.sum())
    s.fires += active.sum(0).double()


def _total_var(s: _Sums) -> float:
    """sum ||x - mean||^2 = sum ||x - shift||^2 - n ||mean - shift||^2 (exact; small because shift ~ mean)."""
    mean_shifted = s.sum_shifted / s.n
    return s.sq_shifted - s.n * float(mean_shifted.pow(2).sum())


def _finish(s: _Sums) -> dict[str, float]:
    total_var = _total_var(s)
    freq = s.fires / s.n
    return {
        "fvu": s.sq_resid / total_var if total_var > 0 else float("nan"),
        "ev_legacy": s.ev_legacy / s.n_legacy if s.n_legacy else float("nan"),
        "ev_zero_centred": 1 - s.sq_resid / s.sq_x if s.sq_x > 0 else float("nan"),
        "mse": s.sq_resid / (s.n * s.d),
        "cosine": s.cosine / s.n,
        "l2_ratio": s.l2_ratio / s.n,
        "shrinkage": s.sq_hat / s.dot if s.dot != 0 else float("nan"),
        "l0": s.l0 / s.n,
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction_1pct": float((freq > 0.01).double().mean()),
        "dense_fraction_10pct": float((freq > 0.1).double().mean()),
        "n_tokens": float(s.n),
    }


def ce_kl_scores(clean_loss: float, recon_loss: float, zero_abl_loss: float,
                 kl_recon: float | None = None, kl_zero: float | None = None) -> dict[str, float]:
    """Downstream scores from a forward pass with the reconstruction spliced in (SAELens definitions).

    ce_loss_score = (zero - recon) / (zero - clean): 1 for a perfect reconstruction, 0 for zero-ablation.
    kl_score = 1 - kl_recon / kl_zero (same anchors; KL of the spliced vs the clean next-token distribution).
    delta_lm_loss = recon - clean. A zero denominator gives NaN rather than a misleading number."""
    out = {"ce_loss_clean": float(clean_loss), "ce_loss_with_sae": float(recon_loss),
           "ce_loss_with_ablation": float(zero_abl_loss), "delta_lm_loss": float(recon_loss - clean_loss),
           "ce_loss_score": _ratio(zero_abl_loss - recon_loss, zero_abl_loss - clean_loss)}
    if kl_recon is not None and kl_zero is not None:
        out.update({"kl_div_with_sae": float(kl_recon), "kl_div_with_ablation": float(kl_zero),
                    "kl_score": 1.0 - _ratio(kl_recon, kl_zero)})
    return out


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if float(den) != 0 else float("nan")


@torch.no_grad()
def evaluate_layers(clt: Any, batches: Iterable[tuple[Tensor, Tensor]],
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """Per-layer metrics of a CrossLayerTranscoder over held-out (x_in, x_out) batches of flattened rows
    (n, L * d_model): {"layers": [metrics of layer 0, ...], "fvu": ..., "l0": ..., "dead_fraction": ...}."""
    device = torch.device(device) if device is not None else clt.W_enc.device
    was_training = clt.training
    clt.eval()
    sums = [_Sums() for _ in range(clt.cfg.n_layers)]
    try:
        for x_in, x_out in batches:
            if x_in.shape[0] == 0:
                continue
            y = clt.layered(x_out.to(device, torch.float32)).double()
            y_hat, f = clt(x_in.to(device, torch.float32))
            for layer, s in enumerate(sums):
                _accumulate(s, y[:, layer], y_hat[:, layer].double(), f[:, layer])
    finally:
        clt.train(was_training)
    if sums[0].n == 0:
        raise AnalysisError("evaluate_layers(): the batches held no tokens")
    return _layer_totals(sums)


def _layer_totals(sums: list[_Sums]) -> dict[str, Any]:
    layers = [_finish(s) for s in sums]
    resid = sum(s.sq_resid for s in sums)
    var = sum(_total_var(s) for s in sums)
    fires = torch.cat([s.fires for s in sums if s.fires is not None])
    return {"layers": layers, "fvu": resid / var if var > 0 else float("nan"),
            "fvu_per_layer": [m["fvu"] for m in layers], "l0": sum(m["l0"] for m in layers),
            "l0_per_layer": [m["l0"] for m in layers], "dead_fraction": float((fires == 0).double().mean()),
            "n_tokens": layers[0]["n_tokens"]}
