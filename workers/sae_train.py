"""Training loop for sparse autoencoders and transcoders: one process, pure torch, resumable.

`train()` consumes an iterator of activation batches (tensors for SAEs, (x_in, x_out) pairs for transcoders),
re-batches them to exactly `TrainConfig.batch_size` rows and runs Adam. Design choices (all documented so that
the defaults work at d_in = 64 as well as at d_in = 768 with only expansion, k, training_tokens and seed given):

- Input scaling ("sqrt_d"): activations are multiplied by c = sqrt(d) / E||x|| so that the mean token norm is
  sqrt(d). c is estimated from the first batches (>= `norm_estimation_tokens` rows) before training and then
  frozen; transcoders get separate factors for input and output. With this, every loss term in
  `actstore.workers.sae` is O(1) independent of width and of the model's activation scale. At the end the
  factors are folded back into the weights (`SparseAutoencoder.fold_scale_`) so the returned SAE reads and
  writes raw activations; the factors are also reported in the metrics.
- Learning rate: lr = 2e-4 / sqrt(d_sae / 16384), the 1/sqrt(n_latents) scaling from Gao et al. 2024 as
  implemented in EleutherAI's sparsify; linear warm-up (default min(1000, 5% of steps)) and linear decay to 0
  over the last 20% of steps (Conerly et al.), gradient norm clipped at 1.
- Sparsity warm-up: the L1 / L0 coefficient ramps linearly from 0 over the first 5% of steps, which keeps
  latents from dying before the decoder has found useful directions.
- Speed (topk / batchtopk): `SparseAutoencoder.training_loss` runs one dense GEMM per step and works on the
  active latents only (see `actstore.workers.sae`); that GEMM runs in bfloat16 where the hardware has fast
  bf16 (`select_dtype`), only to choose the active latents. Adam is torch's fused implementation.
- Dead latents: a latent is dead when it has not fired in `dead_window_tokens` tokens (default
  min(10M, training_tokens / 20)); topk/batchtopk feed them to AuxK.

Checkpoints (safetensors + JSON, never pickle) hold the weights, the Adam state, the dead-latent counters, the
scale factors and the step. A restarted `train()` with the same `checkpoint_dir` loads the newest one and skips
the first `step` re-batched batches of the iterator it is given, so with a deterministic iterator the result is
bit-identical to an uninterrupted run (training itself draws no random numbers after initialisation).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from actstore.workers.sae import SAEConfig, SparseAutoencoder
from actstore.workers.saelens_export import save_saelens

Batch = Tensor | tuple[Tensor, Tensor]
ProgressFn = Callable[[dict[str, Any]], None]
CHECKPOINT_FORMAT = 1
# Fields that may change between a run and its resumption without changing the result.
_RESUME_FREE_FIELDS = ("checkpoint_every", "log_every", "threads", "device")
# Fields added after CHECKPOINT_FORMAT 1, left out of the config fingerprint at their default value so that
# checkpoints written before they existed still resume.
_LATER_FIELD_DEFAULTS = {"select_dtype": "auto"}


@dataclass
class TrainConfig:
    """How to train (see the module docstring for the reasoning behind each default)."""

    batch_size: int = 4096
    """Tokens per optimiser step; incoming batches are re-batched to exactly this size."""
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(d_sae / 16384)."""
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
    checkpoint_every: int | None = None
    """Write a checkpoint every this many steps (and at the end) when a checkpoint_dir is given."""
    log_every: int = 100
    """Call the progress callback every this many steps (and at the end)."""
    dead_window_tokens: int | None = None
    """A latent is dead when it has not fired in this many tokens; None = min(10M, training_tokens // 20)."""
    normalize_to: Literal["sqrt_d", "none"] = "sqrt_d"
    """'sqrt_d': scale inputs to mean L2 norm sqrt(d) while training (folded back at the end); 'none'."""
    norm_estimation_tokens: int = 65536
    """Rows from the start of the stream used to estimate the scale factor and initialise b_dec."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (None = no clipping)."""
    threads: int | None = None
    """torch intra-op threads during training (None = leave torch's setting alone)."""
    device: str | None = None
    """'cpu', 'cuda', ...; None = cuda when available."""
    select_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """topk/batchtopk: dtype of the one dense GEMM that chooses each token's active latents (their values and
    all gradients are float32 regardless). 'auto' = bfloat16 on CUDA and on CPUs with native bf16 dot
    products (avx512_bf16 / amx_bf16), where it halves the step's dominant cost, else float32."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "training_tokens", "log_every", "norm_estimation_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: must be >= 1 (got {getattr(self, name)!r})")
        if self.training_tokens < self.batch_size:
            raise ValueError(f"TrainConfig.training_tokens: must be >= batch_size={self.batch_size} "
                             f"(got {self.training_tokens})")
        if self.normalize_to not in ("sqrt_d", "none"):
            raise ValueError(f"TrainConfig.normalize_to: must be 'sqrt_d' or 'none' (got {self.normalize_to!r})")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.sparsity_warmup_fraction <= 1:
            raise ValueError("TrainConfig.decay_fraction / sparsity_warmup_fraction: must be in [0, 1]")
        if self.select_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig.select_dtype: must be 'auto', 'float32' or 'bfloat16' "
                             f"(got {self.select_dtype!r})")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"TrainConfig.checkpoint_every: must be >= 1 (got {self.checkpoint_every!r})")

    @property
    def total_steps(self) -> int:
        return self.training_tokens // self.batch_size

    def resolved_lr(self, d_sae: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 16384)

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.total_steps // 20)

    def resolved_select_dtype(self, device: torch.device) -> torch.dtype:
        if self.select_dtype == "auto":
            fast = device.type == "cuda" or (device.type == "cpu" and _cpu_has_fast_bf16())
            return torch.bfloat16 if fast else torch.float32
        return torch.bfloat16 if self.select_dtype == "bfloat16" else torch.float32

    def resolved_dead_window(self) -> int:
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        return max(self.batch_size, min(10_000_000, self.training_tokens // 20))

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


@dataclass
class TrainResult:
    """A trained SAE (operating on raw activations) plus training metrics."""

    sae: SparseAutoencoder
    metrics: dict[str, Any]
    sae_cfg: SAEConfig
    train_cfg: TrainConfig

    def save(self, directory: str | os.PathLike, hook_name: str = "",
             extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write SAELens-loadable files (cfg.json, sae_weights.safetensors) plus actstore.json."""
        meta = {"train_config": asdict(self.train_cfg), "train_metrics": self.metrics, **(extra_metadata or {})}
        return save_saelens(self.sae, directory, hook_name, extra_metadata=meta)


@dataclass
class _State:
    """Everything besides weights and Adam state that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    scale_in: float = 1.0
    scale_out: float = 1.0
    since_fired: Tensor | None = None  # (d_sae,) int64 tokens since each latent last fired
    ema: dict[str, float] = field(default_factory=dict)  # smoothed loss statistics for progress reports


def train(batches: Iterable[Batch], sae_cfg: SAEConfig, train_cfg: TrainConfig | None = None,
          checkpoint_dir: str | os.PathLike | None = None,
          progress: ProgressFn | None = None) -> TrainResult:
    """Train an SAE (batches of x) or a transcoder (batches of (x_in, x_out)); see the module docstring.

    `progress(info)` gets a dict (step, total_steps, tokens, tokens_per_s, eta_s, lr, loss, fvu, l0,
    dead_fraction) every `log_every` steps; an exception it raises aborts training (checkpoints survive)."""
    train_cfg = train_cfg or TrainConfig()
    device = torch.device(train_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with _torch_threads(train_cfg.threads):
        sae = SparseAutoencoder(sae_cfg, seed=train_cfg.seed).to(device)
        # fused: one pass over each parameter instead of ~10 (the single-tensor loop is ~5x slower on CPU,
        # a sizeable part of a sparse TopK step); same maths, state_dict and checkpoint format.
        opt = torch.optim.Adam(sae.parameters(), lr=train_cfg.resolved_lr(sae_cfg.d_sae),
                               fused=device.type in ("cpu", "cuda"))
        stream = _rebatch(iter(batches), train_cfg.batch_size, sae_cfg.transcoder)
        state = _load_checkpoint(checkpoint_dir, sae, opt, sae_cfg, train_cfg) if checkpoint_dir else None
        if state is None:
            state, stream = _start(sae, stream, sae_cfg, train_cfg, device)
        elif state.step < train_cfg.total_steps:
            _skip(stream, state.step)
        ended_early = _loop(sae, opt, stream, state, train_cfg, device, checkpoint_dir, progress)
        result_sae = copy.deepcopy(sae).eval()
        result_sae.fold_scale_(state.scale_in, state.scale_out)
    return TrainResult(result_sae, _final_metrics(state, sae_cfg, train_cfg, ended_early), sae_cfg, train_cfg)


# ------------------------------------------------------------------------------------------- the loop
def _loop(sae: SparseAutoencoder, opt: torch.optim.Optimizer, stream: Iterator[tuple[Tensor, Tensor]],
          state: _State, cfg: TrainConfig, device: torch.device, ckpt_dir: str | os.PathLike | None,
          progress: ProgressFn | None) -> bool:
    """Run the remaining steps; returns True when the iterator ran dry before training_tokens."""
    sae.train()
    base_lr = cfg.resolved_lr(sae.cfg.d_sae)
    t0, tokens0 = time.perf_counter(), state.tokens
    while state.step < cfg.total_steps:
        batch = next(stream, None)
        if batch is None:  # ran dry: keep what was learned so far resumable, then report it
            if ckpt_dir and state.step > 0:
                _save_checkpoint(ckpt_dir, sae, opt, state, cfg)
            break
        x_in = batch[0].to(device, torch.float32, non_blocking=True) * state.scale_in
        # SAEs: the target is the input itself (same scale), so no second copy is made.
        x_out = x_in if batch[1] is batch[0] else batch[1].to(device, torch.float32) * state.scale_out
        stats = _step(sae, opt, x_in, x_out, state, cfg, base_lr)
        _update_state(state, stats, x_in.shape[0])
        last = state.step == cfg.total_steps
        if ckpt_dir and ((cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or last):
            _save_checkpoint(ckpt_dir, sae, opt, state, cfg)
        if progress and (state.step % cfg.log_every == 0 or last):
            progress(_progress_info(state, cfg, base_lr, time.perf_counter() - t0, state.tokens - tokens0))
    return state.step < cfg.total_steps


def _step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x_in: Tensor, x_out: Tensor, state: _State,
          cfg: TrainConfig, base_lr: float) -> dict[str, Tensor]:
    """One Adam step with the decoder-norm constraint applied around it."""
    lr = cfg.lr_at(state.step, base_lr)
    for group in opt.param_groups:
        group["lr"] = lr
    dead = state.since_fired >= cfg.resolved_dead_window()
    loss, stats = sae.training_loss(x_in, x_out, cfg.sparsity_scale_at(state.step), dead,
                                    select_dtype=cfg.resolved_select_dtype(x_in.device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sae.cfg.unit_norm_decoder:
        sae.remove_parallel_grad_()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.max_grad_norm)
    opt.step()
    if sae.cfg.unit_norm_decoder:
        sae.normalize_decoder_()
    stats["loss"] = loss.detach()
    stats["fvu"] = (stats["rec"] * x_out.shape[-1] * x_out.shape[0]
                    / (x_out - x_out.mean(0)).pow(2).sum().clamp_min(1e-12))
    return stats


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """Whether the CPU has native bf16 dot products (Linux /proc/cpuinfo flags; False where unreadable)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _update_state(state: _State, stats: dict[str, Tensor], n_tokens: int) -> None:
    state.step += 1
    state.tokens += n_tokens
    state.since_fired += n_tokens
    state.since_fired[stats["fired"].to(state.since_fired.device)] = 0
    for key in ("loss", "fvu", "l0", "aux"):
        value = float(stats[key])
        # Plain mean for the first 100 steps, then an EMA: early reports are not dominated by step 1.
        rate = max(1.0 / state.step, 0.01)
        state.ema[key] = value if key not in state.ema else state.ema[key] + rate * (value - state.ema[key])


def _start(sae: SparseAutoencoder, stream: Iterator[tuple[Tensor, Tensor]], sae_cfg: SAEConfig,
           cfg: TrainConfig, device: torch.device) -> tuple[_State, Iterator[tuple[Tensor, Tensor]]]:
    """Fresh run: estimate the scale factors and init b_dec from the first batches, then replay them."""
    head: list[tuple[Tensor, Tensor]] = []
    while sum(b[0].shape[0] for b in head) < cfg.norm_estimation_tokens:
        batch = next(stream, None)
        if batch is None:
            break
        head.append(batch)
    if not head:
        raise ValueError(f"train(): the batch iterator yielded fewer than batch_size={cfg.batch_size} rows")
    x_in = torch.cat([b[0] for b in head]).to(device, torch.float32)
    x_out = torch.cat([b[1] for b in head]).to(device, torch.float32) if sae_cfg.transcoder else x_in
    state = _State(since_fired=torch.zeros(sae_cfg.d_sae, dtype=torch.int64, device=device))
    if cfg.normalize_to == "sqrt_d":
        state.scale_in, state.scale_out = _sqrt_d_scale(x_in), _sqrt_d_scale(x_out)
    sae.init_b_dec(x_out * state.scale_out)
    return state, itertools.chain(head, stream)


def _sqrt_d_scale(x: Tensor) -> float:
    """c such that the mean L2 norm of c * x is sqrt(d)."""
    mean_norm = float(x.double().norm(dim=1).mean())
    return math.sqrt(x.shape[1]) / mean_norm if mean_norm > 0 else 1.0


def _rebatch(it: Iterator[Batch], batch_size: int, paired: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x_in, x_out) chunks of exactly batch_size rows (the ragged tail is dropped).

    For SAEs x_out is x_in itself (no copy)."""
    buf_in: list[Tensor] = []
    buf_out: list[Tensor] = []
    n = 0
    for item in it:
        if paired != isinstance(item, (tuple, list)):
            kind = "(x_in, x_out) pairs" if paired else "tensors"
            raise TypeError(f"train(): expected batches of {kind} for this config, got {type(item).__name__}")
        first = item[0] if paired else item
        x_in = first.reshape(-1, first.shape[-1])
        buf_in.append(x_in)
        if paired:
            buf_out.append(item[1].reshape(-1, item[1].shape[-1]))
            if buf_out[-1].shape[0] != x_in.shape[0]:
                raise ValueError(f"train(): x_in has {x_in.shape[0]} rows but x_out has {buf_out[-1].shape[0]}")
        n += x_in.shape[0]
        while n >= batch_size:
            cat_in = torch.cat(buf_in)
            cat_out = torch.cat(buf_out) if paired else cat_in
            chunk = cat_in[:batch_size]
            yield chunk, (cat_out[:batch_size] if paired else chunk)
            buf_in, buf_out, n = [cat_in[batch_size:]], [cat_out[batch_size:]] if paired else [], n - batch_size


def _skip(stream: Iterator[tuple[Tensor, Tensor]], n: int) -> None:
    """Discard the batches a resumed run has already trained on."""
    for i in range(n):
        if next(stream, None) is None:
            raise ValueError(f"train(): resuming at step {n}, but the iterator ran dry after {i} batches; "
                             "pass the same (deterministic) batches as the interrupted run")


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------- reporting
def _progress_info(state: _State, cfg: TrainConfig, base_lr: float, elapsed: float,
                   tokens_done: int) -> dict[str, Any]:
    rate = tokens_done / elapsed if elapsed > 0 else 0.0
    remaining = (cfg.total_steps - state.step) * cfg.batch_size
    dead = state.since_fired >= cfg.resolved_dead_window()
    return {"step": state.step, "total_steps": cfg.total_steps, "tokens": state.tokens,
            "tokens_per_s": rate, "eta_s": remaining / rate if rate > 0 else float("inf"),
            "lr": cfg.lr_at(state.step - 1, base_lr), "dead_fraction": float(dead.float().mean()),
            **state.ema}


def _final_metrics(state: _State, sae_cfg: SAEConfig, cfg: TrainConfig, ended_early: bool) -> dict[str, Any]:
    dead = state.since_fired >= cfg.resolved_dead_window()
    return {"steps": state.step, "tokens": state.tokens, "ended_early": ended_early,
            "lr": cfg.resolved_lr(sae_cfg.d_sae), "scale_in": state.scale_in, "scale_out": state.scale_out,
            "dead_fraction_train": float(dead.float().mean()),
            **{f"{k}_train": v for k, v in state.ema.items()}}


# ----------------------------------------------------------------------------------- checkpoints
def _config_fingerprint(sae_cfg: SAEConfig, cfg: TrainConfig) -> dict[str, Any]:
    train = {k: v for k, v in asdict(cfg).items()
             if k not in _RESUME_FREE_FIELDS and _LATER_FIELD_DEFAULTS.get(k, ...) != v}
    return {"sae_config": asdict(sae_cfg), "train_config": train}


def _save_checkpoint(directory: str | os.PathLike, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
                     state: _State, cfg: TrainConfig) -> None:
    """Write ckpt-<step>/ (tensors + json) under a temporary name, then point latest.json at it.

    latest.json is replaced atomically and written last, so a crash at any moment leaves the previous
    checkpoint intact and loadable."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{state.step:09d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    for idx, pstate in opt.state_dict()["state"].items():
        tensors.update({f"optim.{idx}.{k}": v.detach().cpu().contiguous() for k, v in pstate.items()})
    tensors["since_fired"] = state.since_fired.cpu()
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"format": CHECKPOINT_FORMAT, "step": state.step, "tokens": state.tokens,
            "scale_in": state.scale_in, "scale_out": state.scale_out, "ema": state.ema,
            **_config_fingerprint(sae.cfg, cfg)}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(tmp, root / name)
    _write_json_atomic(root / "latest.json", {"checkpoint": name, "step": state.step})
    for old in root.glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _load_checkpoint(directory: str | os.PathLike, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
                     sae_cfg: SAEConfig, cfg: TrainConfig) -> _State | None:
    """Restore weights, Adam state and counters from the newest checkpoint; None when there is none."""
    root = Path(directory)
    if not (root / "latest.json").exists():
        return None
    ckpt = root / json.loads((root / "latest.json").read_text())["checkpoint"]
    meta = json.loads((ckpt / "state.json").read_text())
    if _config_fingerprint(sae_cfg, cfg) != {k: meta[k] for k in ("sae_config", "train_config")}:
        raise ValueError(f"checkpoint_dir {root} holds a run with a different SAE/training config; "
                         "use a new checkpoint_dir or the original config")
    # Loaded on CPU: Adam keeps its step counters there and load_state_dict moves the rest to the params.
    tensors = load_file(str(ckpt / "state.safetensors"), device="cpu")
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    params = [p for group in opt.param_groups for p in group["params"]]
    opt.load_state_dict({"state": _optim_state(tensors, params), "param_groups": opt.state_dict()["param_groups"]})
    return _State(step=meta["step"], tokens=meta["tokens"], scale_in=meta["scale_in"],
                  scale_out=meta["scale_out"], since_fired=tensors["since_fired"].to(sae.W_enc.device),
                  ema=meta["ema"])


def _optim_state(tensors: dict[str, Tensor], params: list[Tensor]) -> dict[int, dict[str, Tensor]]:
    out: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            param = params[int(idx)]
            # Laid out like the parameter (fresh storage): the fused Adam kernel rounds an element differently
            # in its vectorised body and its scalar tail, so state in another memory order would make a
            # resumed run differ from an uninterrupted one in the last bit.
            if value.shape == param.shape:
                value = torch.empty_like(param).copy_(value)
            out.setdefault(int(idx), {})[name] = value
    return out
