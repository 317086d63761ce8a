"""Configuration of sparse autoencoders / transcoders and of their training, one documented field each.

`SAESettings` is what a user chooses (architecture, width, sparsity); `SAEConfig` adds the widths a store
fixes (d_in, d_out) and whether it is a transcoder; `CLTConfig` the same for a cross-layer transcoder (one
encoder per layer, decoders to every later layer). `TrainConfig` is how to train. All three are pydantic
dataclasses: they validate on construction, nest in the job configs (`actstore.schemas.jobs`) and generate
the CLI flags, so every default below is written once. The loss units behind the defaults are explained in
`actstore.workers.sae.model` and `actstore.workers.sae.training`; nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from actstore.schemas.errors import ConfigError
from actstore.schemas.validation import one_line_errors

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu", "matryoshka_batchtopk"]
ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu", "matryoshka_batchtopk")
# Architectures that choose latents by a top-k rule: k, AuxK and the sparse training path apply.
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
# Architectures trained with the batch-wide top-k rule and run with one global threshold at inference.
BATCH_TOPK_FAMILY = ("batchtopk", "matryoshka_batchtopk")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
# Default sparsity coefficients in the normalised loss units of actstore.workers.sae.model.
DEFAULT_L1 = {"relu": 0.1, "jumprelu": 1e-3}
# Adam learning rate at 16,384 latents; it scales as 1/sqrt(d_sae) (Gao et al.). 8x Gao's 2e-4: on inputs scaled
# to norm sqrt(d) that reaches a given FVU in far fewer tokens and still converges once the lr decays
# (measured in benchmarks/bench_sae_quality.py; actstore.workers.sae.training explains the choice).
LR_AT_16K_LATENTS = 1.6e-3
# A latent is dead (and trained by AuxK) once it has gone this many times its average firing interval
# (d_sae / k tokens) without firing.
DEAD_WINDOW_INTERVALS = 256
_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=False)


def _bad(cls: str, obj: object, field: str, why: str) -> ConfigError:
    return ConfigError(f"{cls}.{field}: {why} (got {getattr(obj, field)!r})")


@one_line_errors
@dataclass(config=_CONFIG)
class SAESettings:
    """Architecture of a sparse autoencoder or transcoder, independent of the activation widths."""

    architecture: Architecture = "topk"
    """'topk' | 'batchtopk' | 'relu' | 'jumprelu' | 'matryoshka_batchtopk' (see actstore.workers.sae.model)."""
    expansion: int = 8
    """d_sae = expansion * d_in latents."""
    k: int = 32
    """Active latents per token for topk; the mean active latents per token for (matryoshka_)batchtopk."""
    l1_coefficient: float | None = None
    """Sparsity penalty: L1 (relu) or L0 (jumprelu) coefficient; None = 0.1 for relu, 1e-3 for jumprelu.
    In normalised units: a jumprelu latent must explain more than 0.1% of the token's power to be worth it."""
    jumprelu_threshold_init: float = 0.5
    """Initial threshold of every jumprelu latent (normalised units; pre-activations start ~N(0, 1))."""
    jumprelu_bandwidth: float = 0.5
    """Width of the rectangle kernel of the jumprelu straight-through estimators (normalised units)."""
    aux_k: int | None = None
    """AuxK: how many dead latents reconstruct the residual (top-k architectures only). None = d_in // 2
    (Gao et al.), 0 = off."""
    aux_k_coefficient: float = 1 / 4
    """Weight of the AuxK loss (normalised by the residual's variance, as sparsify does). 8x Gao et al.'s 1/32:
    with the short dead window below it revives dead latents within a few hundred steps."""
    normalize_decoder: bool | None = None
    """Keep decoder rows at unit norm. None = True for every architecture but relu, False for relu (whose L1
    penalty is weighted by the row norms instead)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How b_dec starts: geometric median (Weiszfeld) or mean of the first batch of targets, or zeros."""
    skip: bool = False
    """Add a linear skip path x_in @ W_skip to the output (skip transcoders); transcoders only."""
    matryoshka_widths: list[int] | None = None
    """matryoshka_batchtopk: cumulative widths of the nested dictionaries, increasing, as SAELens'
    `matryoshka_widths` (e.g. [64, 256, 1024]: the first 64 latents, the first 256 and all 1024 each reconstruct
    the input on their own); a last width below d_sae gets d_sae appended. None = d_sae/16, d_sae/4, d_sae."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.expansion < 1:
            raise _bad(name, self, "expansion", "must be >= 1")
        if self.architecture in TOPK_FAMILY and self.k < 1:
            raise _bad(name, self, "k", "must be >= 1")
        widths = self.matryoshka_widths
        if widths is not None and self.architecture != "matryoshka_batchtopk":
            raise _bad(name, self, "matryoshka_widths", "only architecture='matryoshka_batchtopk' takes widths")
        if widths is not None and (not widths or widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:]))):
            raise _bad(name, self, "matryoshka_widths", "must be a non-empty, strictly increasing list of widths >= 1")
        if self.l1_coefficient is not None and self.l1_coefficient < 0:
            raise _bad(name, self, "l1_coefficient", "must be >= 0")
        if self.jumprelu_threshold_init <= 0 or self.jumprelu_bandwidth <= 0:
            raise _bad(name, self, "jumprelu_threshold_init", "threshold init and bandwidth must be > 0")
        if self.aux_k is not None and self.aux_k < 0:
            raise _bad(name, self, "aux_k", "must be >= 0")

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


@one_line_errors
@dataclass(config=_CONFIG, kw_only=True)
class SAEConfig(SAESettings):
    """An SAE's settings plus the widths of the activations it reads and writes. Invalid values fail here."""

    d_in: int
    """Width of the input activations."""
    transcoder: bool = False
    """Map input activations to different output activations (x_in -> x_out) instead of reconstructing x."""
    d_out: int | None = None
    """Width of the output activations; None = d_in. Only transcoders may differ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_in < 1:
            raise _bad("SAEConfig", self, "d_in", "must be >= 1")
        if self.architecture in TOPK_FAMILY and not 1 <= self.k <= self.d_sae:
            raise _bad("SAEConfig", self, "k", f"must be in [1, d_sae={self.d_sae}]")
        if self.matryoshka_widths is not None and self.matryoshka_widths[-1] > self.d_sae:
            raise _bad("SAEConfig", self, "matryoshka_widths", f"the widths must not exceed d_sae={self.d_sae}")
        if self.skip and not self.transcoder:
            raise _bad("SAEConfig", self, "skip", "a skip path needs transcoder=True")
        if self.d_out is not None and self.d_out != self.d_in and not self.transcoder:
            raise _bad("SAEConfig", self, "d_out", "only transcoders may have d_out != d_in")

    @classmethod
    def of(cls, settings: SAESettings, d_in: int, d_out: int | None = None, transcoder: bool = False) -> SAEConfig:
        """The settings applied to activations of the given widths."""
        fields = {k: getattr(settings, k) for k in SAESettings.__dataclass_fields__}
        return cls(**fields, d_in=d_in, d_out=d_out, transcoder=transcoder)

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion

    @property
    def d_target(self) -> int:
        """Resolved output width."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def n_latents(self) -> int:
        """All latents of the model (the trainer tracks each one's firing): d_sae."""
        return self.d_sae

    @property
    def aux_k_resolved(self) -> int:
        if self.architecture not in TOPK_FAMILY:
            return 0
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    @property
    def matryoshka_widths_resolved(self) -> list[int]:
        """The nested widths ending at d_sae (one width, d_sae, for every other architecture)."""
        if self.architecture != "matryoshka_batchtopk":
            return [self.d_sae]
        widths = self.matryoshka_widths
        if widths is None:
            widths = sorted({max(1, self.d_sae // 16), max(1, self.d_sae // 4)} - {self.d_sae})
        return [w for w in widths if w < self.d_sae] + [self.d_sae]


# Architectures a cross-layer transcoder supports: the top-k rules (applied per layer), JumpReLU and ReLU.
CLT_ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")


@one_line_errors
@dataclass(config=_CONFIG, kw_only=True)
class CLTConfig(SAESettings):
    """A cross-layer transcoder's settings plus the widths a store fixes: n_layers encoders reading d_model wide
    MLP inputs, each layer's d_sae = expansion * d_model features decoding to its own and every later layer's MLP
    output. k is per layer (each layer's encoder keeps k features per token, or k on average for batchtopk)."""

    d_model: int
    """Width of every layer's MLP input and output."""
    n_layers: int
    """Layers covered (consecutive); layer j of the CLT is the j-th of them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model < 1 or self.n_layers < 1:
            raise _bad("CLTConfig", self, "d_model" if self.d_model < 1 else "n_layers", "must be >= 1")
        if self.architecture not in CLT_ARCHITECTURES:
            raise _bad("CLTConfig", self, "architecture", f"cross-layer transcoders support {', '.join(CLT_ARCHITECTURES)}")
        if self.skip:
            raise _bad("CLTConfig", self, "skip", "cross-layer transcoders have no skip path")
        if self.architecture in TOPK_FAMILY and not 1 <= self.k <= self.d_sae:
            raise _bad("CLTConfig", self, "k", f"must be in [1, d_sae={self.d_sae}] (k counts one layer's features)")

    @classmethod
    def of(cls, settings: SAESettings, d_model: int, n_layers: int) -> CLTConfig:
        """The settings applied to a model of this width and depth."""
        fields = {k: getattr(settings, k) for k in SAESettings.__dataclass_fields__}
        return cls(**fields, d_model=d_model, n_layers=n_layers)

    # The names the trainer reads from any model config: a CLT maps all layers' inputs (flattened to
    # n_layers * d_model columns) to all layers' outputs.
    transcoder = True

    @property
    def d_in(self) -> int:
        return self.n_layers * self.d_model

    @property
    def d_target(self) -> int:
        return self.n_layers * self.d_model

    @property
    def d_sae(self) -> int:
        """Features per layer."""
        return self.d_model * self.expansion

    @property
    def n_latents(self) -> int:
        return self.n_layers * self.d_sae

    @property
    def aux_k_resolved(self) -> int:
        """AuxK's dead features per token and layer (top-k architectures): aux_k, or d_model // 2."""
        if self.architecture not in TOPK_FAMILY:
            return 0
        return self.aux_k if self.aux_k is not None else max(1, self.d_model // 2)

    @property
    def matryoshka_widths_resolved(self) -> list[int]:
        return [self.d_sae]


@one_line_errors
@dataclass(config=_CONFIG)
class TrainConfig:
    """How to train (actstore.workers.sae.training explains the reasoning behind each default)."""

    batch_size: int = 4096
    """Tokens per optimiser step; incoming batches are re-batched to exactly this size."""
    lr: float | None = None
    """Adam learning rate; None = 1.6e-3 / sqrt(d_sae / 16384) (LR_AT_16K_LATENTS)."""
    adam_beta1: float = 0.8
    """Adam's first-moment (momentum) decay."""
    adam_beta2: float = 0.9
    """Adam's second-moment decay. Lower than torch's 0.999: gradients shrink fast early in SAE training, and a
    long memory of the first large ones keeps the steps small for hundreds of steps after (on MiniLM and a
    GPT-2-small-shaped model, 200 steps: FVU 0.155 -> 0.132 and 0.228 -> 0.208; benchmarks/bench_sae_quality)."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up; None = min(1000, 5% of the steps)."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    sparsity_warmup_fraction: float = 0.05
    """Fraction of the steps over which the L1/L0 coefficient ramps up from 0."""
    training_tokens: int = 2**24
    """Tokens to train on; steps = training_tokens // batch_size (fewer if the iterator runs dry)."""
    seed: int = 0
    """Seeds the weight initialisation (the only randomness in training)."""
    checkpoint_every: int | None = 500
    """Write a checkpoint every this many steps (and at the end) when the job has an output; None = only at the
    end. A rerun of the same job resumes from the newest checkpoint."""
    log_every: int = 100
    """Report progress every this many steps (and at the end)."""
    dead_window_tokens: int | None = None
    """A latent is dead when it has not fired in this many tokens; None = 256 * d_sae / k (256 times a latent's
    average firing interval), at most min(10M, training_tokens // 20) and at least batch_size."""
    normalize_to: Literal["sqrt_d", "none"] = "sqrt_d"
    """'sqrt_d': scale inputs to mean L2 norm sqrt(d) while training (folded back at the end); 'none'."""
    norm_estimation_tokens: int = 65536
    """Rows from the start of the stream used to estimate the scale factor and initialise b_dec."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (None = no clipping)."""
    threads: int | None = None
    """torch intra-op threads during training (None = leave torch's setting; Dask tasks use every core)."""
    device: str | None = None
    """'cpu', 'cuda', ...; None = cuda when available."""
    select_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """topk/batchtopk: dtype of the one dense GEMM that chooses each token's active latents (their values and
    all gradients are float32 regardless). 'auto' = bfloat16 on CUDA and on CPUs with native bf16 dot
    products (avx512_bf16 / amx_bf16), where it halves the step's dominant cost, else float32; 'float32' makes
    the latent choice identical across CPUs."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "training_tokens", "log_every", "norm_estimation_tokens"):
            if getattr(self, name) < 1:
                raise _bad("TrainConfig", self, name, "must be >= 1")
        if self.training_tokens < self.batch_size:
            raise _bad("TrainConfig", self, "training_tokens", f"must be >= batch_size={self.batch_size}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise _bad("TrainConfig", self, name, "must be in [0, 1)")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.sparsity_warmup_fraction <= 1:
            raise ConfigError("TrainConfig.decay_fraction / sparsity_warmup_fraction: must be in [0, 1]")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise _bad("TrainConfig", self, "checkpoint_every", "must be >= 1")

    @property
    def total_steps(self) -> int:
        return self.training_tokens // self.batch_size

    def resolved_lr(self, d_sae: int) -> float:
        return self.lr if self.lr is not None else LR_AT_16K_LATENTS / math.sqrt(d_sae / 16384)

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.total_steps // 20)

    def resolved_dead_window(self, d_sae: int, k: int) -> int:
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        window = min(DEAD_WINDOW_INTERVALS * d_sae // max(k, 1), 10_000_000, self.training_tokens // 20)
        return max(self.batch_size, window)

    def lr_at(self, step: int, base_lr: float) -> float:
        """Warm-up, constant, then linear decay to 0 over the last decay_fraction of the steps."""
        total, warm = self.total_steps, self.resolved_warmup()
        factor = 1.0 if warm == 0 else min(1.0, (step + 1) / warm)
        decay_steps = int(total * self.decay_fraction)
        if decay_steps > 0 and step >= total - decay_steps:
            factor = min(factor, (total - step) / decay_steps)
        return base_lr * factor

    def sparsity_scale_at(self, step: int) -> float:
        ramp = int(self.total_steps * self.sparsity_warmup_fraction)
        return 1.0 if ramp == 0 else min(1.0, (step + 1) / ramp)
