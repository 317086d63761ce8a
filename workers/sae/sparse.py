"""Sparse kernels of TopK/BatchTopK training: choose each token's active latents, then work on those entries only.

`SparseAutoencoder.training_loss` runs one dense GEMM (the encoder pre-activations needed to choose the active
latents) and then touches only the chosen (token, latent) entries, the way eai-sparsify does: the decoder is an
`embedding_bag` over the active rows of W_dec, and `EncodeSelected` gives the encoder a backward that scatters each
entry's gradient into its W_enc column (a sparse (d_sae, n) x (n, d_in) product) instead of the dense x.T @ dz.
The results equal the dense computation up to float rounding (tested).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor


def topk(z: Tensor, k: int) -> Tensor:
    """Per-token TopK followed by ReLU (a selected latent with a negative pre-activation stays off)."""
    vals, idx = z.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))


def batch_topk(z: Tensor, k: int) -> Tensor:
    """Keep the k * n_tokens largest ReLU'd pre-activations over the whole batch."""
    flat = torch.relu(z).reshape(-1)
    n_keep = min(k * (z.numel() // z.shape[-1]), flat.numel())
    vals, idx = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).reshape(z.shape)


# ------------------------------------------------------------------------------------ sparse training path
class Selection(NamedTuple):
    """Chosen (token, latent) entries, grouped by token in the order `F.embedding_bag` wants."""

    idx: Tensor  # (E,) int64 latent of each entry
    tok: Tensor  # (E,) int64 token of each entry
    offsets: Tensor  # (n,) position in idx of each token's first entry (bag offsets)
    vals: Tensor  # (E,) the entry's pre-activation as computed by the selection GEMM


def select_preacts(enc_in: Tensor, w_enc: Tensor, b_enc: Tensor, dtype: torch.dtype) -> Tensor:
    """Dense pre-activations used only to choose latents; bfloat16 halves the one big GEMM's cost on CPUs
    with native bf16 dot products (the chosen entries' values are recomputed in float32 afterwards)."""
    if dtype == torch.float32:
        return torch.addmm(b_enc, enc_in, w_enc)
    return torch.addmm(b_enc.to(dtype), enc_in.to(dtype), w_enc.to(dtype))


def _uniform(idx: Tensor, vals: Tensor) -> Selection:
    """Selection with the same number of entries (idx.shape[1]) for every token."""
    n, k = idx.shape
    dev = idx.device
    return Selection(idx.reshape(-1), torch.arange(n, device=dev).repeat_interleave(k),
                      torch.arange(0, n * k, k, device=dev), vals.reshape(-1))


def select_topk(z: Tensor, k: int) -> Selection:
    """The k largest pre-activations of each token (same rule as `topk`, ReLU applied later)."""
    vals, idx = z.topk(k, dim=-1, sorted=False)
    return _uniform(idx, vals)


def select_batch_topk(z: Tensor, k: int) -> Selection:
    """The k * n largest pre-activations of the batch (the entries `batch_topk` keeps), without a top-k
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
    return Selection(idx, tok, torch.cumsum(counts, 0) - counts, top_vals)


def select_dead(z: Tensor, dead: Tensor | None, k_aux: int) -> Selection | None:
    """AuxK: each token's top-k_aux pre-activations among dead latents (None when AuxK is off or none is
    dead). Only the dead columns are gathered, so few dead latents cost little."""
    if dead is None or k_aux == 0:
        return None
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return None
    vals, local = z.index_select(1, dead_idx).topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
    return _uniform(dead_idx[local], vals)


def concat_selections(a: Selection, b: Selection) -> Selection:
    return Selection(torch.cat([a.idx, b.idx]), torch.cat([a.tok, b.tok]),
                      torch.cat([a.offsets, b.offsets + a.idx.shape[0]]), torch.cat([a.vals, b.vals]))


def sampled_dot(rows: Tensor, table: Tensor, idx: Tensor, tok: Tensor, offsets: Tensor) -> Tensor:
    """out[e] = rows[tok[e]] . table[idx[e]] without materialising the (E, d) gathered rows.

    This is embedding_bag's per-sample-weight gradient kernel (the same dot products), which torch exposes
    only as an aten op; tests check it against the explicit formula."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(rows, table, idx, offsets, tok, 0)


def scatter_rows(idx: Tensor, tok: Tensor, weight: Tensor, rows: Tensor, n_out: int) -> Tensor:
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


class EncodeSelected(torch.autograd.Function):
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
            vals = sampled_dot(enc_in, w_enc.t().contiguous(), idx, tok, offsets) + b_enc[idx]
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
        g_w_enc = scatter_rows(idx, tok, grad, enc_in, d_sae).t() if ctx.needs_input_grad[1] else None
        g_b_dec = -(w_enc @ g_b_enc) if ctx.has_b_dec and ctx.needs_input_grad[3] else None
        return None, g_w_enc, g_b_enc, g_b_dec, None, None, None, None, None
