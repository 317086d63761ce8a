"""Probes on stored activations: pooling tokens into documents, document-level splits, and probe training.

What runs inside a worker (pure numpy + torch; ``actstore.pipeline`` reads the store and calls these):

- ``pool`` / ``PoolAccumulator`` reduce token rows to one vector per document (mean, last or max over the
  document's non-special tokens). The accumulator takes the rows chunk by chunk (e.g. one dask block at a
  time), because a document may straddle chunk boundaries.
- ``split_by_document`` assigns whole documents to train/val/test, stratified by label where possible. Probes are
  never split by token: tokens of one document are strongly correlated, and a token split leaks the test set.
- ``train_probe_arrays`` fits a logistic-regression probe (full-batch L-BFGS in float64, L2 penalty chosen on the
  validation split) or a one-hidden-layer MLP (AdamW, early stopping on validation loss) and reports test-split
  metrics from ``actstore.workers.probe_metrics`` (AUROC, accuracy, F1, recall at 1% / 5% FPR, ...).

Rows of ``X`` may be documents (after pooling) or tokens (token-level probing); either way the split is by the
``doc_ids`` given per row. Labels may be bools, ints or strings: they are mapped to class indices in sorted order
and the mapping is kept in ``ProbeResult.classes``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from actstore.schemas.errors import AnalysisError, ConfigError
from actstore.schemas.probe import ProbeConfig
from actstore.workers.probe_metrics import binary_metrics, multiclass_metrics
from actstore.workers.threads import torch_threads

PoolHow = Literal["mean", "last", "max"]
SPLITS = ("train", "val", "test")
_POOL_HOWS = ("mean", "last", "max")


# ----------------------------------------------------------------------------------------------- pooling


def _check_pool_inputs(acts: Any, doc_ids: Any, special_mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    acts, doc_ids = np.asarray(acts), np.asarray(doc_ids).reshape(-1)
    if acts.ndim != 2:
        raise AnalysisError(f"acts: expected a 2-D (n_tokens, d) array, got shape {acts.shape}")
    if len(doc_ids) != len(acts):
        raise AnalysisError(f"doc_ids: length {len(doc_ids)} != {len(acts)} activation rows")
    if special_mask is None:
        return acts, doc_ids, np.ones(len(acts), dtype=bool)
    special = np.asarray(special_mask, dtype=bool).reshape(-1)
    if len(special) != len(acts):
        raise AnalysisError(f"special_mask: length {len(special)} != {len(acts)} activation rows")
    return acts, doc_ids, ~special


def _group_order(docs: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """Permutation sorting by (doc, row); None when already sorted (the common case: rows in store order)."""
    if len(docs) < 2 or np.all((docs[1:] > docs[:-1]) | ((docs[1:] == docs[:-1]) & (rows[1:] > rows[:-1]))):
        return None
    return np.lexsort((rows, docs))


def _reduce_groups(docs: np.ndarray, values: np.ndarray, counts: np.ndarray, rows: np.ndarray,
                   how: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge rows that share a doc id: sums add, maxima take the max, 'last' keeps the highest row index.

    Works on raw token rows (count 1, row = global row index) and on earlier partial results alike, which is
    what lets documents straddle chunks.
    """
    order = _group_order(docs, rows)
    if order is not None:
        docs, values, counts, rows = docs[order], values[order], counts[order], rows[order]
    starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
    ends = np.r_[starts[1:], len(docs)] - 1
    if how == "mean":
        # Accumulate in float64 without first copying the whole chunk to float64.
        red = np.add.reduceat(values, starts, axis=0, dtype=np.float64)
    elif how == "max":
        red = np.maximum.reduceat(values, starts, axis=0)
    else:
        red = values[ends]
    return docs[starts], red, np.add.reduceat(counts, starts), rows[ends]


class PoolAccumulator:
    """Streaming per-document pooling over chunks of token rows given in store order.

    ``update`` reduces each chunk to per-document partials right away, so memory stays O(documents x d) however
    many tokens pass through; partials of a document that spans chunks are merged on the way.
    Documents whose tokens are all special are absent from the result (there is nothing to pool).
    """

    def __init__(self, how: PoolHow = "mean") -> None:
        if how not in _POOL_HOWS:
            raise ConfigError(f"how: must be one of {_POOL_HOWS} (got {how!r})")
        self.how = how
        self._rows_seen = 0
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._compacted_rows = 0
        self._dtype: np.dtype | None = None
        self._width = 0

    def update(self, acts: Any, doc_ids: Any, special_mask: Any = None) -> None:
        """Add the next chunk: acts (n, d), doc_ids (n,), special_mask (n,) True for tokens to exclude."""
        acts, doc_ids, keep = _check_pool_inputs(acts, doc_ids, special_mask)
        rows = np.arange(self._rows_seen, self._rows_seen + len(acts), dtype=np.int64)
        self._rows_seen += len(acts)
        self._width = acts.shape[1]
        # float16 in, float32 out: the pooled vectors are training inputs, not storage.
        dt = np.result_type(acts.dtype, np.float32)
        self._dtype = dt if self._dtype is None else np.result_type(self._dtype, dt)
        if not keep.all():
            acts, doc_ids, rows = acts[keep], doc_ids[keep], rows[keep]
        if len(acts) == 0:
            return
        ones = np.ones(len(acts), dtype=np.int64)
        self._parts.append(_reduce_groups(doc_ids.astype(np.int64, copy=False), acts, ones, rows, self.how))
        # Merge partials once they outgrow the last merged state: amortised linear time, bounded memory.
        if sum(len(p[0]) for p in self._parts) > 2 * self._compacted_rows + 4096:
            self._compact()

    def _compact(self) -> None:
        if len(self._parts) > 1:
            ids, acts, ones, rows = (np.concatenate(arrs) for arrs in zip(*self._parts, strict=True))
            self._parts = [_reduce_groups(ids, acts, ones, rows, self.how)]
        self._compacted_rows = len(self._parts[0][0]) if self._parts else 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(doc_ids ascending (n_docs,), pooled (n_docs, d)) for the documents seen so far."""
        self._compact()
        if not self._parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self._width), dtype=self._dtype or np.float32)
        docs, values, counts, _ = self._parts[0]
        if self.how == "mean":
            values = values / counts[:, None]
        return docs.copy(), values.astype(self._dtype, copy=False)


def pool(acts: np.ndarray, doc_ids: Any, special_mask: Any = None,
         how: PoolHow = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Pool token activations (n_tokens, d) into one row per document over its non-special tokens.

    ``how``: "mean", "max" (element-wise) or "last" (the document's last non-special token in row order, which
    is position order in a store). Rows may come in any order; documents need not be contiguous. Returns
    (unique doc ids ascending, pooled (n_docs, d)); documents with only special tokens are left out.
    """
    acc = PoolAccumulator(how)
    acc.update(acts, doc_ids, special_mask)
    return acc.result()


# ----------------------------------------------------------------------------------------------- splits


def _apportion(n: int, fractions: Sequence[float]) -> np.ndarray:
    """Split n items by fractions (largest remainder), giving every positive-fraction split >= 1 if n allows."""
    f = np.asarray(fractions, dtype=np.float64)
    exact = n * f / f.sum()
    counts = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]
    counts[extra] += 1
    for i in np.flatnonzero((f > 0) & (counts == 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _doc_strata(inverse: np.ndarray, n_docs: int, labels: Any, n_splits: int) -> np.ndarray:
    """Stratum per document: its label's index; classes too rare to reach every split share one stratum.

    All zeros (no stratification) without labels or when a document carries more than one label.
    """
    if labels is None:
        return np.zeros(n_docs, dtype=np.int64)
    codes = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)[1].reshape(-1)
    if len(codes) != len(inverse):
        raise AnalysisError(f"labels: length {len(codes)} != doc_ids length {len(inverse)}")
    per_doc = np.zeros(n_docs, dtype=np.int64)
    per_doc[inverse] = codes
    if not np.array_equal(per_doc[inverse], codes):
        return np.zeros(n_docs, dtype=np.int64)
    sizes = np.bincount(per_doc)
    return np.where(sizes[per_doc] >= n_splits, per_doc, -1)


def split_by_document(doc_ids: Any, seed: int, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                      labels: Any = None) -> dict[str, np.ndarray]:
    """Assign each distinct document to "train", "val" or "test"; returns sorted doc-id arrays per split.

    ``doc_ids`` may repeat (one per token row). With ``labels`` (aligned with ``doc_ids``, one label per
    document) each class is split in the given proportions separately, so every split sees every class that has
    enough documents; rarer classes are pooled into one shared stratum. Deterministic for a given seed.
    """
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or sum(fractions) <= 0:
        raise ConfigError(f"fractions: need (train > 0, val >= 0, test >= 0), got {tuple(fractions)}")
    docs, inverse = np.unique(np.asarray(doc_ids).reshape(-1), return_inverse=True)
    n_splits = sum(f > 0 for f in fractions)
    strata = _doc_strata(inverse.reshape(-1), len(docs), labels, n_splits)
    rng = np.random.default_rng(seed)
    assign = np.empty(len(docs), dtype=np.int64)
    for s in np.unique(strata):  # sorted, so the rng is consumed in a fixed order
        members = rng.permutation(np.flatnonzero(strata == s))
        assign[members] = np.repeat(np.arange(3), _apportion(len(members), fractions))
    return {name: docs[assign == i] for i, name in enumerate(SPLITS)}


# ----------------------------------------------------------------------------------------------- config


# ----------------------------------------------------------------------------------------------- models


class Standardize(nn.Module):
    """(x - mean) / std with train-split statistics, so the probe reads raw activations."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _standardizer(x_train: Tensor, enabled: bool) -> Standardize:
    d = x_train.shape[1]
    if not enabled:
        return Standardize(x_train.new_zeros(d), x_train.new_ones(d))
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False)
    # Constant features (dead neurons, padding dims) would divide by ~0; leave them unscaled.
    return Standardize(mean, torch.where(std > 1e-8 * (1 + mean.abs()), std, torch.ones_like(std)))


def _loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy: one logit column = binary (logit of class 1), else softmax over the columns."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype))
    return F.cross_entropy(logits, y)


def _fit_lbfgs(lin: nn.Linear, x: Tensor, y: Tensor, l2: float, max_iter: int) -> None:
    """Minimise mean CE + 0.5 * l2 * ||W||^2 in place (convex, so the start only affects speed)."""
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _loss(lin(x), y) + 0.5 * l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)


def _train_logistic(data: dict[str, tuple[Tensor, Tensor]], n_out: int,
                    cfg: ProbeConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Fit every l2 on the (standardised) train split, keep the one with the lowest validation loss."""
    x_tr, y_tr = data["train"]
    sel_x, sel_y = data["val"] if len(data["val"][1]) else data["train"]
    std = _standardizer(x_tr, cfg.standardize)
    z_tr, z_sel = std(x_tr), std(sel_x)
    lin = nn.Linear(x_tr.shape[1], n_out, dtype=torch.float64, device=x_tr.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    best: tuple[float, float, dict[str, Tensor]] | None = None
    for l2 in cfg.l2_grid:
        _fit_lbfgs(lin, z_tr, y_tr, l2, cfg.max_iter)
        with torch.no_grad():
            sel_loss = float(_loss(lin(z_sel), sel_y))
        if best is None or sel_loss < best[0]:
            best = (sel_loss, l2, copy.deepcopy(lin.state_dict()))
    assert best is not None  # the l2 grid is never empty (ProbeConfig checks it)
    lin.load_state_dict(best[2])
    return nn.Sequential(std, lin), {"l2": best[1], "selection_loss": best[0]}


def _train_mlp(data: dict[str, tuple[Tensor, Tensor]], n_out: int,
               cfg: ProbeConfig) -> tuple[nn.Module, dict[str, Any]]:
    """One hidden layer (GELU), AdamW on minibatches, early stopping on the validation loss."""
    x_tr, y_tr = data["train"]
    sel_x, sel_y = data["val"] if len(data["val"][1]) else data["train"]
    std = _standardizer(x_tr, cfg.standardize)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's global RNG
        torch.manual_seed(cfg.seed)
        net = nn.Sequential(std, nn.Linear(x_tr.shape[1], cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, n_out))
    net = net.to(x_tr.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state, best_epoch, epoch = math.inf, copy.deepcopy(net.state_dict()), -1, -1
    for epoch in range(cfg.epochs):
        for idx in torch.randperm(len(y_tr), generator=gen).split(cfg.batch_size):
            idx = idx.to(x_tr.device)
            opt.zero_grad()
            _loss(net(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        with torch.no_grad():
            sel_loss = float(_loss(net(sel_x), sel_y))
        if sel_loss < best_loss:
            best_loss, best_state, best_epoch = sel_loss, copy.deepcopy(net.state_dict()), epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    net.load_state_dict(best_state)
    return net, {"best_epoch": best_epoch, "epochs_run": epoch + 1, "selection_loss": best_loss}


# ----------------------------------------------------------------------------------------------- results


def _predict_logits(model: nn.Module, x: Any, chunk: int = 65536) -> Tensor:
    """Logits for raw rows, in chunks (bounded memory), cast to the model's device and dtype."""
    p = next(model.parameters())
    x = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if x.ndim != 2:
        raise AnalysisError(f"x: expected a 2-D (n, d) array, got shape {tuple(x.shape)}")
    model.eval()
    with torch.no_grad():
        # max(.., 1): an empty input still yields a (0, n_out) result with the right width.
        return torch.cat([model(x[i:i + chunk].to(device=p.device, dtype=p.dtype))
                          for i in range(0, max(len(x), 1), chunk)])


def _logits_to_proba(logits: Tensor) -> np.ndarray:
    """(n, K) class probabilities; a single binary logit becomes [1 - p, p]."""
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p1, p1], dim=1).double().cpu().numpy()
    return torch.softmax(logits.double(), dim=1).cpu().numpy()


@dataclass
class ProbeResult:
    """A trained probe and its document-level evaluation."""

    model: nn.Module
    """Raw features -> logits (standardisation included; float64 for logistic, float32 for MLP). Binary: 1 column,
    the logit of classes[1]; else K columns. `predict_proba` casts inputs, so prefer it over calling this."""
    classes: np.ndarray
    """Original labels by class index (sorted; for binary tasks classes[1] is the positive class)."""
    metrics: dict[str, float]
    """Test split: binary_metrics / multiclass_metrics plus log_loss, n_docs."""
    val_metrics: dict[str, float]
    """Validation split, same keys (empty when the config has no validation fraction)."""
    train_metrics: dict[str, float]
    """Train split, same keys (compare with `metrics` to see over-fitting)."""
    split: dict[str, np.ndarray]
    """Document ids per split: "train", "val", "test" (disjoint)."""
    config: ProbeConfig
    """The configuration used."""
    info: dict[str, Any] = field(default_factory=dict)
    """Training details: chosen l2 / best epoch, selection loss, n_features, n_rows per split."""

    def predict_proba(self, x: Any) -> np.ndarray:
        """(n, n_classes) probabilities for raw feature rows (numpy or torch; any float dtype)."""
        return _logits_to_proba(_predict_logits(self.model, x))

    def predict(self, x: Any) -> np.ndarray:
        """Predicted original labels (binary: P(classes[1]) >= config.threshold; else argmax)."""
        proba = self.predict_proba(x)
        if len(self.classes) == 2:
            return self.classes[(proba[:, 1] >= self.config.threshold).astype(np.int64)]
        return self.classes[proba.argmax(axis=1)]


def _encode_labels(y: np.ndarray, positive_label: Any) -> tuple[np.ndarray, np.ndarray]:
    """(classes, class index per row); refuses missing labels, which must be dropped by the caller."""
    if y.dtype == object and any(v is None or (isinstance(v, float) and math.isnan(v)) for v in y):
        raise AnalysisError("y: missing labels (None/NaN); drop those documents before training")
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise AnalysisError("y: missing labels (NaN); drop those documents before training")
    classes, idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise AnalysisError(f"y: need at least 2 classes, got {classes.tolist()}")
    if positive_label is not None:
        if len(classes) != 2 or positive_label not in classes.tolist():
            raise ConfigError(f"ProbeConfig.positive_label: {positive_label!r} is not one of two labels "
                             f"{classes.tolist()}")
        if classes[0] == positive_label:
            classes, idx = classes[::-1].copy(), 1 - idx
    return classes, idx.reshape(-1).astype(np.int64)


def _evaluate(result_model: nn.Module, x: Tensor, y: np.ndarray, docs: np.ndarray, n_classes: int,
              threshold: float) -> dict[str, float]:
    if len(y) == 0:
        return {}
    proba = _logits_to_proba(_predict_logits(result_model, x))
    if n_classes == 2:
        out = binary_metrics(y == 1, proba[:, 1], threshold)
    else:
        out = multiclass_metrics(y, proba)
    out["log_loss"] = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))))
    out["n_docs"] = float(len(docs))
    return out


def train_probe_arrays(x: Any, y: Any, doc_ids: Any = None, cfg: ProbeConfig | None = None) -> ProbeResult:
    """Train and evaluate a probe on rows ``x`` (n, d) with labels ``y`` (n,), split by ``doc_ids`` (n,).

    Rows are documents (pooled) or tokens; ``doc_ids=None`` treats every row as its own document. Metrics are
    computed per row on the test documents; the l2 value / early-stopping epoch is chosen on validation.
    """
    cfg = cfg or ProbeConfig()
    with torch_threads(cfg.threads):
        return _train_probe_arrays(x, y, doc_ids, cfg)


def _train_probe_arrays(x: Any, y: Any, doc_ids: Any, cfg: ProbeConfig) -> ProbeResult:
    x_np = np.asarray(x)
    y_np = np.asarray(y).reshape(-1)
    ids = np.arange(len(x_np)) if doc_ids is None else np.asarray(doc_ids).reshape(-1)
    if x_np.ndim != 2 or not (len(x_np) == len(y_np) == len(ids)):
        raise AnalysisError(f"x, y, doc_ids: need x (n, d) and y, doc_ids (n,), got {x_np.shape}, "
                         f"{y_np.shape}, {ids.shape}")
    classes, y_idx = _encode_labels(y_np, cfg.positive_label)
    split = split_by_document(ids, cfg.seed, cfg.fractions, labels=y_np if cfg.stratify else None)
    rows = {name: np.flatnonzero(np.isin(ids, split[name])) for name in SPLITS}
    if len(np.unique(y_idx[rows["train"]])) < 2:
        raise AnalysisError("y: the train split holds a single class; more documents per class are needed")
    dtype = torch.float64 if cfg.kind == "logistic" else torch.float32
    data = {name: (torch.as_tensor(x_np[r], dtype=dtype, device=cfg.device),
                   torch.as_tensor(y_idx[r], device=cfg.device)) for name, r in rows.items()}
    n_out = 1 if len(classes) == 2 else len(classes)
    train = _train_logistic if cfg.kind == "logistic" else _train_mlp
    model, info = train(data, n_out, cfg)
    info.update(n_features=int(x_np.shape[1]), **{f"n_rows_{k}": len(r) for k, r in rows.items()})
    evals = {name: _evaluate(model, data[name][0], y_idx[rows[name]], split[name], len(classes), cfg.threshold)
             for name in SPLITS}
    return ProbeResult(model=model, classes=classes, metrics=evals["test"], val_metrics=evals["val"],
                       train_metrics=evals["train"], split=split, config=cfg, info=info)
