"""Layer-by-layer statistics of a store's residual stream and MLP neurons, from one streaming pass.

`layer_statistics(store)` reads every stored residual hook (`hook_resid_pre` / `hook_resid_post`) and every
`mlp.hook_post` hook block by block (row blocks aligned to the dask arrays' chunks; a block holds at most two
residual blocks at a time, so memory is bounded by the block size, not by the store) and reports:

- norm growth: the mean token L2 norm of each residual hook, in stream order;
- consecutive layers: for each pair of consecutive points of the residual stream, the mean cosine similarity of
  the same token's two vectors and the mean norm of the update between them (the blocks' contribution);
- massive activations: per residual hook, the top entries by |x| (dimension, token row / token_id / position,
  value, ratio to the token's median |x|) and per-dimension counts of |x| > 100 and of "massive" entries
  (|x| > 100 and > 1000 x the token's median |x|, the criterion of `actstore.workers.stats`);
- MLP sparsity: per `mlp.hook_post` hook, the fraction of entries > 0 and the fraction of dead neurons
  (never > 0 on any counted token).

Stream points: TransformerLens defines `blocks.{i}.hook_resid_pre` as the same tensor as
`blocks.{i-1}.hook_resid_post`, so when both are stored the pre hook is not a separate point of the chain (its
norm is still reported). An update therefore is `resid_post[i] - resid_post[i-1]`, or `resid_post[i] -
resid_pre[i]` when layer i-1 is not stored; with gaps it spans several blocks (listed in `blocks`).

Special tokens (BOS/CLS/SEP/padding) are excluded unless `exclude_special=False`. Sums run in float64 per
block and partial results merge in block order, so the result does not depend on thread timing. The returned
dict holds only lists, ints, floats (non-finite ones as None) and strings: `to_json` writes it.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from actstore.schemas.hooks import parse_hook
from actstore.workers.layer_stats import (
    LayerPlan,
    PairAcc,
    Partial,
    ResidAcc,
    blocks_spanned,
    pair_block,
    plan_layers,
    resid_block,
)
from actstore.workers.stats import MASSIVE_ABS, MASSIVE_RATIO

_BLOCK_ELEMS = 1 << 22  # default block: ~4M entries of the widest hook (32 MiB as float64)


# --------------------------------------------------------------------------------------------------------------
# The streaming pass
# --------------------------------------------------------------------------------------------------------------


def row_blocks(chunks: tuple[int, ...], target: int) -> list[tuple[int, int]]:
    """Group consecutive chunks into [start, stop) row blocks of at least `target` rows."""
    out, start, stop = [], 0, 0
    for c in chunks:
        stop += int(c)
        if stop - start >= target:
            out.append((start, stop))
            start = stop
    if stop > start:
        out.append((start, stop))
    return out


def _read(arr: Any, start: int, stop: int, keep: np.ndarray) -> np.ndarray:
    """Rows [start, stop) of a hook restricted to `keep`, as stored (float16/float32)."""
    x = np.asarray(arr[start:stop].compute(scheduler="sync"))
    return x if keep.all() else x[keep]


def block_partial(arrs: dict[str, Any], plan: LayerPlan, start: int, stop: int, keep: np.ndarray,
                  k: int) -> Partial:
    """One row block over all hooks, holding at most two residual blocks at a time."""
    rows = start + np.flatnonzero(keep)
    part = Partial(n=int(keep.sum()))
    prev: tuple[str, np.ndarray, np.ndarray] | None = None
    chain = set(plan.chain)
    for h in plan.resid:
        x = _read(arrs[h], start, stop, keep).astype(np.float64)  # float64 sums, as workers.stats does
        part.resid[h], norms = resid_block(x, rows, k)
        if h in chain:
            if prev is not None:
                part.pairs[(prev[0], h)] = pair_block(prev[1], prev[2], x, norms)
            prev = (h, x, norms)
    for h in plan.mlp:
        part.fire[h] = (_read(arrs[h], start, stop, keep) > 0).sum(axis=0).astype(np.int64)
    return part


def _stream(store: Any, plan: LayerPlan, keep: np.ndarray, k: int, block_rows: int | None,
            workers: int) -> Partial:
    hooks = plan.resid + plan.mlp
    arrs = {h: store.activations(h) for h in hooks}
    ref = arrs[hooks[0]]
    target = block_rows or max(1, _BLOCK_ELEMS // max(a.shape[1] for a in arrs.values()))
    blocks = row_blocks(ref.chunks[0], target)

    def run(b: tuple[int, int]) -> Partial:
        return block_partial(arrs, plan, b[0], b[1], keep[b[0]:b[1]], k)

    total = Partial()
    # Threads, not processes: numpy and the zarr codecs release the GIL. map() keeps block order, so the merge
    # order (and every float sum) is the same on every run.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for part in pool.map(run, blocks):
            total = total.merge(part)
    return total


# --------------------------------------------------------------------------------------------------------------
# Public entry point and the JSON-able result
# --------------------------------------------------------------------------------------------------------------


def layer_statistics(store: Any, exclude_special: bool = True, massive_top: int = 10,
                     hooks: list[str] | None = None, block_rows: int | None = None,
                     workers: int | None = None) -> dict[str, Any]:
    """Norm growth, consecutive-layer cosine and update norms, massive activations and MLP sparsity.

    `store` is a Store or URL; `hooks` restricts the hooks read (default: every residual and mlp.hook_post
    hook); `block_rows` overrides the rows per streamed block; `workers` threads read blocks concurrently.
    """
    if isinstance(store, (str, os.PathLike)):
        from actstore.pipeline.store.store import open_store

        store = open_store(str(store))
    plan = plan_layers([h for h in (hooks or store.hooks) if not h.startswith("module:")])
    tokens = store.tokens() if store.n_tokens else None
    special = _column(tokens, "special", bool, store.n_tokens)
    keep = ~special if exclude_special else np.ones(store.n_tokens, bool)
    out = {"n_tokens": int(keep.sum()), "n_excluded": int((~keep).sum()), "exclude_special": exclude_special,
           "massive_abs": MASSIVE_ABS, "massive_ratio": MASSIVE_RATIO}
    if (not plan.resid and not plan.mlp) or not store.n_tokens:
        return _clean({**out, "residual": [], "consecutive": [], "massive": [], "mlp": []})
    total = _stream(store, plan, keep, massive_top, block_rows, workers or min(4, os.cpu_count() or 1))
    return _clean({**out, **_summarise(store, plan, total, tokens)})


def _column(tokens: Any, name: str, dtype: Any, n: int) -> np.ndarray:
    if tokens is None or name not in tokens.column_names:
        return np.zeros(n, dtype)
    return tokens.column(name).to_numpy(zero_copy_only=False).astype(dtype)


def _summarise(store: Any, plan: LayerPlan, total: Partial, tokens: Any) -> dict[str, Any]:
    n = max(total.n, 1)
    residual: list[dict[str, Any]] = []
    for h in plan.resid:
        mean_norm = total.resid[h].norm_sum / n if total.n else math.nan
        prev = residual[-1]["mean_norm"] if residual else None
        spec = parse_hook(h)
        residual.append({"hook": h, "layer": spec.layer, "kind": spec.kind, "d": store.manifest.hook(h).d,
                         "mean_norm": mean_norm, "growth": mean_norm / prev if prev else None})
    return {
        "residual": residual,
        "consecutive": [_pair_row(a, b, total.pairs[(a, b)]) for a, b in plan.pairs],
        "massive": [_massive_row(h, total.resid[h], tokens) for h in plan.resid],
        "mlp": [_mlp_row(h, total.fire[h], total.n) for h in plan.mlp],
    }


def _div(a: float, b: int) -> float:
    return a / b if b else math.nan


def _pair_row(a: str, b: str, acc: PairAcc) -> dict[str, Any]:
    return {"from": a, "to": b, "layer": parse_hook(b).layer, "blocks": blocks_spanned(a, b),
            "mean_cosine": _div(acc.cos_sum, acc.cos_n), "mean_update_norm": _div(acc.upd_sum, acc.n),
            "mean_relative_update": _div(acc.rel_sum, acc.rel_n)}


def _massive_row(h: str, acc: ResidAcc, tokens: Any) -> dict[str, Any]:
    n_rows = 0 if tokens is None else tokens.num_rows
    top = []
    for r, c, v, q in zip(acc.top.row, acc.top.dim, acc.top.value, acc.top.ratio):
        tok = {k: (tokens.column(k)[int(r)].as_py() if tokens is not None and k in tokens.column_names
                   and r < n_rows else None) for k in ("token_id", "position", "doc_id")}
        top.append({"dim": int(c), "row": int(r), **tok, "value": float(v), "ratio_to_median": float(q)})
    dims = np.flatnonzero((acc.big > 0) | (acc.massive > 0))
    dims = dims[np.lexsort((dims, -acc.big[dims], -acc.massive[dims]))]
    return {"hook": h, "layer": parse_hook(h).layer, "n_massive": int(acc.massive.sum()),
            "n_above_abs": int(acc.big.sum()), "max_abs": float(abs(acc.top.value[0])) if len(acc.top.value) else None,
            "top": top, "dims": [{"dim": int(d), "n_massive": int(acc.massive[d]), "n_above_abs": int(acc.big[d])}
                                 for d in dims]}


def _mlp_row(h: str, fire: np.ndarray, n: int) -> dict[str, Any]:
    return {"hook": h, "layer": parse_hook(h).layer, "d": int(fire.shape[0]),
            "fraction_positive": _div(float(fire.sum()), n * fire.shape[0]),
            "mean_active_neurons": _div(float(fire.sum()), n),
            "dead_fraction": float((fire == 0).mean()) if n else math.nan,
            "n_dead": int((fire == 0).sum())}


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null; numpy scalars become Python numbers."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


def to_json(stats: dict[str, Any], path: str | os.PathLike | None = None, indent: int | None = 1,
            storage_options: dict[str, Any] | None = None) -> str:
    """`layer_statistics` output as JSON text (NaN/inf as null); also written (atomically) to `path` when given,
    a local path or fsspec URL."""
    text = json.dumps(_clean(stats), indent=indent)
    if path is not None:
        from actstore.pipeline.analysis.results import Output

        folder, _, name = str(path).rstrip("/").rpartition("/")
        Output(folder or ".", storage_options).put_bytes(name, (text + "\n").encode())
    return text

