"""Sparse autoencoders and transcoders: TopK, BatchTopK, ReLU (L1) and JumpReLU, in pure torch.

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
- relu:      ReLU with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update), so the
             decoder needs no norm constraint.
- jumprelu:  z * H(z - theta) with a learned per-latent threshold, trained through straight-through estimators
             with a rectangle kernel and an L0 penalty (Rajamanoharan et al. 2024, Gemma Scope).

Sparse training path (topk / batchtopk): `training_loss` runs one dense GEMM, the encoder pre-activations needed
to choose the active latents, and then works on the chosen (token, latent) entries only, the way eai-sparsify
does: the decoder is an `embedding_bag` over the active rows of W_dec, and `_EncodeSelected` gives the encoder
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
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu"]
ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
# Default sparsity coefficients in the normalised loss units described in the module docstring.
DEFAULT_L1 = {"relu": 0.1, "jumprelu": 1e-3}
RELU_DEC_INIT_NORM = 0.1  # Anthropic's ReLU recipe starts decoder rows small; their norm is then learned


@dataclass
class SAEConfig:
    """Architecture of a sparse autoencoder or transcoder. Invalid values fail here, naming the field."""

    d_in: int
    """Width of the input activations."""
    architecture: Architecture = "topk"
    """'topk' | 'batchtopk' | 'relu' | 'jumprelu' (see the module docstring)."""
    expansion: int = 8
    """d_sae = expansion * d_in latents."""
    k: int = 32
    """Active latents per token for topk; the mean active latents per token for batchtopk."""
    l1_coefficient: float | None = None
    """Sparsity penalty: L1 (relu) or L0 (jumprelu) coefficient; None = 0.1 for relu, 1e-3 for jumprelu.
    In normalised units: a jumprelu latent must explain more than 0.1% of the token's power to be worth it."""
    jumprelu_threshold_init: float = 0.5
    """Initial threshold of every jumprelu latent (normalised units; pre-activations start ~N(0, 1))."""
    jumprelu_bandwidth: float = 0.5
    """Width of the rectangle kernel of the jumprelu straight-through estimators (normalised units)."""
    aux_k: int | None = None
    """AuxK: how many dead latents reconstruct the residual (topk/batchtopk only). None = d_in // 2
    (Gao et al.), 0 = off."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al.)."""
    normalize_decoder: bool | None = None
    """Keep decoder rows at unit norm. None = True for topk/batchtopk/jumprelu, False for relu (whose L1
    penalty is weighted by the row norms instead)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How b_dec starts: geometric median (Weiszfeld) or mean of the first batch of targets, or zeros."""
    transcoder: bool = False
    """Map input activations to different output activations (x_in -> x_out) instead of reconstructing x."""
    skip: bool = False
    """Add a linear skip path x_in @ W_skip to the output (skip transcoders); transcoders only."""
    d_out: int | None = None
    """Width of the output activations; None = d_in. Only transcoders may differ."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"SAEConfig.{field}: {why} (got {getattr(self, field)!r})")

        if self.architecture not in ARCHITECTURES:
            raise bad("architecture", f"must be one of {ARCHITECTURES}")
        if self.d_in < 1:
            raise bad("d_in", "must be >= 1")
        if self.expansion < 1:
            raise bad("expansion", "must be >= 1")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise bad("k", f"must be in [1, d_sae={self.d_sae}]")
        if self.l1_coefficient is not None and self.l1_coefficient < 0:
            raise bad("l1_coefficient", "must be >= 0")
        if self.jumprelu_threshold_init <= 0 or self.jumprelu_bandwidth <= 0:
            raise bad("jumprelu_threshold_init", "threshold init and bandwidth must be > 0")
        if self.aux_k is not None and self.aux_k < 0:
            raise bad("aux_k", "must be >= 0")
        if self.b_dec_init not in B_DEC_INITS:
            raise bad("b_dec_init", f"must be one of {B_DEC_INITS}")
        if self.skip and not self.transcoder:
            raise bad("skip", "a skip path needs transcoder=True")
        if self.d_out is not None and self.d_out != self.d_in and not self.transcoder:
            raise bad("d_out", "only transcoders may have d_out != d_in")

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion

    @property
    def d_target(self) -> int:
        """Resolved output width."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def unit_norm_decoder(self) -> bool:
        if self.normalize_decoder is not None:
            return self.normalize_decoder
        return self.architecture != "relu"

    @property
    def sparsity_coefficient(self) -> float:
        if self.l1_coefficient is not None:
            return self.l1_coefficient
        return DEFAULT_L1.get(self.architecture, 0.0)

    @property
    def aux_k_resolved(self) -> int:
        if self.architecture not in ("topk", "batchtopk"):
            return 0
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)


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
        if cfg.architecture == "batchtopk":
            # -1 = not estimated yet: eval falls back to per-token TopK until training has seen a batch.
            self.register_buffer("running_threshold", torch.tensor(-1.0))
            self.register_buffer("running_threshold_count", torch.tensor(0.0))

    # ----------------------------------------------------------------------------------------- inference
    @property
    def threshold(self) -> Tensor | None:
        """Per-latent JumpReLU thresholds (jumprelu, and batchtopk's global one broadcast), else None."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        if self.cfg.architecture == "batchtopk" and float(self.running_threshold) >= 0:
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
        if arch == "batchtopk" and self.training:
            return _batch_topk(z, self.cfg.k)
        if arch == "batchtopk" and float(self.running_threshold) >= 0:
            return torch.relu(z) * (z > self.running_threshold)
        return _topk(z, self.cfg.k)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations f (..., d_sae) of input activations x (..., d_in)."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor, x_in: Tensor | None = None) -> Tensor:
        """Reconstruction (SAE) or prediction (transcoder); skip transcoders also need their input x_in."""
        out = f @ self.W_dec + self.b_dec
        if self.cfg.skip:
            if x_in is None:
                raise ValueError("a skip transcoder's decode() needs x_in for the skip path")
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
        """Loss on one batch (normalised units) and detached statistics: rec, sparsity, aux, l0, fired.

        `sparsity_scale` multiplies the L1/L0 coefficient (the trainer's warm-up); `dead` (d_sae bool)
        marks latents that have not fired for a while, which AuxK then trains on the residual. topk and
        batchtopk use the sparse path (module docstring) unless `sparse=False`, the dense reference;
        `select_dtype` is the dtype of the sparse path's selection GEMM."""
        if sparse and self.cfg.architecture in ("topk", "batchtopk"):
            return self._sparse_training_loss(x_in, x_out, dead, select_dtype)
        z = self.pre_acts(x_in)
        f = self.activate(z)
        x_hat = self.decode(f, x_in)
        rec = (x_hat - x_out).pow(2).sum(-1).mean() / self.cfg.d_target
        sparsity = self._sparsity_loss(z, f) * (self.cfg.sparsity_coefficient * sparsity_scale)
        aux = self._auxk_loss(z, x_out - x_hat, dead)
        if self.cfg.architecture == "batchtopk":
            self._update_running_threshold(f[f > 0])
        active = f.detach() != 0
        stats = {"rec": rec.detach(), "sparsity": sparsity.detach(), "aux": aux.detach(),
                 "l0": active.sum(-1).float().mean(), "fired": active.any(0)}
        return rec + sparsity + self.cfg.aux_k_coefficient * aux, stats

    def _sparse_training_loss(self, x_in: Tensor, x_out: Tensor, dead: Tensor | None,
                              select_dtype: torch.dtype) -> tuple[Tensor, dict[str, Tensor]]:
        """topk / batchtopk loss touching only the active (and AuxK) entries; equals the dense path."""
        cfg = self.cfg
        n = x_in.shape[0]
        # The encoder input carries no autograd graph: _EncodeSelected returns b_dec's gradient itself.
        enc_in = x_in if cfg.transcoder else x_in - self.b_dec.detach()
        with torch.no_grad():
            z = _select_preacts(enc_in, self.W_enc, self.b_enc, select_dtype)
            main = _select_topk(z, cfg.k) if cfg.architecture == "topk" else _select_batch_topk(z, cfg.k)
            aux_sel = _select_dead(z, dead, cfg.aux_k_resolved)
        del z  # the (n, d_sae) pre-activations are the largest tensor of the step; free them early
        both = main if aux_sel is None else _concat(main, aux_sel)
        pre = _EncodeSelected.apply(enc_in, self.W_enc, self.b_enc, None if cfg.transcoder else self.b_dec,
                                    both.idx, both.tok, both.offsets, both.vals, select_dtype != torch.float32)
        n_main = main.idx.shape[0]
        vals = torch.relu(pre[:n_main])
        x_hat = F.embedding_bag(main.idx, self.W_dec, main.offsets, mode="sum", per_sample_weights=vals)
        x_hat = x_hat + self.b_dec
        if cfg.skip:
            x_hat = x_hat + x_in @ self.W_skip
        rec = (x_hat - x_out).pow(2).sum(-1).mean() / cfg.d_target
        aux = pre.new_zeros(())
        if aux_sel is not None:
            e = (x_out - x_hat).detach()
            e_hat = F.embedding_bag(aux_sel.idx, self.W_dec, aux_sel.offsets, mode="sum",
                                    per_sample_weights=torch.relu(pre[n_main:]))
            aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
        kept = vals.detach() > 0
        if cfg.architecture == "batchtopk":
            self._update_running_threshold(vals.detach()[kept])
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x_in.device)
        fired[main.idx[kept]] = True
        stats = {"rec": rec.detach(), "sparsity": pre.new_zeros(()), "aux": aux.detach(),
                 "l0": kept.sum().float() / n, "fired": fired}
        return rec + cfg.aux_k_coefficient * aux, stats

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
        if kept.numel() == 0:
            return
        self.running_threshold_count += 1
        rate = max(1.0 / float(self.running_threshold_count), 0.01)
        if float(self.running_threshold) < 0:
            self.running_threshold.fill_(kept.min())
        else:
            self.running_threshold += rate * (kept.min() - self.running_threshold)

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
        if self.cfg.architecture == "batchtopk" and float(self.running_threshold) >= 0:
            self.running_threshold /= scale_out


def _topk(z: Tensor, k: int) -> Tensor:
    """Per-token TopK followed by ReLU (a selected latent with a negative pre-activation stays off)."""
    vals, idx = z.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))


def _batch_topk(z: Tensor, k: int) -> Tensor:
    """Keep the k * n_tokens largest ReLU'd pre-activations over the whole batch."""
    flat = torch.relu(z).reshape(-1)
    n_keep = min(k * (z.numel() // z.shape[-1]), flat.numel())
    vals, idx = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).reshape(z.shape)


# ------------------------------------------------------------------------------------ sparse training path
class _Selection(NamedTuple):
    """Chosen (token, latent) entries, grouped by token in the order `F.embedding_bag` wants."""

    idx: Tensor  # (E,) int64 latent of each entry
    tok: Tensor  # (E,) int64 token of each entry
    offsets: Tensor  # (n,) position in idx of each token's first entry (bag offsets)
    vals: Tensor  # (E,) the entry's pre-activation as computed by the selection GEMM


def _select_preacts(enc_in: Tensor, w_enc: Tensor, b_enc: Tensor, dtype: torch.dtype) -> Tensor:
    """Dense pre-activations used only to choose latents; bfloat16 halves the one big GEMM's cost on CPUs
    with native bf16 dot products (the chosen entries' values are recomputed in float32 afterwards)."""
    if dtype == torch.float32:
        return torch.addmm(b_enc, enc_in, w_enc)
    return torch.addmm(b_enc.to(dtype), enc_in.to(dtype), w_enc.to(dtype))


def _uniform(idx: Tensor, vals: Tensor) -> _Selection:
    """Selection with the same number of entries (idx.shape[1]) for every token."""
    n, k = idx.shape
    dev = idx.device
    return _Selection(idx.reshape(-1), torch.arange(n, device=dev).repeat_interleave(k),
                      torch.arange(0, n * k, k, device=dev), vals.reshape(-1))


def _select_topk(z: Tensor, k: int) -> _Selection:
    """The k largest pre-activations of each token (same rule as `_topk`, ReLU applied later)."""
    vals, idx = z.topk(k, dim=-1, sorted=False)
    return _uniform(idx, vals)


def _select_batch_topk(z: Tensor, k: int) -> _Selection:
    """The k * n largest pre-activations of the batch (the entries `_batch_topk` keeps), without a top-k
    over all n * d_sae values, which is ~10x slower than a per-token top-k on CPU.

    Candidates are each token's top c = 4k; the batch's top k * n among them is exact unless some token had
    all c candidates chosen (its next value might also belong). Then the candidates' k*n-th value is a
    lower bound of the true threshold, and the exact top k * n is taken among the entries above it."""
    n, d_sae = z.shape
    n_keep = k * n
    c = min(d_sae, 4 * k)
    cand_vals, cand_idx = z.topk(c, dim=-1, sorted=False)
    top_vals, pos = cand_vals.reshape(-1).topk(n_keep, sorted=False)
    tok = torch.div(pos, c, rounding_mode="floor")
    if c < d_sae and bool((torch.bincount(tok, minlength=n) == c).any()):
        bound = top_vals.min()
        tok, lat = (z >= bound).nonzero(as_tuple=True)
        top_vals, pick = z[tok, lat].topk(n_keep, sorted=False)
        tok, idx = tok[pick], lat[pick]
    else:
        idx = cand_idx.reshape(-1)[pos]
    # Group entries by token (a stable sort keeps the result deterministic) for embedding_bag's bags.
    order = torch.argsort(tok, stable=True)
    tok, idx, top_vals = tok[order], idx[order], top_vals[order]
    counts = torch.bincount(tok, minlength=n)
    return _Selection(idx, tok, torch.cumsum(counts, 0) - counts, top_vals)


def _select_dead(z: Tensor, dead: Tensor | None, k_aux: int) -> _Selection | None:
    """AuxK: each token's top-k_aux pre-activations among dead latents (None when AuxK is off or none is
    dead). Only the dead columns are gathered, so few dead latents cost little."""
    if dead is None or k_aux == 0:
        return None
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return None
    vals, local = z.index_select(1, dead_idx).topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
    return _uniform(dead_idx[local], vals)


def _concat(a: _Selection, b: _Selection) -> _Selection:
    return _Selection(torch.cat([a.idx, b.idx]), torch.cat([a.tok, b.tok]),
                      torch.cat([a.offsets, b.offsets + a.idx.shape[0]]), torch.cat([a.vals, b.vals]))


def _sampled_dot(rows: Tensor, table: Tensor, idx: Tensor, tok: Tensor, offsets: Tensor) -> Tensor:
    """out[e] = rows[tok[e]] . table[idx[e]] without materialising the (E, d) gathered rows.

    This is embedding_bag's per-sample-weight gradient kernel (the same dot products), which torch exposes
    only as an aten op; tests check it against the explicit formula."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(rows, table, idx, offsets, tok, 0)


def _scatter_rows(idx: Tensor, tok: Tensor, weight: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """out (n_out, d) with out[j] = sum over entries e with idx[e] == j of weight[e] * rows[tok[e]].

    A CSR (n_out, n) x (n, d) product: O(E * d) work and no (E, d) intermediate (sparsify's index_add over
    gathered rows materialises one, 400 MB at d_in = 768)."""
    order = torch.argsort(idx, stable=True)
    crow = torch.zeros(n_out + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(torch.bincount(idx, minlength=n_out), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the CSR x dense product is all we use
        warnings.simplefilter("ignore")
        mat = torch.sparse_csr_tensor(crow, tok[order], weight[order], (n_out, rows.shape[0]),
                                      check_invariants=False)
        return mat @ rows


class _EncodeSelected(torch.autograd.Function):
    """Encoder pre-activations of the selected (token, latent) entries, with a backward over them only.

    Inputs: enc_in (n, d_in) without autograd history (for SAEs already x - b_dec), W_enc, b_enc, b_dec or
    None (SAEs: the encoder input is centred on it), the selection, and whether the selection's values came
    from a lower-precision GEMM and must be recomputed. Gradients: b_enc[j] = sum of the entry gradients g
    of latent j; W_enc[:, j] = sum of g * enc_in[token] over those entries (a (d_sae, d_in) scatter; autograd
    transposes it into W_enc's layout, one (d_in, d_sae) copy, cheaper than storing W_enc column-major, which
    makes the fused Adam step copy every W_enc-shaped tensor); b_dec = -W_enc @ grad(b_enc), because b_dec
    shifts every token's input and the encoder is linear in it."""

    @staticmethod
    def forward(ctx, enc_in: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None,  # type: ignore[override]
                idx: Tensor, tok: Tensor, offsets: Tensor, vals: Tensor, recompute: bool) -> Tensor:
        if recompute:
            vals = _sampled_dot(enc_in, w_enc.t().contiguous(), idx, tok, offsets) + b_enc[idx]
        else:
            vals = vals.clone()
        ctx.save_for_backward(enc_in, w_enc, idx, tok)
        ctx.has_b_dec = b_dec is not None
        return vals

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        enc_in, w_enc, idx, tok = ctx.saved_tensors
        d_sae = w_enc.shape[1]
        g_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, idx, grad)
        g_w_enc = _scatter_rows(idx, tok, grad, enc_in, d_sae).t() if ctx.needs_input_grad[1] else None
        g_b_dec = -(w_enc @ g_b_enc) if ctx.has_b_dec and ctx.needs_input_grad[3] else None
        return None, g_w_enc, g_b_enc, g_b_dec, None, None, None, None, None
