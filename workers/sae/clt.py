"""Cross-layer transcoders (CLTs): one sparse encoder per layer, each feature writing to its own and every later
layer's MLP output (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer's `CrossLayerTranscoder`).

With L layers, inputs x_l (the MLP input of layer l, d_model wide) and targets y_l (the MLP output):

    f_l      = act(x_l @ W_enc[l] + b_enc[l])                         (d_sae features per layer)
    y_hat_l' = sum_{l <= l'} f_l @ W_dec[l][:, l' - l] + b_dec[l']

Parameters: W_enc (L, d_model, d_sae), b_enc (L, d_sae), b_dec (L, d_model) and one decoder per source layer,
W_dec[l] (d_sae, L - l, d_model): circuit-tracer's W_dec_{l} layout, so no feature ever writes to an earlier
layer. Activations reuse the SAE code (`actstore.workers.sae.model`), applied per layer: topk keeps k features
per token and layer; batchtopk keeps k * n per layer over the batch in training and uses one running threshold
per layer at inference; jumprelu has a learned threshold per feature (L0 penalty through the same
straight-through estimators); relu has an L1 penalty weighted by the norm of each feature's whole decoder
(all the layers it writes to, as Anthropic's CLTs do). The top-k rules add AuxK per layer (dead features of each
layer reconstruct the residual of all the layers they write to), as SAEs do.

The trainer (`actstore.workers.sae.training.train`) drives this module through the same methods as a
`SparseAutoencoder`, with every layer flattened into one row: batches are (x_in, x_out) of shape
(n, L * d_model), layer l in columns [l * d_model, (l + 1) * d_model). Inputs and targets are scaled per layer
to mean norm sqrt(d_model) while training; `fold_scale_` puts the scales into the weights afterwards, so the
returned CLT reads and writes raw activations (its features stay in the normalised units). Decoder norms:
with `normalize_decoder` each feature's concatenated decoder (all its target layers) has unit norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from actstore.schemas.sae import BATCH_TOPK_FAMILY, CLTConfig
from actstore.workers.sae.model import (
    RELU_DEC_INIT_NORM,
    _JumpReLU,
    _Step,
    geometric_median,
    update_running_threshold,
)
from actstore.workers.sae.sparse import batch_topk, topk


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder; see the module docstring for the maths and the parameter layout."""

    def __init__(self, cfg: CLTConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        n_layers, d, m = cfg.n_layers, cfg.d_model, cfg.d_sae
        gen = torch.Generator().manual_seed(seed)
        w_enc = torch.randn(n_layers, d, m, generator=gen)
        self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, m))
        decs = []
        for layer in range(n_layers):
            w = torch.randn(m, n_layers - layer, d, generator=gen)
            w /= w.flatten(1).norm(dim=1)[:, None, None]
            decs.append(nn.Parameter(w if cfg.unit_norm_decoder else w * RELU_DEC_INIT_NORM))
        self.W_dec = nn.ParameterList(decs)
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n_layers, m), math.log(cfg.jumprelu_threshold_init)))
        if cfg.architecture in BATCH_TOPK_FAMILY:
            # -1 = not estimated yet: eval falls back to per-token TopK until training has seen a batch.
            self.register_buffer("running_threshold", torch.full((n_layers,), -1.0))
            self.register_buffer("running_threshold_count", torch.zeros(n_layers))

    # ----------------------------------------------------------------------------------------- inference
    @property
    def threshold(self) -> Tensor | None:
        """(L, d_sae) JumpReLU thresholds (jumprelu, and batchtopk's per-layer ones broadcast), else None."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        if self.cfg.architecture in BATCH_TOPK_FAMILY and bool((self.running_threshold >= 0).all()):
            return self.running_threshold[:, None].expand(-1, self.cfg.d_sae)
        return None

    def layered(self, x: Tensor) -> Tensor:
        """(n, L * d_model) rows, or already (n, L, d_model), as (n, L, d_model)."""
        return x.reshape(x.shape[0], self.cfg.n_layers, self.cfg.d_model)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations (n, L, d_sae) of inputs (n, L, d_model)."""
        return torch.einsum("nld,ldm->nlm", self.layered(x), self.W_enc) + self.b_enc

    def activate(self, z: Tensor, layer: int | None = None) -> Tensor:
        """Features from pre-activations z (n, L, d_sae), or from one layer's (n, d_sae) when `layer` is given."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(z)
        if arch == "jumprelu":
            theta = self.log_threshold.exp() if layer is None else self.log_threshold[layer].exp()
            return _JumpReLU.apply(z, theta, self.cfg.jumprelu_bandwidth)
        if layer is not None:
            return self._activate_layer(z, layer)
        return torch.stack([self._activate_layer(z[:, j], j) for j in range(self.cfg.n_layers)], dim=1)

    def _activate_layer(self, z: Tensor, layer: int) -> Tensor:
        """TopK / BatchTopK of one layer's (n, d_sae) pre-activations."""
        if self.cfg.architecture in BATCH_TOPK_FAMILY:
            if self.training:
                return batch_topk(z, self.cfg.k)
            theta = self.running_threshold[layer]
            if float(theta) >= 0:
                return torch.relu(z) * (z > theta)
        return topk(z, self.cfg.k)

    def encode(self, x: Tensor) -> Tensor:
        """Features (n, L, d_sae) of inputs (n, L * d_model) or (n, L, d_model)."""
        return self.activate(self.pre_acts(x))

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """One layer's features (..., d_sae) from its input (..., d_model): what a replacement model runs."""
        return self.activate(x @ self.W_enc[layer] + self.b_enc[layer], layer)

    def decode(self, f: Tensor) -> Tensor:
        """Outputs (n, L, d_model) of features (n, L, d_sae): each layer's features write to it and later."""
        out = self.b_dec.expand(f.shape[0], -1, -1).clone()
        for layer, w in enumerate(self.W_dec):
            out[:, layer:] += torch.einsum("nm,mjd->njd", f[:, layer], w)
        return out

    def decode_layer(self, target: int, features: Sequence[Tensor]) -> Tensor:
        """Layer `target`'s output (..., d_model) from the features of layers 0..target (each (..., d_sae))."""
        out = self.b_dec[target]
        for layer in range(target + 1):
            out = out + features[layer] @ self.W_dec[layer][:, target - layer]
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(outputs (n, L, d_model), features (n, L, d_sae)) for inputs x."""
        f = self.encode(x)
        return self.decode(f), f

    # ------------------------------------------------------------------------------------------ training
    def training_loss(self, x_in: Tensor, x_out: Tensor, sparsity_scale: float = 1.0,
                      dead: Tensor | None = None, sparse: bool = True,
                      select_dtype: torch.dtype = torch.float32) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss on one batch of flattened rows (n, L * d_model) in normalised units, and detached statistics
        (rec, sparsity, aux, l0 summed over layers, fired (L * d_sae)). rec is the mean squared error per
        element, as for SAEs, so its coefficient means the same at any depth. `dead` (L * d_sae bool) marks
        features that AuxK trains on the residual; `sparse` and `select_dtype` are accepted for the trainer's
        sake: a CLT trains densely."""
        z = self.pre_acts(x_in)
        f = self.activate(z)
        y_hat = self.decode(f)
        rec = (y_hat.flatten(1) - x_out).pow(2).sum(-1).mean() / self.cfg.d_target
        sparsity = self._sparsity_loss(z, f) * (self.cfg.sparsity_coefficient * sparsity_scale)
        aux = self._auxk_loss(z, x_out - y_hat.flatten(1), dead)
        if self.cfg.architecture in BATCH_TOPK_FAMILY:
            self._update_running_thresholds(f.detach())
        active = f.detach() != 0
        stats = {"rec": rec.detach(), "sparsity": sparsity.detach(), "aux": aux.detach(),
                 "l0": active.sum((1, 2)).float().mean(), "fired": active.any(0).flatten()}
        return rec + sparsity + self.cfg.aux_k_coefficient * aux, stats

    def _auxk_loss(self, z: Tensor, residual: Tensor, dead: Tensor | None) -> Tensor:
        """Gao et al.'s AuxK, per layer: each layer's top-k_aux dead features (by pre-activation), decoded to
        every layer they write to, reconstruct the main model's residual over all layers. Normalised by the
        residual's variance, as for SAEs (`SparseAutoencoder._auxk_loss`)."""
        k_aux = self.cfg.aux_k_resolved
        if dead is None or k_aux == 0 or not bool(dead.any()):
            return z.new_zeros(())
        dead = dead.reshape(self.cfg.n_layers, self.cfg.d_sae)
        k_aux = min(k_aux, int(dead.sum(1).max()))
        vals, idx = z.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        f_aux = torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))  # relu(-inf) = 0 where too few are dead
        e = residual.detach()
        e_hat = (self.decode(f_aux) - self.b_dec).flatten(1)
        return (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)

    def decoder_norms(self) -> Tensor:
        """(L, d_sae) norm of each feature's whole decoder (every layer it writes to)."""
        return torch.stack([w.flatten(1).norm(dim=1) for w in self.W_dec])

    def _sparsity_loss(self, z: Tensor, f: Tensor) -> Tensor:
        arch = self.cfg.architecture
        if arch == "relu":
            return (f * self.decoder_norms()).sum((1, 2)).mean() / math.sqrt(self.cfg.d_model)
        if arch == "jumprelu":
            return _Step.apply(z, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth).sum((1, 2)).mean()
        return z.new_zeros(())

    @torch.no_grad()
    def _update_running_thresholds(self, f: Tensor) -> None:
        for layer in range(self.cfg.n_layers):
            kept = f[:, layer][f[:, layer] > 0]
            if kept.numel():
                update_running_threshold(self.running_threshold[layer], self.running_threshold_count[layer],
                                         kept.min())

    # ------------------------------------------------------------------------------ parameter surgery
    @torch.no_grad()
    def init_b_dec(self, x_out: Tensor) -> None:
        """Initialise each layer's b_dec from a sample of its targets (cfg.b_dec_init)."""
        y = self.layered(x_out).float()
        for layer in range(self.cfg.n_layers):
            if self.cfg.b_dec_init == "geometric_median":
                self.b_dec[layer] = geometric_median(y[:, layer])
            elif self.cfg.b_dec_init == "mean":
                self.b_dec[layer] = y[:, layer].double().mean(0).float()
            else:
                self.b_dec[layer] = 0

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project each feature's whole decoder back to unit norm (after each optimiser step)."""
        for w in self.W_dec:
            w /= w.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component that only changes a unit decoder's norm (as SAEs do)."""
        for w in self.W_dec:
            if w.grad is None:
                continue
            unit = w / w.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
            w.grad -= (w.grad * unit).sum((1, 2), keepdim=True) * unit

    @torch.no_grad()
    def fold_scale_(self, scale_in: float | Sequence[float], scale_out: float | Sequence[float]) -> None:
        """Make a CLT trained on per-layer scaled activations (s_in[l] * x_l -> s_out[l] * y_l) read and write
        raw ones: W_enc[l] *= s_in[l]; W_dec[l][:, j] /= s_out[l + j]; b_dec[l] /= s_out[l]. Features (and
        thresholds) keep their training units, since one feature writes to layers of different scales."""
        n_layers = self.cfg.n_layers
        s_in = torch.as_tensor(scale_in, dtype=torch.float32).expand(n_layers).to(self.b_dec.device)
        s_out = torch.as_tensor(scale_out, dtype=torch.float32).expand(n_layers).to(self.b_dec.device)
        self.W_enc *= s_in[:, None, None]
        self.b_dec /= s_out[:, None]
        for layer, w in enumerate(self.W_dec):
            w /= s_out[layer:][None, :, None]
