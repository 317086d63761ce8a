"""Sparse autoencoders and transcoders: TopK, BatchTopK, Matryoshka BatchTopK, ReLU (L1) and JumpReLU, in torch.

One module, `SparseAutoencoder`, covers every architecture so that training, evaluation and export share a
single parameter layout (SAELens' names and shapes):

    W_enc (d_in, d_sae)   b_enc (d_sae)   W_dec (d_sae, d_out)   b_dec (d_out)   [W_skip (d_in, d_out)]

    SAE:         f = act((x - b_dec) @ W_enc + b_enc)      x_hat = f @ W_dec + b_dec
    transcoder:  f = act(x_in @ W_enc + b_enc)             y_hat = f @ W_dec + b_dec [+ x_in @ W_skip]

Activations (`act`):
- topk:      keep the k largest pre-activations of each token, then ReLU (Gao et al. 2024, "Scaling and
             evaluating sparse autoencoders").
- batchtopk: at train time keep the k*B largest pre-activations of the whole batch (so the per-token L0 varies
             but averages k); at eval time a JumpReLU with one global threshold, the running average of the
             smallest positive activation kept per training batch (Bussmann et al. 2024, "BatchTopK SAEs").
- matryoshka_batchtopk: BatchTopK whose loss adds, for each nested prefix of the latents (the cumulative
             `matryoshka_widths`, e.g. the first 64, 256, then all), the reconstruction error of that prefix alone
             (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"; SAELens'
             MatryoshkaBatchTopK: the levels' losses are summed). Early latents must work without the later ones,
             so general features stay whole instead of being absorbed into specific ones. Inference is
             BatchTopK's.
- relu:      ReLU with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update), so the
             decoder needs no norm constraint.
- jumprelu:  z * H(z - theta) with a learned per-latent threshold, trained through straight-through estimators
             with a rectangle kernel and an L0 penalty (Rajamanoharan et al. 2024, Gemma Scope).

Sparse training path (topk / batchtopk): `training_loss` runs one dense GEMM, the encoder pre-activations needed
to choose the active latents, and then works on the chosen (token, latent) entries only, the way eai-sparsify
does: the decoder is an `embedding_bag` over the active rows of W_dec, and `EncodeSelected` gives the encoder
a backward that scatters each entry's gradient into its W_enc column (a sparse (d_sae, n) x (n, d_in) product)
instead of the dense x.T @ dz. AuxK's dead latents are handled the same way. This replaces five (eight with
AuxK) dense (n, d_in) x (d_in, d_sae)-sized GEMMs per step with one plus O(k * d_in) work per token; the
results equal the dense computation (`training_loss(..., sparse=False)`) up to float rounding. The selection
GEMM may run in bfloat16 (`select_dtype`): it then only decides *which* latents are active (near-ties at the
k-th value may fall either way); their values and every gradient are recomputed in float32.

Loss units (why they are what they are): the trainer feeds inputs scaled to mean L2 norm sqrt(d), so the
reconstruction term `mean ||x - x_hat||^2 / d_out` is O(1) whatever the width, L1 is divided by sqrt(d_out)
(a latent's activation measured in units of the token norm), and L0 is a plain count. The same coefficients
therefore mean the same trade-off at d_in = 64 and d_in = 4096.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actstore.schemas.errors import ConfigError
from actstore.schemas.sae import (  # noqa: F401
    ARCHITECTURES,
    B_DEC_INITS,
    BATCH_TOPK_FAMILY,
    DEFAULT_L1,
    TOPK_FAMILY,
    Architecture,
    SAEConfig,
)
from actstore.workers.sae.sparse import (
    EncodeSelected,
    Selection,
    batch_topk,
    concat_selections,
    select_batch_topk,
    select_dead,
    select_preacts,
    select_topk,
    topk,
)

RELU_DEC_INIT_NORM = 0.1  # Anthropic's ReLU recipe starts decoder rows small; their norm is then learned


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta): exact gradient in z, rectangle-kernel pseudo-derivative in theta."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        near = ((z - theta).abs() < bw / 2).to(grad.dtype)
        g_theta = (-(theta / bw) * near * grad).reshape(-1, z.shape[-1]).sum(0)
        return grad * (z > theta), g_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta): no gradient to z (the L0 penalty must only move thresholds), kernel gradient to theta."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        near = ((z - theta).abs() < bw / 2).to(grad.dtype)
        return None, (-(1.0 / bw) * near * grad).reshape(-1, z.shape[-1]).sum(0), None


def geometric_median(x: Tensor, iters: int = 20, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm in float64: the point minimising the sum of distances to the rows of `x`.

    Robust to the heavy-tailed rows of real activations, which is why Gao et al. start b_dec there."""
    pts = x.double()
    y = pts.mean(0)
    for _ in range(iters):
        w = 1.0 / (pts - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * pts).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * (y.norm() + 1e-12)
        y = y_new
        if done:
            break
    return y.to(x.dtype)


@torch.no_grad()
def update_running_threshold(threshold: Tensor, count: Tensor, batch_min: Tensor) -> None:
    """BatchTopK's inference threshold, in place: the running mean (an EMA after 100 batches) of the smallest
    activation kept per batch. A negative `threshold` means none yet: it starts at the batch's value. Shared by
    SAEs (scalar buffers) and cross-layer transcoders (one per layer)."""
    count += 1
    rate = max(1.0 / float(count), 0.01)
    if float(threshold) < 0:
        threshold.fill_(batch_min)
    else:
        threshold += rate * (batch_min - threshold)


class SparseAutoencoder(nn.Module):
    """Sparse autoencoder / transcoder; see the module docstring for the maths."""

    def __init__(self, cfg: SAEConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_target
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if not cfg.unit_norm_decoder:
            w_dec *= RELU_DEC_INIT_NORM
        # W_enc = W_dec^T (Gao et al., Conerly et al.): latents start as matched filters of their directions.
        if d_in == d_out:
            # contiguous(), not clone(): a clone keeps the transposed (column-major) strides, which the fused
            # Adam step must copy around on every step.
            w_enc = w_dec.T.contiguous()
        else:
            w_enc = torch.randn(d_in, d_sae, generator=gen)
            w_enc /= w_enc.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:
            # Zero start: the skip path only learns what the sparse path cannot carry.
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))
        if cfg.architecture == "jumprelu":
            # log-parametrised so thresholds stay positive without clamping.
            self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(cfg.jumprelu_threshold_init)))
        if cfg.architecture in BATCH_TOPK_FAMILY:
            # -1 = not estimated yet: eval falls back to per-token TopK until training has seen a batch.
            self.register_buffer("running_threshold", torch.tensor(-1.0))
            self.register_buffer("running_threshold_count", torch.tensor(0.0))

    # ----------------------------------------------------------------------------------------- inference
    @property
    def threshold(self) -> Tensor | None:
        """Per-latent JumpReLU thresholds (jumprelu, and batchtopk's global one broadcast), else None."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        if self.cfg.architecture in BATCH_TOPK_FAMILY and float(self.running_threshold) >= 0:
            return self.running_threshold.expand(self.cfg.d_sae)
        return None

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations z; SAEs centre the input on b_dec first, transcoders do not."""
        if not self.cfg.transcoder:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, z: Tensor) -> Tensor:
        """Sparse code from pre-activations; batchtopk uses the batch rule only in training mode."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(z)
        if arch == "jumprelu":
            return _JumpReLU.apply(z, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
        if arch in BATCH_TOPK_FAMILY and self.training:
            return batch_topk(z, self.cfg.k)
        if arch in BATCH_TOPK_FAMILY and float(self.running_threshold) >= 0:
            return torch.relu(z) * (z > self.running_threshold)
        return topk(z, self.cfg.k)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations f (..., d_sae) of input activations x (..., d_in)."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor, x_in: Tensor | None = None) -> Tensor:
        """Reconstruction (SAE) or prediction (transcoder); skip transcoders also need their input x_in."""
        out = f @ self.W_dec + self.b_dec
        if self.cfg.skip:
            if x_in is None:
                raise ConfigError("a skip transcoder's decode() needs x_in for the skip path")
            out = out + x_in @ self.W_skip
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x_hat, f) for input x."""
        f = self.encode(x)
        return self.decode(f, x), f

    # ------------------------------------------------------------------------------------------ training
    def training_loss(self, x_in: Tensor, x_out: Tensor, sparsity_scale: float = 1.0,
                      dead: Tensor | None = None, sparse: bool = True,
                      select_dtype: torch.dtype = torch.float32) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss on one batch (normalised units) and detached statistics: rec (of the full width; Matryoshka's
        inner prefix losses are in the loss only), sparsity, aux, l0, fired.

        `sparsity_scale` multiplies the L1/L0 coefficient (the trainer's warm-up); `dead` (d_sae bool)
        marks latents that have not fired for a while, which AuxK then trains on the residual. topk and
        batchtopk use the sparse path (module docstring) unless `sparse=False`, the dense reference;
        `select_dtype` is the dtype of the sparse path's selection GEMM."""
        if sparse and self.cfg.architecture in TOPK_FAMILY:
            return self._sparse_training_loss(x_in, x_out, dead, select_dtype)
        z = self.pre_acts(x_in)
        f = self.activate(z)
        x_hat = self.decode(f, x_in)
        rec = (x_hat - x_out).pow(2).sum(-1).mean() / self.cfg.d_target
        inner = self._dense_prefix_losses(f, x_in, x_out)
        sparsity = self._sparsity_loss(z, f) * (self.cfg.sparsity_coefficient * sparsity_scale)
        aux = self._auxk_loss(z, x_out - x_hat, dead)
        if self.cfg.architecture in BATCH_TOPK_FAMILY:
            self._update_running_threshold(f[f > 0])
        active = f.detach() != 0
        stats = {"rec": rec.detach(), "sparsity": sparsity.detach(), "aux": aux.detach(),
                 "l0": active.sum(-1).float().mean(), "fired": active.any(0)}
        return rec + inner + sparsity + self.cfg.aux_k_coefficient * aux, stats

    def _sparse_training_loss(self, x_in: Tensor, x_out: Tensor, dead: Tensor | None,
                              select_dtype: torch.dtype) -> tuple[Tensor, dict[str, Tensor]]:
        """topk / batchtopk loss touching only the active (and AuxK) entries; equals the dense path."""
        cfg = self.cfg
        n = x_in.shape[0]
        # The encoder input carries no autograd graph: EncodeSelected returns b_dec's gradient itself.
        enc_in = x_in if cfg.transcoder else x_in - self.b_dec.detach()
        with torch.no_grad():
            z = select_preacts(enc_in, self.W_enc, self.b_enc, select_dtype)
            main = select_topk(z, cfg.k) if cfg.architecture == "topk" else select_batch_topk(z, cfg.k)
            aux_sel = select_dead(z, dead, cfg.aux_k_resolved)
        del z  # the (n, d_sae) pre-activations are the largest tensor of the step; free them early
        both = main if aux_sel is None else concat_selections(main, aux_sel)
        pre = EncodeSelected.apply(enc_in, self.W_enc, self.b_enc, None if cfg.transcoder else self.b_dec,
                                    both.idx, both.tok, both.offsets, both.vals, select_dtype != torch.float32)
        n_main = main.idx.shape[0]
        vals = torch.relu(pre[:n_main])
        x_hat = F.embedding_bag(main.idx, self.W_dec, main.offsets, mode="sum", per_sample_weights=vals)
        x_hat = x_hat + self.b_dec
        if cfg.skip:
            x_hat = x_hat + x_in @ self.W_skip
        rec = (x_hat - x_out).pow(2).sum(-1).mean() / cfg.d_target
        inner = self._sparse_prefix_losses(main, vals, x_in, x_out)
        aux = pre.new_zeros(())
        if aux_sel is not None:
            e = (x_out - x_hat).detach()
            e_hat = F.embedding_bag(aux_sel.idx, self.W_dec, aux_sel.offsets, mode="sum",
                                    per_sample_weights=torch.relu(pre[n_main:]))
            aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
        kept = vals.detach() > 0
        if cfg.architecture in BATCH_TOPK_FAMILY:
            self._update_running_threshold(vals.detach()[kept])
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x_in.device)
        fired[main.idx[kept]] = True
        stats = {"rec": rec.detach(), "sparsity": pre.new_zeros(()), "aux": aux.detach(),
                 "l0": kept.sum().float() / n, "fired": fired}
        return rec + inner + cfg.aux_k_coefficient * aux, stats

    def _prefix_output(self, partial: Tensor, x_in: Tensor) -> Tensor:
        out = partial + self.b_dec
        return out + x_in @ self.W_skip if self.cfg.skip else out

    def _dense_prefix_losses(self, f: Tensor, x_in: Tensor, x_out: Tensor) -> Tensor:
        """Summed reconstruction losses of the inner Matryoshka prefixes (0 for other architectures)."""
        total = f.new_zeros(())
        partial, start = None, 0
        for width in self.cfg.matryoshka_widths_resolved[:-1]:
            step = f[:, start:width] @ self.W_dec[start:width]
            partial, start = step if partial is None else partial + step, width
            total = total + (self._prefix_output(partial, x_in) - x_out).pow(2).sum(-1).mean() / self.cfg.d_target
        return total

    def _sparse_prefix_losses(self, main: Selection, vals: Tensor, x_in: Tensor, x_out: Tensor) -> Tensor:
        """The same on the sparse path: each prefix decodes only its own active entries."""
        total = vals.new_zeros(())
        for width in self.cfg.matryoshka_widths_resolved[:-1]:
            weights = vals * (main.idx < width).to(vals.dtype)
            partial = F.embedding_bag(main.idx, self.W_dec, main.offsets, mode="sum", per_sample_weights=weights)
            total = total + (self._prefix_output(partial, x_in) - x_out).pow(2).sum(-1).mean() / self.cfg.d_target
        return total

    def _sparsity_loss(self, z: Tensor, f: Tensor) -> Tensor:
        arch = self.cfg.architecture
        if arch == "relu":
            # Weighting by ||W_dec row|| removes the trivial escape of shrinking f while growing W_dec.
            return (f * self.W_dec.norm(dim=1)).sum(-1).mean() / math.sqrt(self.cfg.d_target)
        if arch == "jumprelu":
            theta = self.log_threshold.exp()
            return _Step.apply(z, theta, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return z.new_zeros(())

    def _auxk_loss(self, z: Tensor, residual: Tensor, dead: Tensor | None) -> Tensor:
        """Gao et al.'s AuxK: the top-k_aux dead latents reconstruct the main model's residual.

        Normalised by the residual's variance (as sparsify does) so its weight means the same at any scale."""
        k_aux = self.cfg.aux_k_resolved
        if dead is None or k_aux == 0 or not bool(dead.any()):
            return z.new_zeros(())
        k_aux = min(k_aux, int(dead.sum()))
        e = residual.detach()
        vals, idx = z.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        f_aux = torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))
        e_hat = f_aux @ self.W_dec
        return (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)

    @torch.no_grad()
    def _update_running_threshold(self, kept: Tensor) -> None:
        """Running mean (turning into an EMA after 100 batches) of the smallest activation kept per batch
        (`kept`: the batch's positive activations)."""
        if kept.numel() > 0:
            update_running_threshold(self.running_threshold, self.running_threshold_count, kept.min())

    # ------------------------------------------------------------------------------ parameter surgery
    @torch.no_grad()
    def init_b_dec(self, x_out: Tensor) -> None:
        """Initialise b_dec from a sample of targets (cfg.b_dec_init)."""
        how = self.cfg.b_dec_init
        if how == "geometric_median":
            self.b_dec.copy_(geometric_median(x_out.float()))
        elif how == "mean":
            self.b_dec.copy_(x_out.double().mean(0).float())
        else:
            self.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project decoder rows back to unit norm (after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each unit decoder row: it could only change the row's norm,
        which normalize_decoder_ undoes anyway, and it would distort Adam's second-moment estimates."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def fold_scale_(self, scale_in: float, scale_out: float) -> None:
        """Make a model trained on (scale_in * x_in -> scale_out * x_out) work on raw activations.

        The decoder (unit rows) is left alone; latents come out in raw units (divided by scale_out):
        W_enc, W_skip *= scale_in / scale_out; b_enc, b_dec, thresholds /= scale_out. For SAEs
        scale_in == scale_out, so W_enc is unchanged and b_dec stays consistent on both sides."""
        ratio = scale_in / scale_out
        self.W_enc *= ratio
        self.b_enc /= scale_out
        self.b_dec /= scale_out
        if self.cfg.skip:
            self.W_skip *= ratio
        if self.cfg.architecture == "jumprelu":
            self.log_threshold -= math.log(scale_out)
        if self.cfg.architecture in BATCH_TOPK_FAMILY and float(self.running_threshold) >= 0:
            self.running_threshold /= scale_out
