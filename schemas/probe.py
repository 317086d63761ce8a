"""Configuration of probe training, one documented field each (a pydantic dataclass: validated on construction,
nested in `ProbeJob`, and the source of the `actstore train probe` flags). Nothing here imports torch."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from actstore.schemas.errors import ConfigError
from actstore.schemas.validation import one_line_errors

_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, arbitrary_types_allowed=True)


@one_line_errors
@dataclass(config=_CONFIG)
class ProbeConfig:
    """How to train a probe. Defaults suit a few hundred to a few hundred thousand rows of d <= ~8k."""

    kind: Literal["logistic", "mlp"] = "logistic"
    """'logistic': linear probe (sigmoid / softmax) fit by full-batch L-BFGS; 'mlp': one hidden layer, AdamW."""
    hidden: int = 128
    """MLP hidden width (ignored by the logistic probe)."""
    l2: float | tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """Logistic: penalty 0.5 * l2 * ||W||^2 added to the mean cross-entropy (bias unpenalised, features
    standardised). A tuple is a grid: every value is fit (warm-started from strong to weak) and the one with
    the lowest validation loss is kept, so the test split never influences the choice."""
    weight_decay: float = 1e-4
    """MLP: AdamW decoupled weight decay."""
    lr: float = 1e-3
    """MLP: AdamW learning rate (L-BFGS uses a strong-Wolfe line search and needs none)."""
    max_iter: int = 500
    """Logistic: L-BFGS iteration cap per l2 value."""
    epochs: int = 300
    """MLP: maximum number of epochs."""
    batch_size: int = 128
    """MLP: rows per AdamW step."""
    patience: int = 30
    """MLP: stop after this many epochs without a lower validation loss; the best epoch's weights are kept."""
    seed: int = 0
    """Seeds the document split and the MLP initialisation and shuffling (L-BFGS itself is deterministic)."""
    standardize: bool = True
    """z-score features with the train split's mean / std (folded into the returned model as its first layer)."""
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Fractions of documents for train / val / test (val may be 0: then model selection uses the train loss)."""
    stratify: bool = True
    """Stratify the document split by label (when every document has a single label)."""
    threshold: float = 0.5
    """Binary: predicted positive when P(positive) >= threshold (accuracy, F1, precision, recall)."""
    positive_label: Any = None
    """Binary: the label of the positive class; None = the larger of the two sorted labels (True, 1, 'yes' > 'no')."""
    device: str = "cpu"
    """torch device to train on."""
    multiclass: bool = False
    """Allow labels with more than two classes (softmax probe, macro-averaged metrics). Off by default so that a
    label column with stray values fails loudly instead of silently training a multiclass probe."""
    threads: int | None = None
    """torch intra-op threads while training (restored afterwards); None = leave torch's setting alone. Probe
    matrices are small, so on a busy machine 1 thread is often fastest (idle OpenMP threads spin-wait)."""

    def __post_init__(self) -> None:
        if self.kind not in ("logistic", "mlp"):
            raise ConfigError(f"ProbeConfig.kind: must be 'logistic' or 'mlp' (got {self.kind!r})")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"ProbeConfig.threads: must be >= 1 or None (got {self.threads!r})")
        for name in ("hidden", "max_iter", "epochs", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ProbeConfig.{name}: must be >= 1 (got {getattr(self, name)!r})")
        grid = self.l2 if isinstance(self.l2, tuple | list) else (self.l2,)
        if not grid or any(not (v >= 0) for v in grid):
            raise ConfigError(f"ProbeConfig.l2: must be a non-negative number or a non-empty tuple (got {self.l2!r})")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"ProbeConfig.lr / weight_decay: need lr > 0 and weight_decay >= 0 "
                             f"(got {self.lr!r}, {self.weight_decay!r})")
        f = tuple(self.fractions)
        if len(f) != 3 or min(f) < 0 or f[0] <= 0 or f[2] <= 0 or not math.isclose(sum(f), 1.0, abs_tol=1e-6):
            raise ConfigError(f"ProbeConfig.fractions: need (train > 0, val >= 0, test > 0) summing to 1 (got {f})")

    @property
    def l2_grid(self) -> tuple[float, ...]:
        """The l2 values to try, strongest first (each fit warm-starts the next, weaker one)."""
        grid = self.l2 if isinstance(self.l2, tuple | list) else (self.l2,)
        return tuple(sorted((float(v) for v in grid), reverse=True))
